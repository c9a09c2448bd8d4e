"""``ode-bert demo``: what the ODE view of a pretrained transformer shows, in about three minutes on a CPU.

Three measurements on the real all-MiniLM-L6-v2 and real SST-2 / AdvGLUE sst2 data, one panel each of
``demo.png``, with the numbers in ``demo.md`` and ``demo.json``:

1. **Stability regions and the layers' eigenvalues.** A residual layer ``h + f(h)`` is one explicit-Euler
   step of ``dh/dt = f(h)``. The rightmost eigenvalues of each layer's Jacobian ``df/dh`` (at one sentence)
   are drawn on the stability regions of explicit Euler (the stock model) and implicit Euler (IM-BERT):
   points with ``Re(lambda) > 0`` are modes the flow itself amplifies.
2. **Perturbation growth on AdvGLUE pairs.** ``||h'_l - h_l|| / ||h'_0 - h_0||`` layer by layer for the
   original and the adversarial sentence of real AdvGLUE sst2 pairs: the stock model, EX-BERT (explicit
   Euler, step 0.5) and IM-BERT (implicit Euler, step 0.5), the ``ode_bert`` presets, without training.
3. **What a classifier learns from each.** A logistic-regression head trained on the frozen, mean-pooled
   features of each model (several seeds: different stratified training subsets), scored on clean SST-2
   dev and on AdvGLUE sst2. Only the head is trained, so this takes seconds and the heads learn; the full
   fine-tuning comparison is ``ode-bert compare`` (``FULL_COMPARISON``).

``ode-bert`` finds the command through the ``ode_bert.commands`` entry point (it builds on ``ode_bert``
and ``stability_analysis``, which ``ode_bert`` never imports). Adding the arguments imports nothing heavy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

FULL_COMPARISON = (
    "ode-bert compare --task sst2 --variants bert,ex,im --seeds 1,2,3,4,5 --train-samples 1000 "
    "--output-dir runs/compare"
)
WHAT_THIS_SHOWS = """\
What this shows
  1. Regions: a residual layer is an explicit-Euler step (step 1). Every MiniLM layer's Jacobian has
     eigenvalues with positive real part (points right of the imaginary axis): directions the layer's
     own flow amplifies, so no solver damps them. Explicit Euler damps only inside its disk around -1,
     implicit Euler everywhere outside its disk around +1; these points lie inside the latter, where
     implicit Euler amplifies them too (1/|1 - hλ|, more than explicit Euler's |1 + hλ| for small hλ).
  2. Growth: how much a real AdvGLUE word substitution's difference grows through the layers, per model.
  3. Heads: a linear classifier on each model's frozen features, trained on a few hundred SST-2
     sentences per seed: clean and AdvGLUE accuracy and the paired differences to the stock model.
  This is the pretrained encoder run with each connection, not trained with it; the full fine-tuning
  comparison (3 variants x 5 seeds of fine-tuning on 1,000 sentences) is one command:
    {command}"""


@dataclass(frozen=True)
class DemoSizes:
    """How much each part measures (the defaults fit about three minutes on two CPU cores)."""

    pairs: int = 16  # AdvGLUE sst2 pairs for the growth curves
    train: int = 200  # training sentences per seed for the heads
    pool: int = 400  # SST-2 training sentences featurised; each seed draws its subset from them
    dev: int = 200  # clean SST-2 dev sentences scored
    seeds: int = 5
    eigenvalues: int = 2  # rightmost eigenvalues per layer
    max_length: int = 48


QUICK = DemoSizes(pairs=4, train=40, pool=80, dev=40, seeds=3, eigenvalues=2, max_length=24)
SPECTRUM_SENTENCE = "a gripping , intelligent thriller ."  # short: the Jacobian is tokens x 384 square

# The three models: label -> the ode_bert preset (None: the stock model, Euler with step 1).
MODELS: dict[str, str | None] = {
    "stock (Euler, step 1)": None,
    "EX-BERT (Euler, step 0.5)": "ex",
    "IM-BERT (implicit Euler, step 0.5)": "im",
}


def _solver_of(preset: str | None) -> tuple[str, float, dict[str, Any]]:
    """``(solver, step, other settings)`` of a preset, as ``perturbation_growth`` takes them."""
    from ode_bert import ODESettings

    if preset is None:
        return "euler", 1.0, {}
    settings = ODESettings.preset(preset)
    others = {k: getattr(settings, k) for k in ("root", "grad", "tol", "max_iter") if getattr(settings, k)}
    return settings.solver, settings.step, others


def demo_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], dict[str, Any]]:
    """a three-minute tour on CPU: stability regions with MiniLM's eigenvalues, perturbation growth, heads

    Adds the ``demo`` options to ``parser`` and returns the handler (an ``ode_bert.commands`` entry point).
    """
    parser.add_argument("--out", "--output-dir", dest="out", default="runs/demo",
                        help="output folder for demo.png, demo.md and demo.json (default runs/demo)")
    parser.add_argument("--model", help="hub name or local path (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", help="data directory (default: $ODE_BERT_DATA_DIR or ../shared/data)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (seconds)")
    defaults = DemoSizes()
    parser.add_argument("--pairs", type=int, default=defaults.pairs,
                        help=f"AdvGLUE sst2 pairs for the growth curves (default {defaults.pairs})")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help=f"training subsets (seeds) per classifier head (default {defaults.seeds})")
    parser.add_argument("--train", type=int, default=defaults.train,
                        help=f"training sentences per seed (default {defaults.train})")
    return run_demo


def _sizes(args: argparse.Namespace) -> DemoSizes:
    """The sizes the options ask for, checked before any work."""
    if args.quick:
        return QUICK
    sizes = replace(DemoSizes(), pairs=args.pairs, seeds=args.seeds, train=args.train,
                    pool=max(DemoSizes().pool, 2 * args.train))
    if sizes.pairs < 2 or sizes.seeds < 2 or sizes.train < 10:
        raise ValueError(f"--pairs and --seeds must be >= 2 and --train >= 10; got {sizes.pairs}, "
                         f"{sizes.seeds}, {sizes.train}")
    return sizes


def _done(part: str, start: tuple[float, float], text: str) -> None:
    """Print a part's result line with its wall and CPU seconds (``start``: ``_clock()`` when it began)."""
    wall, cpu = (now - then for now, then in zip(_clock(), start, strict=True))
    print(f"[{part}] {text} ({wall:.0f} s; CPU {cpu:.0f} s)", flush=True)


def _clock() -> tuple[float, float]:
    """Wall and process CPU time: on a shared machine the CPU time shows what the work itself costs."""
    return time.perf_counter(), time.process_time()


# --------------------------------------------------------------------------------------------------
# 1. Stability regions with the layers' rightmost eigenvalues
# --------------------------------------------------------------------------------------------------


def rightmost_eigenvalues(model: Any, tokenizer: Any, sentence: str, k: int) -> list[Any]:
    """Per encoder layer, the ``k`` rightmost eigenvalues of its residual field's Jacobian at ``sentence``
    (linearised at the layer's input on the stock forward)."""
    import numpy as np
    import torch

    from ode_bert import LayerField

    from .spectra import JacobianOperator, leading_eigenvalues

    ids = tokenizer([sentence], return_tensors="pt")["input_ids"]
    captured = LayerField.capture(model, "residual", input_ids=ids, attention_mask=torch.ones_like(ids))
    result = []
    with one_thread():
        for field, h in captured:
            operator = JacobianOperator(lambda x, f=field: f(0.0, x), h)
            result.append(np.asarray(leading_eigenvalues(operator, k, which="LR")))
    return result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside: on one sentence or a few short ones a second thread only adds
    synchronisation (measured: 13 s of CPU for part 1 on one thread, 85 s on two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def amplification(eigenvalues: Any) -> dict[str, Any]:
    """``|R(step * lambda)|`` per eigenvalue for the three models' steps: how much one layer's step multiplies
    a perturbation along that eigenvector of the linearised field (``> 1``: it grows)."""
    import numpy as np

    z = np.asarray(eigenvalues, dtype=np.complex128)
    return {
        "stock (Euler, step 1)": np.abs(1 + z),
        "EX (Euler, step 0.5)": np.abs(1 + 0.5 * z),
        "IM (implicit Euler, step 0.5)": 1 / np.abs(1 - 0.5 * z),
    }


# --------------------------------------------------------------------------------------------------
# 3. Classifier heads on frozen features
# --------------------------------------------------------------------------------------------------


def sentence_features(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, label: str,
                      batch_size: int = 32) -> Any:
    """Mean-pooled last hidden states over the real tokens (all-MiniLM-L6-v2's sentence embedding), with
    a progress bar; ``(len(texts), hidden)`` float64, in the order of ``texts``.

    Batches hold sentences of similar length (sorted by token count), so little of the work is padding.
    """
    import torch
    from tqdm.auto import tqdm

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    features = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc=f"features {label}", unit="batch",
                          leave=False):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][:, :, None].to(hidden.dtype)
            features[rows] = ((hidden * mask).sum(1) / mask.sum(1)).double()
    return features


