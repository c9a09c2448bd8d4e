"""Warm starts of implicit layers across training epochs: a store of each example's fixed points.

In a training run every example is solved again at every epoch, by weights that have moved a little. The
store keeps, per (layer, example id), the increment ``z - h`` of the example's last solve (its fixed point
minus the layer input), on the example's real tokens only (padding differs between batches). At the next
visit the solve starts from ``h_now + increment`` ("the old fixed point, shifted by the change of the layer
input") instead of the explicit Euler predictor, which it then skips::

    store = WarmStartStore()
    for batch, ids in batches:                      # ids: stable example ids (index in the training set)
        with store.batch(model, ids, batch["attention_mask"]):
            loss = model(**batch).loss
        loss.backward()

Only where each solve starts changes, so its result is a fixed point of the same equation to the same
tolerance (and the ``implicit``/``one_step`` gradients are those of a cold start up to that tolerance).
Guesses are read and written only in training mode: evaluation solves start cold as before.

Memory: the increments are kept on the CPU in ``dtype`` (float16 by default), ``real tokens x hidden x
itemsize`` bytes per example and layer (MiniLM, hidden 384: 768 bytes per real token and layer), bounded by
``max_bytes`` (tensor bytes; least recently used example ids are evicted first). ``state_dict`` holds the
whole store as two tensors, so a training checkpoint resumes with the same guesses.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .convert import _connections

STATE_FORMAT = "ode-bert-warm-start-v1"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: the SST-2 1,000-example MiniLM run needs about 60 MB (docs)
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}  # fmt: skip


class WarmStartStore:
    """Per-example fixed points of a model's implicit layers (module docstring), LRU-bounded in bytes.

    ``max_bytes``: the bound on the stored tensors' bytes; when a write passes it, the least recently used
    example ids (read or written longest ago) are evicted with all their layers. ``dtype``: the storage
    dtype of the increments (``torch.float16``, ``bfloat16``, ``float32`` or ``float64``); an increment that
    does not fit it (overflow to Inf) is not stored, so that example starts cold at its next visit.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, dtype: torch.dtype = torch.float16) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        if dtype not in STORE_DTYPES.values():
            raise ValueError(f"dtype must be one of torch.{', torch.'.join(STORE_DTYPES)}, got {dtype!r}")
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.entries: OrderedDict[int, dict[int, Tensor]] = OrderedDict()  # id -> layer -> increment
        self.nbytes = 0
        self.counts = {"warm": 0, "cold": 0, "evicted": 0, "not_stored": 0}

    def __len__(self) -> int:
        """The number of example ids held."""
        return len(self.entries)

    def stats(self) -> dict[str, int]:
        """Counters since the last ``reset_counts``: (example, layer) solves started ``warm`` and ``cold``,
        example ids ``evicted``, increments ``not_stored`` (overflow); and the current ``examples`` and
        ``bytes``."""
        return {**self.counts, "examples": len(self.entries), "bytes": self.nbytes}

    def reset_counts(self) -> None:
        """Zero the counters of ``stats`` (e.g. at the start of an epoch)."""
        self.counts = dict.fromkeys(self.counts, 0)

    @contextlib.contextmanager
    def batch(
        self, model: nn.Module, example_ids: Sequence[int] | Tensor, attention_mask: Tensor
    ) -> Iterator[None]:
        """Let ``model``'s implicit layers read guesses and write back their solutions for one batch.

        ``example_ids``: one stable id per row of the batch (e.g. the example's index in the training set),
        no repeats; ``attention_mask``: the batch's ``(batch, tokens)`` mask (non-zero: real token). Only
        layers in training mode use it (``ODEConnection.warm_start``). A model without implicit layers, ids
        that do not match the mask's rows, or repeated ids are a ``ValueError`` before anything runs.
        """
        ids = _check_ids(example_ids)
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a (batch, tokens) tensor, got {got}")
        if len(ids) != attention_mask.shape[0]:
            raise ValueError(
                f"{len(ids)} example ids for a batch of {attention_mask.shape[0]} rows: give one id per row"
            )
        connections = [c for c in _connections(model) if c.method.implicit]
        if not connections:
            raise ValueError(
                f"{type(model).__name__} has no implicit layers (convert it with an implicit solver, e.g. "
                f"ode_bert.im_bert): warm starts only start implicit solves"
            )
        busy = [c.index for c in connections if c.warm_start is not None]
        if busy:
            raise RuntimeError(f"layers {busy} are already inside another warm-start batch")
        guesses = _BatchGuesses(self, ids, attention_mask.detach() != 0)
        for connection in connections:
            connection.warm_start = guesses
        try:
            yield
        finally:
            for connection in connections:
                connection.warm_start = None

    def _put(self, example_id: int, layer: int, increment: Tensor) -> None:
        """Store ``increment`` of (``example_id``, ``layer``) as the newest entry; evict down to the bound."""
        layers = self.entries.setdefault(example_id, {})
        self.entries.move_to_end(example_id)
        old = layers.pop(layer, None)
        if old is not None:
            self.nbytes -= _nbytes(old)
        stored = increment.to(device="cpu", dtype=self.dtype).clone()
        if not bool(torch.isfinite(stored).all()):
            self.counts["not_stored"] += 1
        else:
            layers[layer] = stored
            self.nbytes += _nbytes(stored)
        if not layers:
            del self.entries[example_id]
        while self.nbytes > self.max_bytes and self.entries:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= sum(_nbytes(t) for t in evicted.values())
            self.counts["evicted"] += 1

    def state_dict(self) -> dict[str, Any]:
        """The whole store (entries in LRU order, bound, dtype) as plain values and two tensors: ``index``
        ``(n, 3)`` rows ``[example id, layer, tokens]`` and ``data``, the increments stacked on dim 0."""
        index, parts = [], []
        for example_id, layers in self.entries.items():
            for layer, increment in layers.items():
                index.append([example_id, layer, increment.shape[0]])
                parts.append(increment)
        features = sorted({tuple(p.shape[1:]) for p in parts})
        if len(features) > 1:
            raise ValueError(f"stored increments have different feature shapes {features}; cannot pack them")
        data = torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)
        return {
            "format": STATE_FORMAT,
            "max_bytes": self.max_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "index": torch.tensor(index, dtype=torch.int64).reshape(-1, 3),
            "data": data,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the entries by those of ``state`` (from ``state_dict``); a damaged or foreign state, or
        one of another bound or dtype, is a ``ValueError``. Counters are reset."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a warm-start store state (format {found!r}, expected {STATE_FORMAT!r})")
        dtype = str(self.dtype).removeprefix("torch.")
        if state.get("max_bytes") != self.max_bytes or state.get("dtype") != dtype:
            raise ValueError(
                f"the saved warm-start store has max_bytes {state.get('max_bytes')!r}, dtype "
                f"{state.get('dtype')!r}; this one {self.max_bytes}, {dtype}"
            )
        index, data = state.get("index"), state.get("data")
        if not (isinstance(index, Tensor) and index.dim() == 2 and index.shape[1] == 3
                and index.dtype == torch.int64):  # fmt: skip
            raise ValueError("damaged warm-start store state: index is not an (n, 3) int64 tensor")
        rows = int(index[:, 2].sum())
        if not isinstance(data, Tensor) or data.dtype != self.dtype or data.dim() < 1 or len(data) != rows:
            raise ValueError("damaged warm-start store state: data does not match its index")
        entries: OrderedDict[int, dict[int, Tensor]] = OrderedDict()
        nbytes = 0
        for (example_id, layer, _), increment in zip(index.tolist(), data.split(index[:, 2].tolist())):
            entries.setdefault(example_id, {})[layer] = increment.clone()
            nbytes += _nbytes(increment)
        if nbytes > self.max_bytes:
            raise ValueError(f"damaged warm-start state: {nbytes} bytes, over its bound {self.max_bytes}")
        self.entries, self.nbytes = entries, nbytes
        self.reset_counts()


