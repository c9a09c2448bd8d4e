#!/usr/bin/env bash
# Choose the IM-connection's settings on a held-out split of the SST-2 training subset (never on dev or
# AdvGLUE): one fine-tuning run per candidate, scored by `ode-bert eval` on the held-out part.
# Usage: bash bench/experiments/select_im.sh [OUT_DIR] [SEED]
set -euo pipefail
out=${1:-runs/select}
seed=${2:-1}
common=(--task sst2 --train-samples 600 --holdout 0.25 --epochs 2 --batch-size 16 --lr 2e-4
        --max-length 64 --dev-samples 200 --seed "$seed")
run() {  # name, extra args...
  local name=$1; shift
  [ -f "$out/$name/metrics.json" ] || ode-bert train "${common[@]}" --output-dir "$out/$name" "$@"
}
run bert --variant bert
run ex-layer-s1 --variant ex --field layer --step 1
run im-residual-s1 --variant im --field residual --step 1 --max-iter 10
run im-residual-s0.5 --variant im --field residual --step 0.5 --max-iter 10
run im-layer-s0.25 --variant im --field layer --step 0.25 --max-iter 10
run im-layer-s1 --variant im --field layer --step 1 --max-iter 10
python - "$out" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(run.read_text())
    print(run.parent.name, json.dumps({k: v for k, v in m.items() if "holdout" in k}))
PY