def fit_head(features: Any, labels: Any, weight_decay: float = 1e-2, steps: int = 200
             ) -> Callable[[Any], Any]:
    """Logistic regression (L2 penalty ``weight_decay``) on standardised features, by L-BFGS (convex: the
    optimum does not depend on the start); returns the function that predicts labels."""
    import torch

    mean, scale = features.mean(0), features.std(0).clamp_min(1e-8)
    x = (features - mean) / scale
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> Any:
        optimizer.zero_grad()
        penalty = weight_decay * weight.pow(2).sum()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + penalty
        value.backward()
        return value

    optimizer.step(loss)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: (((f - mean) / scale) @ weight + bias).argmax(1)


@dataclass
class HeadScores:
    """Accuracy (%) of one model's heads, one value per seed."""

    label: str
    clean: list[float]
    advglue: list[float]
    seconds: float  # featurising all sentences with this model


def _accuracy(predicted: Any, labels: Any) -> float:
    return 100.0 * float((predicted == labels).double().mean())


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three parts, write ``demo.png``, ``demo.md`` and ``demo.json`` into ``args.out``."""
    sizes = _sizes(args)
    out = Path(args.out)
    from ode_bert.data import check_data

    check_data("sst2", args.data_dir)  # a missing data file is an error before any work
    out.mkdir(parents=True, exist_ok=True)
    begin = _clock()
    print(f"ode-bert demo: all-MiniLM-L6-v2, SST-2 and AdvGLUE sst2, on CPU; writes {out}/demo.png, demo.md "
          f"and demo.json", flush=True)  # fmt: skip
    import copy
    import warnings

    import numpy as np
    import torch

    import ode_bert
    import solvers
    from ode_bert.data import load_advglue, load_clean_dev, load_train, stratified_subset
    from ode_bert.experiments.stats import paired_difference

    from .perturbation import perturbation_growth

    torch.manual_seed(0)
    model, tokenizer = ode_bert.load_model(args.model)
    model.eval()
    report: dict[str, Any] = {"model": args.model or ode_bert.DEFAULT_MODEL, "sizes": sizes.__dict__}

    # 1. eigenvalues
    start = _clock()
    eigenvalues = rightmost_eigenvalues(model, tokenizer, SPECTRUM_SENTENCE, sizes.eigenvalues)
    abscissae = [float(values.real.max()) for values in eigenvalues]
    report["eigenvalues"] = {"sentence": SPECTRUM_SENTENCE, "which": "rightmost (largest real part)",
                             "per_layer": [[[v.real, v.imag] for v in vals.tolist()] for vals in eigenvalues],
                             "spectral_abscissa": abscissae}  # fmt: skip
    rightmost = np.array([values[np.argmax(values.real)] for values in eigenvalues])
    factors = amplification(rightmost)
    report["eigenvalues"]["amplification_of_rightmost_mode"] = {k: v.tolist() for k, v in factors.items()}
    _done("1/3 regions", start, "largest real part of each layer's Jacobian eigenvalues (spectral abscissa): "
          + ", ".join(f"{a:+.2f}" for a in abscissae) + "; one step multiplies that mode by "
          + "; ".join(f"{k} {v.min():.2f}-{v.max():.2f}" for k, v in factors.items()))

    # 2. growth on AdvGLUE pairs
    curves = {}
    unconverged: dict[str, int] = {}
    for label, preset in MODELS.items():
        start = _clock()
        solver, step, extra = _solver_of(preset)
        with warnings.catch_warnings(record=True) as caught, one_thread():
            warnings.simplefilter("always", solvers.ConvergenceWarning)
            curve = perturbation_growth(
                model, tokenizer, None, [solver], "advglue", max_length=sizes.max_length, step=step,
                convert_options={solver: extra}, max_pairs=sizes.pairs, data_dir=args.data_dir,
            )[solver]  # fmt: skip
        unconverged[label] = sum(issubclass(w.category, solvers.ConvergenceWarning) for w in caught)
        curves[label] = replace(curve, solver=label)
        residual = "" if curve.max_residual is None else f", worst root residual {curve.max_residual:.1e}"
        _done("2/3 growth", start, f"{label}: median growth at the last layer {curve.median[-1]:.2f} over "
              f"{curve.ratios.shape[0]} AdvGLUE pairs{residual}")
    report["growth"] = {label: curve.to_dict() for label, curve in curves.items()}
    report["growth_unconverged_layer_solves"] = unconverged

    # 3. heads on frozen features
    pool = stratified_subset(load_train("sst2", args.data_dir), sizes.pool, seed=0)
    dev = stratified_subset(load_clean_dev("sst2", args.data_dir)["sst2"], sizes.dev, seed=0)
    adversarial = load_advglue("sst2", args.data_dir)["sst2"]
    texts = [ex.text_a for ex in [*pool, *dev, *adversarial]]
    labels = torch.tensor([ex.label for ex in [*pool, *dev, *adversarial]])
    parts = {"pool": slice(0, len(pool)), "dev": slice(len(pool), len(pool) + len(dev)),
             "adv": slice(len(pool) + len(dev), len(texts))}  # fmt: skip
    subsets = [_subset_indices(pool, sizes.train, seed) for seed in range(1, sizes.seeds + 1)]
    scores: list[HeadScores] = []
    for label, preset in MODELS.items():
        start = _clock()
        converted = copy.deepcopy(model)
        if preset is not None:
            ode_bert.convert(converted, ode_bert.ODESettings.preset(preset))
        with warnings.catch_warnings():  # unconverged solves are counted in part 2
            warnings.simplefilter("ignore", solvers.ConvergenceWarning)
            features = sentence_features(converted, tokenizer, texts, sizes.max_length, label.split(" ")[0])
        seconds = time.perf_counter() - start[0]
        clean, adv = [], []
        for indices in subsets:
            predict = fit_head(features[parts["pool"]][indices], labels[parts["pool"]][indices])
            clean.append(_accuracy(predict(features[parts["dev"]]), labels[parts["dev"]]))
            adv.append(_accuracy(predict(features[parts["adv"]]), labels[parts["adv"]]))
        scores.append(HeadScores(label, clean, adv, seconds))
        _done("3/3 heads", start, f"{label}: clean dev {np.mean(clean):.1f} ± {np.std(clean, ddof=1):.1f}, "
              f"AdvGLUE sst2 {np.mean(adv):.1f} ± {np.std(adv, ddof=1):.1f} ({sizes.seeds} seeds)")
    majority = {name: 100.0 * max(float((labels[part] == c).double().mean()) for c in (0, 1))
                for name, part in (("dev", parts["dev"]), ("adv", parts["adv"]))}  # fmt: skip
    base = scores[0]
    differences = {s.label: {"clean": paired_difference(s.clean, base.clean),
                             "advglue": paired_difference(s.advglue, base.advglue)} for s in scores[1:]}
    report["heads"] = {"scores": [s.__dict__ for s in scores], "majority": majority,
                       "differences_to_stock": differences, "dev": len(dev), "advglue": len(adversarial),
                       "train_per_seed": sizes.train}  # fmt: skip

    _figure(out / "demo.png", eigenvalues, curves, scores, majority)
    elapsed = (time.perf_counter() - begin[0], time.process_time() - begin[1])
    markdown = _markdown(report, scores, differences, majority, curves, elapsed)
    (out / "demo.md").write_text(markdown, encoding="utf-8")
    report["seconds"] = time.perf_counter() - begin[0]
    report["cpu_seconds"] = time.process_time() - begin[1]
    (out / "demo.json").write_text(json.dumps(report, indent=1, default=_plain) + "\n", encoding="utf-8")
    print()
    print(WHAT_THIS_SHOWS.format(command=FULL_COMPARISON))
    print(f"\nwrote {out / 'demo.png'}, demo.md, demo.json ({report['seconds']:.0f} s in all; CPU "
          f"{report['cpu_seconds']:.0f} s)")
    return report


def _subset_indices(pool: Sequence[Any], n: int, seed: int) -> list[int]:
    """Indices of a stratified random subset of ``n`` of ``pool`` (``ode_bert.data.stratified_subset``)."""
    from ode_bert.data import stratified_subset

    tagged = [replace(ex, text_b=str(index)) for index, ex in enumerate(pool)]
    return [int(ex.text_b) for ex in stratified_subset(tagged, n, seed)]


def _plain(value: Any) -> Any:
    """JSON for numpy values and infinities."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _figure(path: Path, eigenvalues: list[Any], curves: dict[str, Any], scores: list[HeadScores],
            majority: dict[str, float]) -> None:
    """The three panels of ``demo.png``."""
    import numpy as np
    from matplotlib.figure import Figure

    from .perturbation import plot_growth
    from .regions import plot_stability_region

    figure = Figure(figsize=(17, 5.4))
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.1, 0.9]})
    overlay = {f"layer {i} (α = {values.real.max():+.2f})": values for i, values in enumerate(eigenvalues)}
    plot_stability_region(["euler", "implicit_euler"], ax=axes[0], overlay=overlay, extent=(-3, 3, -2.5, 2.5),
                          resolution=201)
    axes[0].set_title("1. stability regions |R(λ)| ≤ 1 (step 1, shaded)\n"
                      "points: rightmost eigenvalues λ of each layer's Jacobian", fontsize="medium")
    for x, y, text, where in ((-1, -1.35, "explicit Euler (stock):\ninside the disk", "top"),
                              (1, 1.35, "implicit Euler (IM):\noutside the disk", "bottom")):
        axes[0].text(x, y, text, ha="center", va=where, fontsize="small")
    for text in axes[0].get_legend().get_texts():
        text.set_fontsize("x-small")
    plot_growth(curves, ax=axes[1])
    for text in axes[1].get_legend().get_texts():
        text.set_fontsize("x-small")
    pairs = next(iter(curves.values())).ratios.shape[0]
    spread = axes[1].get_title().splitlines()[-1]  # plot_growth's: lines per pair, or a quantile band
    axes[1].set_title(f"2. growth of a real AdvGLUE substitution ({pairs} pairs)\n{spread}",
                      fontsize="medium")
    ax = axes[2]
    positions = np.arange(len(scores))
    bars = (("clean", "clean dev", "C0"), ("advglue", "AdvGLUE sst2", "C3"))
    for offset, (key, name, color) in enumerate(bars):
        x = positions + (offset - 0.5) * 0.35
        values = [getattr(s, key) for s in scores]
        ax.bar(x, [np.mean(v) for v in values], width=0.33, color=color, alpha=0.5, label=name)
        for xi, v in zip(x, values, strict=True):
            ax.scatter(np.full(len(v), xi), v, color=color, s=10, zorder=3)
    ax.axhline(majority["dev"], color="C0", linestyle=":", linewidth=1, label="majority class, dev")
    ax.axhline(majority["adv"], color="C3", linestyle=":", linewidth=1, label="majority class, AdvGLUE")
    ax.set_xticks(positions, [s.label.split(" (")[0] for s in scores])
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("3. linear head on frozen features\n(bars: mean; dots: seeds)", fontsize="medium")
    ax.legend(fontsize="x-small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _interval(difference: dict[str, Any]) -> str:
    if difference["ci_low"] is None:
        return f"{difference['mean']:+.1f}"
    return f"{difference['mean']:+.1f} [{difference['ci_low']:+.1f}, {difference['ci_high']:+.1f}]"


def _markdown(report: dict[str, Any], scores: list[HeadScores], differences: dict[str, Any],
              majority: dict[str, float], curves: dict[str, Any], seconds: tuple[float, float]) -> str:
    """``demo.md``: the numbers behind ``demo.png`` and how to read them."""
    sizes = report["sizes"]
    abscissae = report["eigenvalues"]["spectral_abscissa"]
    lines = [
        "# ode-bert demo", "",
        f"Model: {report['model']}. Measured in {seconds[0]:.0f} s (CPU time of this process "
        f"{seconds[1]:.0f} s). ![demo](demo.png)", "",
        "## 1. Rightmost eigenvalues of each layer's Jacobian", "",
        f"At the sentence \"{report['eigenvalues']['sentence']}\", field `Layer(h) - h` (a residual layer is "
        "one explicit-Euler step of it with step 1). Spectral abscissa (largest real part) per layer: "
        + ", ".join(f"layer {i}: {a:+.2f}" for i, a in enumerate(abscissae)) + ". "
        "A positive real part is a direction the layer's flow amplifies; one step of explicit Euler "
        "multiplies it by |1 + hλ|, one of implicit Euler by 1/|1 - hλ|. For each layer's rightmost mode: "
        + "; ".join(f"{name} {min(v):.2f} to {max(v):.2f}"
                    for name, v in report["eigenvalues"]["amplification_of_rightmost_mode"].items())
        + (" (all > 1: the step amplifies it, implicit or not)." if all(
            min(v) > 1 for v in report["eigenvalues"]["amplification_of_rightmost_mode"].values())
           else " (> 1: that step amplifies the mode; < 1: it damps it)."), "",
        f"## 2. Growth of real AdvGLUE substitutions ({sizes['pairs']} sst2 pairs)", "",
        "| model | median growth, last layer | 10-90% of pairs | worst root residual |", "|---|---|---|---|",
    ]  # fmt: skip
    for label, curve in curves.items():
        residual = "-" if curve.max_residual is None else f"{curve.max_residual:.1e}"
        lines.append(f"| {label} | {curve.median[-1]:.2f} | {curve.quantile(0.1)[-1]:.2f} - "
                     f"{curve.quantile(0.9)[-1]:.2f} | {residual} |")
    unconverged = report["growth_unconverged_layer_solves"]
    if any(unconverged.values()):
        lines += ["", "Implicit solves that stopped short of their tolerance (warnings): "
                  + ", ".join(f"{k}: {v}" for k, v in unconverged.items() if v) + "."]
    lines += [
        "",
        f"## 3. Linear heads on frozen features ({sizes['seeds']} seeds x {sizes['train']} sentences)",
        "",
        f"Clean: {report['heads']['dev']} SST-2 dev sentences (majority class {majority['dev']:.1f}%); "
        f"AdvGLUE sst2: all {report['heads']['advglue']} items (majority class {majority['adv']:.1f}%). "
        "Mean ± standard deviation over seeds; differences to the stock model paired by seed, 95% t "
        "interval.",
        "", "| model | clean dev | AdvGLUE sst2 | clean − stock | AdvGLUE − stock | featurising |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    import numpy as np

    for s in scores:
        diff = differences.get(s.label)
        lines.append(
            f"| {s.label} | {np.mean(s.clean):.1f} ± {np.std(s.clean, ddof=1):.1f} | "
            f"{np.mean(s.advglue):.1f} ± {np.std(s.advglue, ddof=1):.1f} | "
            f"{_interval(diff['clean']) if diff else 'baseline'} | "
            f"{_interval(diff['advglue']) if diff else 'baseline'} | {s.seconds:.0f} s |"
        )
    lines += ["", "Only the head is trained (the encoders are the pretrained weights run with each "
              f"connection). The fine-tuning comparison: `{FULL_COMPARISON}`.", ""]
    return "\n".join(lines)
