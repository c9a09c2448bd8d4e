"""Plots of stability regions ``{z : |R(z)| <= 1}``, optionally with points ``h*lambda`` on top.

A point ``h*lambda`` inside a method's region is a mode whose perturbations that method damps; a point
outside is amplified by ``|R(h*lambda)| > 1`` per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .functions import MethodLike, StabilityFunction, stability_function

Extent = tuple[float, float, float, float]
DEFAULT_EXTENT: Extent = (-5.0, 3.0, -4.0, 4.0)


def _as_function(method: MethodLike | StabilityFunction) -> StabilityFunction:
    return method if isinstance(method, StabilityFunction) else stability_function(method)


def _check_extent(extent: Sequence[float]) -> Extent:
    if len(extent) != 4:
        raise ValueError(f"extent must be (re_min, re_max, im_min, im_max), got {extent!r}")
    re_min, re_max, im_min, im_max = (float(v) for v in extent)
    if not (re_min < re_max and im_min < im_max):
        raise ValueError(f"extent must satisfy re_min < re_max and im_min < im_max, got {extent!r}")
    return re_min, re_max, im_min, im_max


def plot_stability_region(
    methods: MethodLike | StabilityFunction | Sequence[MethodLike | StabilityFunction],
    ax: Axes | None = None,
    filled: bool = True,
    overlay: np.ndarray | Mapping[str, np.ndarray] | None = None,
    overlay_label: str = "h·λ",
    extent: Sequence[float] = DEFAULT_EXTENT,
    resolution: int = 401,
    alpha: float = 0.25,
) -> Axes:
    """Draw the stability region of one or several methods on one axes and return it.

    ``methods``: solver names, ``solvers.Method``s, ``ButcherTableau``s or ``StabilityFunction``s.
    ``filled``: shade ``|R| <= 1`` (the boundary ``|R| = 1`` is always drawn). ``overlay``: complex points
    ``h*lambda`` (an array, labelled ``overlay_label``, or a mapping label -> array). The figure is saved
    with ``ax.figure.savefig("regions.png")`` (or ``.svg``).
    """
    if isinstance(methods, (str, StabilityFunction)) or not isinstance(methods, Sequence):
        methods = [methods]
    if not methods:
        raise ValueError("give at least one method")
    if not isinstance(resolution, int) or resolution < 16:
        raise ValueError(f"resolution must be an integer >= 16, got {resolution!r}")
    re_min, re_max, im_min, im_max = _check_extent(extent)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    xs = np.linspace(re_min, re_max, resolution)
    ys = np.linspace(im_min, im_max, resolution)
    grid = xs[None, :] + 1j * ys[:, None]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for index, method in enumerate(methods):
        function = _as_function(method)
        color = colors[index % len(colors)]
        magnitude = np.nan_to_num(function.abs(grid), nan=np.inf, posinf=1e300)
        if filled:
            ax.contourf(xs, ys, magnitude, levels=[0.0, 1.0], colors=[color], alpha=alpha)
        ax.contour(xs, ys, magnitude, levels=[1.0], colors=[color], linewidths=1.5)
        label = function.name
        handles.append(Patch(facecolor=color, alpha=alpha, edgecolor=color, label=label) if filled
                       else Line2D([], [], color=color, label=label))
    if overlay is not None:
        groups = overlay.items() if isinstance(overlay, Mapping) else [(overlay_label, overlay)]
        markers = "oxs^vd"
        for index, (label, points) in enumerate(groups):
            points = np.asarray(points, dtype=np.complex128).ravel()
            handles.append(ax.scatter(points.real, points.imag, s=14, marker=markers[index % len(markers)],
                                      color="black" if index == 0 else colors[(index + 3) % len(colors)],
                                      label=label, zorder=3))
    ax.axhline(0.0, color="0.5", linewidth=0.6)
    ax.axvline(0.0, color="0.5", linewidth=0.6)
    ax.set_xlim(re_min, re_max)
    ax.set_ylim(im_min, im_max)
    ax.set_aspect("equal")
    ax.set_xlabel("Re(hλ)")
    ax.set_ylabel("Im(hλ)")
    ax.set_title("stability regions |R(hλ)| ≤ 1" + (" (shaded)" if filled else ""))
    ax.legend(handles=handles, loc="upper left", fontsize="small")
    return ax