class _BatchGuesses:
    """``InitialGuesses`` of one batch (``ode_bert.convert``): reads and writes ``store`` by example id."""

    def __init__(self, store: WarmStartStore, ids: list[int], real: Tensor) -> None:
        self.store = store
        self.ids = ids
        self.real = real  # bool (batch, tokens)
        self.tokens = real.sum(dim=1).tolist()

    def _check(self, layer: int, h: Tensor) -> Tensor:
        if h.dim() < 3 or tuple(h.shape[:2]) != tuple(self.real.shape):
            raise ValueError(
                f"layer {layer}: the hidden state {tuple(h.shape)} does not match the warm-start batch's "
                f"attention mask {tuple(self.real.shape)} (batch, tokens); pass the mask the model gets"
            )
        return self.real.to(h.device)

    def guess(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor] | None:
        real = self._check(layer, h)
        found = [self.store.entries.get(i, {}).get(layer) for i in self.ids]
        for example_id, tokens, increment in zip(self.ids, self.tokens, found):
            if increment is not None and tuple(increment.shape) != (tokens, *h.shape[2:]):
                raise ValueError(
                    f"layer {layer}: example id {example_id} has {tokens} real tokens of "
                    f"{tuple(h.shape[2:])} now but {tuple(increment.shape)} stored: the ids are not stable "
                    f"(one id, two inputs)"
                )
        known = torch.tensor([inc is not None for inc in found], dtype=torch.bool, device=h.device)
        warm = int(known.sum())
        self.store.counts["warm"] += warm
        self.store.counts["cold"] += len(self.ids) - warm
        if not warm:
            return None
        for example_id, increment in zip(self.ids, found):
            if increment is not None:
                self.store.entries.move_to_end(example_id)
        increments = torch.zeros_like(h)
        increments[real & known[:, None]] = torch.cat([inc for inc in found if inc is not None]).to(
            device=h.device, dtype=h.dtype
        )
        return h + increments, known

    def solved(self, layer: int, h: Tensor, h_next: Tensor) -> None:
        real = self._check(layer, h)
        increments = (h_next - h)[real].split(self.tokens)
        for example_id, increment in zip(self.ids, increments):
            self.store._put(example_id, layer, increment)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _check_ids(example_ids: Sequence[int] | Tensor) -> list[int]:
    """``example_ids`` as a list of ints: a 1-D integer tensor or a sequence of ints, without repeats."""
    if isinstance(example_ids, Tensor):
        if example_ids.dim() != 1 or example_ids.is_floating_point() or example_ids.dtype == torch.bool:
            got = f"{example_ids.dim()}-D {example_ids.dtype}"
            raise ValueError(f"example_ids must be a 1-D integer tensor, got {got}")
        ids = example_ids.tolist()
    else:
        ids = list(example_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("example_ids must be integers (stable ids, e.g. the index in the training set)")
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"example ids repeat within the batch: {repeated[:10]}")
    return ids
