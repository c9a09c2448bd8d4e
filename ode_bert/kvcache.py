"""Key/value caches of decoder layers whose ODE step evaluates the layer more than once.

A decoder layer appends the keys and values of its input to a transformers ``Cache`` at every call. The
model without a cache (``use_cache=False``) evaluates a layer on the whole sequence at once: in an ODE
step every evaluation of the layer sees the keys and values of all earlier positions *at the same
stage* of the step (explicit Runge-Kutta stage ``i``; the converged stage of an implicit method). To
decode incrementally with the same result, the cache keeps one key/value history per stage
(``StagedCacheLayer``), each evaluation reads and extends its stage's history as it was before the
layer, and implicit methods write their stage's keys and values once, from an evaluation at the
converged stage state (``CachePlan``).

Exact (up to float rounding) for the explicit fixed-step methods; for the implicit ones the past
positions' stage states are those of their own solves, so the results agree with ``use_cache=False``
up to the root finder's tolerance (the joint solve stops on a residual over all positions). Adaptive
methods choose their sub-steps from the whole sequence: the past positions' states at the new token's
stage times exist nowhere, so a cache is refused for them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from solvers import Method

# Cache layer types whose ``update`` replaces its tensors (torch.cat / slicing) instead of writing in
# place, so that a shallow copy of the attributes is a snapshot that can be restored.
SNAPSHOT_LAYER_TYPES: tuple[type, ...] = (DynamicLayer, DynamicSlidingWindowLayer)

StageState = Callable[[Tensor, Tensor], Tensor]  # (input h, step output h_next) -> state of a stage


class StagedCacheLayer(CacheLayerMixin):
    """One layer's cache holding one key/value history per stage of the layer's ODE step.

    Installed in ``cache.layers`` in place of the layer's own ``DynamicLayer``: transformers' cache-wide
    operations (beam-search reordering, cropping, batch selection) apply to every stage, and reads
    (``keys``, ``get_seq_length``, mask sizes) see stage ``active`` (0 outside a step: for explicit
    methods the stage evaluated at the step's input, as in the stock model). ``signature`` names the
    method that filled it, so a different method is refused instead of reading histories of other stages.
    """

    def __init__(self, stages: list[CacheLayerMixin], signature: str) -> None:  # no super(): keys delegate
        self.stages = stages
        self.signature = signature
        self.active = 0

    def __getattr__(self, name: str) -> Any:
        if name in ("stages", "active", "signature"):  # not set yet (e.g. during copy/unpickling)
            raise AttributeError(name)
        return getattr(self.stages[self.active], name)

    @property
    def is_sliding(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.stages[0], "is_sliding", False))

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return bool(self.stages[0].is_croppable)

    def __repr__(self) -> str:
        return f"StagedCacheLayer({len(self.stages)} x {type(self.stages[0]).__name__}, {self.signature})"

    def snapshot(self) -> list[dict[str, Any]]:
        """Every stage's history now: its attributes (updates replace tensors, never write in them)."""
        return [dict(vars(stage)) for stage in self.stages]

    def restore(self, snapshot: list[dict[str, Any]]) -> None:
        """Put every stage's history back to ``snapshot``."""
        for stage, state in zip(self.stages, snapshot):
            stage.__dict__.clear()
            stage.__dict__.update(state)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.stages[self.active].lazy_initialization(key_states, value_states)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        return self.stages[self.active].update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stages[self.active].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.stages[self.active].get_seq_length()

    def get_max_length(self) -> int:
        return self.stages[self.active].get_max_length()

    def _all(self, method: str, *args: Any) -> None:
        for stage in self.stages:
            getattr(stage, method)(*args)

    def offload(self) -> None:
        self._all("offload")

    def prefetch(self) -> None:
        self._all("prefetch")

    def reset(self) -> None:
        self._all("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._all("reorder_cache", beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self._all("crop", tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._all("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._all("batch_select_indices", indices)

    def activate_past_recording(self) -> None:
        for stage in self.stages:
            if hasattr(stage, "activate_past_recording"):
                stage.activate_past_recording()


@dataclass(frozen=True)
class StagePlan:
    """Which cache stage each evaluation of a method's step uses, and what implicit methods write at the end.

    ``stages``: number of key/value histories. ``eager``: the first evaluations, each on its own stage, whose
    keys and values are kept (explicit stages; the trapezoid's ``f(y)``); later evaluations (root-finder
    iterates) use stage ``solve_stage`` and are discarded. ``final``: an implicit method's converged state of
    the solve stage, where the layer is evaluated once more after the step to write that stage's keys and
    values.
    """

    stages: int
    eager: int
    solve_stage: int = 0
    final: StageState | None = None


def stage_plan(method: Method) -> StagePlan | None:
    """The cache plan of ``method``, or ``None`` where keys and values of its stages cannot be kept (adaptive
    methods and implicit ones this module does not know)."""
    tableau = method.tableau
    if method.adaptive or tableau is None:
        return None
    if not method.implicit:
        return StagePlan(stages=tableau.stages, eager=tableau.stages)
    return IMPLICIT_PLANS.get(method.name)


# The implicit steps of ``solvers`` by registry name (their equations are in solvers/implicit.py).
IMPLICIT_PLANS: dict[str, StagePlan] = {
    # z = y + dt f(z): the stage state is the solution
    "implicit_euler": StagePlan(stages=1, eager=0, final=lambda h, h_next: h_next),
    # z = y + dt/2 f(z), y_next = 2 z - y: the stage state is the midpoint
    "implicit_midpoint": StagePlan(stages=1, eager=0, final=lambda h, h_next: 0.5 * (h + h_next)),
    # f(y) first (its own stage, kept), then z = y + dt/2 (f(y) + f(z)): the second stage is the solution
    "trapezoid": StagePlan(stages=2, eager=1, solve_stage=1, final=lambda h, h_next: h_next),
}


def block_cache_index(block: nn.Module) -> int | None:
    """The cache layer index a decoder block writes to: the one ``layer_idx`` of its attention modules."""
    found = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    return found.pop() if len(found) == 1 else None


def self_attention_cache(cache: Cache) -> Cache:
    """The cache that holds a decoder's own keys and values (the first of an ``EncoderDecoderCache``)."""
    return getattr(cache, "self_attention_cache", cache)


class CachePlan:
    """Drives one layer's cache through one ODE step: stage selection before each evaluation, final writes.

    Built by ``prepare``, which raises ``ValueError`` (before any evaluation) where the cache cannot be
    handled exactly: an adaptive or unknown method, a cache layer type that is updated in place (static,
    quantized, offloaded caches), a block whose cache index is unclear, or a cache filled by another method.
    """

    def __init__(self, staged: StagedCacheLayer, plan: StagePlan) -> None:
        self.staged = staged
        self.plan = plan
        self.past = staged.snapshot()
        self.done = False

    @classmethod
    def prepare(cls, block: nn.Module, cache: Any, method: Method, signature: str, where: str) -> CachePlan:
        """Install (or check) the block's ``StagedCacheLayer`` in ``cache`` and snapshot its histories."""
        plan = stage_plan(method)
        without_cache = (
            "call the model with use_cache=False (model(..., use_cache=False), "
            "generate(..., use_cache=False))"
        )
        # euler evaluates the layer once, so the cache is used as the stock model uses it, whatever its kind
        advice = f"{without_cache}, or use solver='euler' (one evaluation per layer)"
        if plan is None:
            advice = (
                f"{without_cache}, or use a fixed-step method (euler, midpoint, heun, rk4) or "
                f"implicit_euler, implicit_midpoint, trapezoid"
            )
            kind = "an adaptive method" if method.adaptive else "a method without known stages"
            raise ValueError(
                f"{where} receives a key/value cache, and {method.name!r} is {kind}: its sub-steps depend "
                f"on the whole sequence, so the earlier positions' keys and values at the new tokens' stage "
                f"times are not stored anywhere and incremental decoding cannot equal the model without a "
                f"cache; {advice}"
            )
        if not isinstance(cache, Cache):
            raise ValueError(
                f"{where} receives a key/value cache of type {type(cache).__name__} (not a transformers "
                f"Cache): a method that evaluates the layer more than once can keep exact keys and values "
                f"only in a DynamicCache; {advice}"
            )
        index = block_cache_index(block)
        if index is None:
            raise ValueError(
                f"{where} receives a key/value cache, but the cache index of {type(block).__name__} is "
                f"unclear (no single layer_idx among its attention modules); {advice}"
            )
        own = self_attention_cache(cache)
        if index >= len(own.layers) and getattr(own, "layer_class_to_replicate", None) is not None:
            while len(own.layers) <= index:  # as Cache.update would on the first write
                own.layers.append(own.layer_class_to_replicate())
        if index >= len(own.layers):
            raise ValueError(f"{where}: the key/value cache has no layer {index}; {advice}")
        layer = own.layers[index]
        if isinstance(layer, StagedCacheLayer):
            if layer.signature != signature or len(layer.stages) != plan.stages:
                raise ValueError(
                    f"{where}: the key/value cache was filled by {layer.signature}, not {signature}; its "
                    f"histories belong to other stages. Start generation with a fresh cache"
                )
            lengths = [stage.get_seq_length() for stage in layer.stages]
            if len(set(lengths)) > 1:  # e.g. a single-evaluation forward in between extended stage 0 only
                raise ValueError(
                    f"{where}: the key/value cache's stage histories have different lengths {lengths} (a "
                    f"forward with another method extended only some); start generation with a fresh cache"
                )
        else:
            if type(layer) not in SNAPSHOT_LAYER_TYPES:
                raise ValueError(
                    f"{where} receives a {type(own).__name__} whose layer {index} is a "
                    f"{type(layer).__name__}: only DynamicLayer and DynamicSlidingWindowLayer histories can "
                    f"be kept per stage (static, quantized and offloaded caches write in place); use the "
                    f"default DynamicCache, or {advice}"
                )
            if layer.get_seq_length() > 0:
                raise ValueError(
                    f"{where}: the key/value cache already holds {layer.get_seq_length()} positions that "
                    f"were not computed by {signature} (e.g. the prompt was run before convert); start "
                    f"generation with a fresh cache"
                )
            layer = StagedCacheLayer([layer] + [copy.copy(layer) for _ in range(plan.stages - 1)], signature)
            own.layers[index] = layer
        return cls(layer, plan)

    def _use_stage(self, index: int) -> None:
        """Make stage ``index`` active, its history as it was before the step."""
        state = self.past[index]
        stage = self.staged.stages[index]
        stage.__dict__.clear()
        stage.__dict__.update(state)
        self.staged.active = index

    def evaluate(self, count: int, run: Callable[[], Any]) -> Any:
        """``run()`` (one evaluation of the layer, number ``count`` of the step) on the right stage.

        During the step: the eager evaluations extend their own stage; root-finder iterates read and then
        discard the solve stage. After the step (an implicit gradient's backward evaluates the layer again):
        on the solve stage's past, leaving every history as the step left it.
        """
        plan = self.plan
        if not self.done:
            self._use_stage(count if count < plan.eager else plan.solve_stage)
            return run()
        after = self.staged.snapshot()
        try:
            self._use_stage(plan.solve_stage)
            return run()
        finally:
            self.staged.restore(after)
            self.staged.active = 0

    def finish(self, evaluate: Callable[[Tensor], Any], h: Tensor, h_next: Tensor) -> int:
        """Write an implicit method's stage keys and values from one evaluation (through ``evaluate``, which
        comes back to ``self.evaluate``) at the converged stage state; the number of evaluations this took.
        Leaves stage 0 active; later evaluations leave the histories alone."""
        extra = 0
        if self.plan.final is not None:
            evaluate(self.plan.final(h, h_next))
            extra = 1
        self.staged.active = 0
        self.done = True
        return extra

    def abandon(self) -> None:
        """After a failed step: every history as it was before the step, stage 0 active."""
        self.staged.restore(self.past)
        self.staged.active = 0
        self.done = True
