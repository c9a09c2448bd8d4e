"""``python -m ode_bert.experiments.worker PAYLOAD``: one run of a ``LocalExecutor``, in its own process.

``PAYLOAD`` is JSON: ``{"settings": TrainConfig fields, "dev_samples": int or null}``.
"""

from __future__ import annotations

import json
import sys

from .executors import train_and_evaluate


def main(argv: list[str] | None = None) -> None:
    (payload,) = sys.argv[1:] if argv is None else argv
    task = json.loads(payload)
    train_and_evaluate(task["settings"], task["dev_samples"])


if __name__ == "__main__":
    main()
