"""One settings object for a conversion: ``ODESettings``, its presets, its stored form, and the variants.

``ODESettings`` holds everything ``convert`` needs (solver, layers, step, field, root, grad, tol, eval_tol,
max_iter, solver_options), validated once when it is made, with the suggestions the solver registry gives::

    settings = ODESettings(solver="rk4", layers="0-2", step=0.5)
    ode_bert.convert(model, settings)                    # same as convert(model, "rk4", layers="0-2", ...)
    ode_bert.convert(model, ODESettings.preset("im"))    # IM-BERT, as ode_bert.im_bert(model)
    settings.to_dict()                                   # what model.config.ode_bert stores (versioned)
    ODESettings.from_dict(model.config.ode_bert)         # back, checked key by key

Everything else that names these settings is generated from here: the command line's solver flags (from
the fields' metadata), ``TrainConfig``'s solver fields (``OptionalSettings``) and which settings each
training variant takes (``settings_taken_by``, ``settings_for_variant``).

Importing this module imports no torch: the command line builds its parser from it before loading torch.
The checks against the solver registry (``solvers``, which imports torch) run when an ``ODESettings`` is
made. The registry's names are also kept here as plain tuples (``SOLVER_NAMES``, ``ROOT_FINDER_NAMES``,
``GRAD_MODES``) for the parser's choices; tests/test_settings.py checks they equal the registries.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .layers import parse_layers

if TYPE_CHECKING:
    from solvers import Method

# The registries' built-in names, for the command line's choices without importing torch (equality with
# solvers.available(), solvers.available_root_finders() and solvers.available_grad_modes() is tested).
SOLVER_NAMES: tuple[str, ...] = (
    "adaptive_heun", "bosh3", "dopri5", "dopri8", "euler", "heun", "implicit_euler", "implicit_midpoint",
    "midpoint", "rk4", "trapezoid",
)  # fmt: skip
ROOT_FINDER_NAMES: tuple[str, ...] = ("anderson", "broyden", "gd", "newton_krylov", "picard")
GRAD_MODES: tuple[str, ...] = ("implicit", "one_step", "unroll")
FRAMINGS: tuple[str, ...] = ("residual", "layer")  # the vector fields of ode_bert.field


def _suggest(name: str, choices: Sequence[str]) -> str:
    from solvers import suggest

    return suggest(name, list(choices))


def check_framing(framing: str) -> str:
    """Return ``framing`` if it is a known framing, else raise a ``ValueError`` listing the valid ones."""
    if not isinstance(framing, str) or framing not in FRAMINGS:
        hint = _suggest(framing, FRAMINGS) if isinstance(framing, str) else ""
        raise ValueError(f"Unknown field framing {framing!r}.{hint} Valid framings: {', '.join(FRAMINGS)}")
    return framing


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

# IM-BERT / EX-BERT defaults, chosen on held-out training data (RESULTS.md, "Choosing the IM-connection"):
# among residual/step 1, residual/step 0.5 and layer/step 0.25, fine-tuned IM-MiniLM scored best on a
# held-out part of its SST-2 training subset with field="residual", step 0.5, where the implicit equation
# z = (h + 0.5 Layer(z)) / 1.5 is also cheap to solve (a median of 9 Anderson evaluations per MiniLM layer
# to relative residual 1e-4, BENCHMARKS.md). The later search over layers and iteration caps (upper half,
# max_iter 10) did not separate from these on held-out data, so they stay. EX-BERT uses the same field and
# step, so the two differ only in the explicit vs implicit connection.
# The tolerance is 1e-2 since ode-bert 0.2.0 (it was 1e-4), chosen by evidence (issue 18, RESULTS.md "The
# tolerance alone"): SST-2 IM-BERT trained at 1e-2 scored no worse than at 1e-4 over 5 seeds,
# models trained at 1e-4 score the same evaluated at 1e-2, and a run costs about half (BENCHMARKS.md 5).
IM_BERT_LAYERS: str = "all"
IM_BERT_STEP: float = 0.5
IM_BERT_FIELD: str = "residual"
IM_BERT_TOL: float = 1e-2
IM_BERT_MAX_ITER: int = 20
# im_bert's tolerance before 0.2.0: what a training checkpoint that does not record its conversion (written
# before 0.2.0) was made with where its settings left the tolerance to the default
IM_BERT_TOL_BEFORE_0_2: float = 1e-4
EX_BERT_LAYERS: str = "all"
EX_BERT_STEP: float = IM_BERT_STEP
EX_BERT_FIELD: str = IM_BERT_FIELD

# Named settings: ODESettings.preset(name, **changes). Unnamed fields keep the ODESettings defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "im": {  # IM-BERT: implicit Euler IM-connections, h_next = h + step * f(h_next) (ode_bert.im_bert)
        "solver": "implicit_euler", "layers": IM_BERT_LAYERS, "step": IM_BERT_STEP, "field": IM_BERT_FIELD,
        "tol": IM_BERT_TOL, "max_iter": IM_BERT_MAX_ITER,
    },
    "ex": {  # EX-BERT, the explicit control: h + step * f(h) with IM-BERT's field and step (ode_bert.ex_bert)
        "solver": "euler", "layers": EX_BERT_LAYERS, "step": EX_BERT_STEP, "field": EX_BERT_FIELD,
    },
}  # fmt: skip


# Tolerances of the adaptive solvers (dopri5, bosh3, adaptive_heun, dopri8) inside ``convert`` when the
# user gives none; filled into ``solver_options``, so a saved model stores them. Measured on MiniLM with
# ``python -m bench.adaptive_defaults`` (docs/choosing-a-solver.md): at rtol 1e-3 a forward of every layer
# costs 21-44 layer evaluations per layer (the stock model: 1) and lands within 4e-3 (max abs, 6e-4 of the
# largest value) of a float64 solve of the same ODE, far inside the 1.8 by which that ODE's flow differs from
# the stock model; the solvers' own defaults (rtol 1e-7, atol 1e-9, torchdiffeq's) sit at float32's
# resolution: 81 (dopri5) to 981 (dopri8) evaluations per layer, and adaptive_heun exhausts its budget of
# 4,096 substeps. A configuration saved before the defaults were filled
# in has no rtol/atol: it loads with ``LEGACY_ADAPTIVE_TOLERANCES``, what it computed with (``from_dict``).
ADAPTIVE_DEFAULTS: dict[str, float] = {"rtol": 1e-3, "atol": 1e-5}
LEGACY_ADAPTIVE_TOLERANCES: dict[str, float] = {"rtol": 1e-7, "atol": 1e-9}


def is_adaptive(solver: str) -> bool:
    """Whether ``solver`` is a registered adaptive (error-controlled) method; imports ``solvers``."""
    from solvers import METHODS

    return bool(METHODS.lookup(solver).adaptive)


def _stored_adaptive(solver: Any) -> bool:
    """``is_adaptive`` for a stored solver name; ``False`` for an unknown one (``ODESettings`` reports it)."""
    try:
        return isinstance(solver, str) and is_adaptive(solver)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# The settings object
# --------------------------------------------------------------------------------------------------

# The settings passed to the step method under their own names (implicit solvers take them; explicit and
# adaptive ones do not). The method's other options go in ``solver_options``.
METHOD_SETTINGS: tuple[str, ...] = ("root", "grad", "tol", "max_iter")
# Solver options that only make training cheaper: the method of evaluation leaves them out, so gradients
# taken in evaluation (attacks, stability analysis) solve the adjoint to the evaluation tolerance.
TRAINING_ONLY_OPTIONS: tuple[str, ...] = ("adjoint_tol", "adjoint_max_iter")


def _setting(default: Any, help: str, type: Callable[[str], Any] | None = str,
             choices: Sequence[str] | None = None, unset: str | None = None) -> Any:  # fmt: skip
    """A field of ``ODESettings``; ``help``/``type``/``choices`` make its command-line flag (``type=None``:
    no flag), ``unset`` says in its help what a default of ``None`` means (else: the solver's default)."""
    metadata = {"help": help, "type": type, "choices": choices}
    if unset is not None:
        metadata["unset"] = unset
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ODESettings:
    """How ``convert`` turns encoder layers into ODE solver steps; checked when made (``ValueError`` or
    ``TypeError`` naming the setting and the valid choices, with a suggestion for a misspelt name).

    ``solver``: a step method of ``solvers.available()``. ``layers``: ``"all"``, ``"0-5"``, ``"0,2,4"``, a
    slice such as ``":-1"`` (all but the last) or a sequence of indices (a tuple once made). ``step``: the
    step size of every converted layer. ``field``: ``"residual"`` (``f = Layer(h) - h``; ``euler`` with step 1
    is the stock model) or ``"layer"`` (``f = Layer(h)``, the IM-BERT drawing). ``root``, ``grad``, ``tol``,
    ``max_iter``: the implicit solve (implicit solvers only; ``None`` = the solver's default). ``eval_tol``:
    the tolerance of that solve in evaluation, when the layers are not in training mode (``None``: ``tol``);
    training needs a tighter solve than evaluation (RESULTS.md, issue 18), and evaluation is most of a
    deployed model's cost. ``solver_options``: the method's other options, JSON-serialisable (e.g.
    ``rtol``/``atol`` of adaptive solvers, ``on_failure`` and ``root_options`` of implicit ones); an adaptive
    solver's unset ``rtol``/``atol`` are filled in from ``ADAPTIVE_DEFAULTS``.

    Frozen: change a copy with ``dataclasses.replace(settings, step=0.25)`` (checked again). ``to_dict``
    is the stored form (``model.config.ode_bert``), ``from_dict`` reads it back.
    """

    solver: str = _setting("implicit_euler", "step method", choices=SOLVER_NAMES)
    layers: str | tuple[int, ...] = _setting(
        "all", "layers to convert: 'all', '0-5', '0,2,4', ':-1' (a Python slice: all but the last)"
    )
    step: float = _setting(1.0, "step size h of every converted layer", type=float)
    field: str = _setting("residual", "vector field: Layer(h) - h (residual) or Layer(h) (layer)",
                          choices=FRAMINGS)  # fmt: skip
    root: str | None = _setting(None, "root finder of implicit solvers", choices=ROOT_FINDER_NAMES)
    grad: str | None = _setting(None, "gradient mode of implicit solvers", choices=GRAD_MODES)
    tol: float | None = _setting(None, "relative tolerance of the implicit solve", type=float)
    eval_tol: float | None = _setting(
        None, "relative tolerance of the implicit solve in evaluation (model.eval())", type=float, unset="tol"
    )
    max_iter: int | None = _setting(None, "iteration cap of the implicit solve", type=int)
    solver_options: dict[str, Any] = _setting({}, "other options of the step method", type=None)

    def __post_init__(self) -> None:
        check_framing(self.field)
        step = self.step
        if not _is_number(step) or not math.isfinite(step) or step <= 0:
            raise ValueError(f"step must be a positive finite number, got {step!r}")
        object.__setattr__(self, "step", float(step))
        layers = self.layers
        parse_layers(layers, None)  # the form; the range is checked against the model by convert
        if not isinstance(layers, str):
            object.__setattr__(self, "layers", tuple(layers))
        if not isinstance(self.solver_options, Mapping):
            raise TypeError(f"solver_options must be a dict, got {type(self.solver_options).__name__}")
        object.__setattr__(self, "solver_options", dict(self.solver_options))
        clash = sorted(set(self.solver_options) & set(SETTING_NAMES))
        if clash:
            raise ValueError(
                f"solver_options repeat the setting(s) {', '.join(clash)}: give them as settings, not options"
            )
        try:
            json.dumps(self.solver_options)
        except TypeError as err:
            raise TypeError(
                f"solver options must be JSON-serialisable (saved with the model): {err}"
            ) from None
        self.make_method()  # checks the solver, its options and their values against the registry
        if self.eval_tol is not None:  # its value, as the root finder checks tol's
            try:
                self.make_method(evaluation=True)
            except (ValueError, TypeError) as err:
                raise type(err)(f"eval_tol: {err}") from None
        if is_adaptive(self.solver):  # unset tolerances: the practical defaults, stored with the settings
            object.__setattr__(self, "solver_options", {**ADAPTIVE_DEFAULTS, **self.solver_options})

    # --- the step method --------------------------------------------------------------------------

    def method_options(self) -> dict[str, Any]:
        """The keyword options of the step method: ``solver_options`` and the set ``METHOD_SETTINGS``."""
        given = {name: getattr(self, name) for name in METHOD_SETTINGS if getattr(self, name) is not None}
        return {**self.solver_options, **given}

    @property
    def on_failure(self) -> str:
        """What a solve that stops short does: ``"warn"`` (the default), ``"raise"`` or ``"ignore"``
        (``solvers.ON_FAILURE``); ``"ignore"`` for methods without a failure policy (explicit, adaptive)."""
        from solvers import METHODS, option_names

        if "on_failure" not in option_names(METHODS.lookup(self.solver)):
            return "ignore"
        return self.solver_options.get("on_failure", "warn")

    @property
    def evaluates_apart(self) -> bool:
        """Whether evaluation uses a method of its own (``make_method(evaluation=True)`` differs): an
        ``eval_tol``, or a training-only option, is set."""
        return self.eval_tol is not None or any(k in self.solver_options for k in TRAINING_ONLY_OPTIONS)

    def make_method(self, on_failure: str | None = None, evaluation: bool = False) -> Method:
        """A new step method for these settings (``solvers.get``). ``on_failure``, if given, replaces the
        failure policy of a method that has one (``convert`` passes ``"ignore"`` and applies
        ``self.on_failure`` itself, naming the layer). ``evaluation``: the method of evaluation, which solves
        to ``eval_tol`` where that is set and leaves out ``TRAINING_ONLY_OPTIONS``."""
        import solvers

        cls = solvers.METHODS.lookup(self.solver)
        modes = solvers.available_grad_modes()
        if self.grad is not None and (not isinstance(self.grad, str) or self.grad not in modes):
            hint = _suggest(self.grad, modes) if isinstance(self.grad, str) else ""
            raise ValueError(f"Unknown gradient mode {self.grad!r}.{hint} Valid modes: {', '.join(modes)}")
        accepted = solvers.option_names(cls)
        misplaced = [k for k in METHOD_SETTINGS if getattr(self, k) is not None and k not in accepted]
        if self.eval_tol is not None and "tol" not in accepted:
            misplaced.append("eval_tol")
        if misplaced:
            implicit = [name for name, klass in solvers.METHODS.items() if klass.implicit]
            raise ValueError(
                f"option(s) {', '.join(misplaced)} apply to implicit solvers only "
                f"({', '.join(implicit) or 'none registered'}); solver {self.solver!r} does not take them"
            )
        options = self.method_options()
        if evaluation:
            options = {k: v for k, v in options.items() if k not in TRAINING_ONLY_OPTIONS}
            if self.eval_tol is not None:
                options["tol"] = self.eval_tol
        if "on_failure" in accepted:  # otherwise the registry rejects on_failure by name
            solvers.check_on_failure(options.get("on_failure", "warn"))
            if on_failure is not None:
                options["on_failure"] = on_failure
        return solvers.get(self.solver, **options)

    # --- presets and the stored form --------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **changes: Any) -> ODESettings:
        """The named settings of ``PRESETS`` (``"im"``: IM-BERT, ``"ex"``: EX-BERT), with ``changes``."""
        if name not in PRESETS:
            hint = _suggest(name, list(PRESETS)) if isinstance(name, str) else ""
            raise ValueError(f"Unknown preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``model.config.ode_bert``): every setting and ``"version": CONFIG_VERSION``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.layers, tuple):
            values["layers"] = list(self.layers)
        values["solver_options"] = copy.deepcopy(self.solver_options)
        return {"version": CONFIG_VERSION, **values}

    @classmethod
    def from_dict(cls, value: Any, source: str = "model.config") -> ODESettings:
        """Settings from their stored form, of any version this ode-bert reads (``check_stored_config``).

        ``source`` names where it came from (e.g. the config.json path) in the messages; settings the
        registry rejects are a ``ValueError`` (``TypeError``) saying they cannot be applied.
        """
        settings = check_stored_config(value, source)
        settings.pop("version")
        if _stored_adaptive(settings["solver"]):  # saved before ADAPTIVE_DEFAULTS: what it computed with
            settings["solver_options"] = {**LEGACY_ADAPTIVE_TOLERANCES, **settings["solver_options"]}
        try:
            return cls(**settings)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{CONFIG_KEY} in {source} cannot be applied: {err}") from err


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ODESettings))


# --------------------------------------------------------------------------------------------------
# The stored form: model.config.ode_bert, versioned
# --------------------------------------------------------------------------------------------------

CONFIG_KEY = "ode_bert"
# The stored configuration (``model.config.ode_bert``, saved in config.json) is versioned. Version 1 is every
# configuration saved before the "version" key existed: it has always had exactly ``CONFIG_KEYS_V1``, and
# loading requires all of them. Version 2 adds the "version" key. A key introduced in a later version goes
# into ``CONFIG_ADDED_KEYS`` with the version that introduced it, the default that reproduces what older
# versions did, and whether loading an older configuration says so: a configuration older than that version
# loads with the default (and a warning where the flag is set, for a default a user may not expect); a newer
# one must have the key. Unknown keys are an error (see ``check_stored_config``).
CONFIG_VERSION = 3
CONFIG_KEYS_V1: tuple[str, ...] = (
    "solver", "layers", "step", "field", "root", "grad", "tol", "max_iter", "solver_options"
)
# key -> (version that added it, default for older ones, warn when it is taken). eval_tol: an older model
# solves to its tol in evaluation as it always did, so nothing changes and there is nothing to warn about.
CONFIG_ADDED_KEYS: dict[str, tuple[int, Any, bool]] = {"eval_tol": (3, None, False)}


def not_a_dict(value: Any, source: str) -> str:
    """The message for a stored ``config.ode_bert`` that is not a JSON object."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return (
        f"{CONFIG_KEY} in {source} must be a JSON object of solver settings (as ode_bert.convert writes), "
        f"got {type(value).__name__} {shown}; re-save the model from ode_bert, or remove the key to load "
        f"the stock model"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "solver": (lambda v: isinstance(v, str), "a solver name (string)"),
    "layers": (
        lambda v: isinstance(v, str)
        or (isinstance(v, list) and all(_is_int(i) for i in v)),
        "a list of layer indices or a layer string such as 'all' or '0-5'",
    ),
    "step": (_is_number, "a number"),
    "field": (lambda v: isinstance(v, str), "a field framing name (string)"),
    "root": (lambda v: v is None or isinstance(v, str), "null or a root finder name (string)"),
    "grad": (lambda v: v is None or isinstance(v, str), "null or a gradient mode name (string)"),
    "tol": (lambda v: v is None or _is_number(v), "null or a number"),
    "eval_tol": (lambda v: v is None or _is_number(v), "null or a number"),
    "max_iter": (lambda v: v is None or _is_int(v), "null or an integer"),
    "solver_options": (lambda v: isinstance(v, dict), "a JSON object of solver options"),
}


def check_stored_config(value: Any, source: str = "model.config") -> dict[str, Any]:
    """Validate a stored ``config.ode_bert`` value and return the full settings of the current version.

    ``source`` names where it came from (e.g. the config.json path), for the messages. A configuration
    without a "version" key was saved before versioning and is read as version 1, which always had every
    key of ``CONFIG_KEYS_V1``. Missing keys, keys of the wrong type, unknown keys and versions newer than
    ``CONFIG_VERSION`` are ``ValueError`` naming the key and ``source``: a stored setting is never replaced
    by a default silently. Only a key added after the configuration's version (``CONFIG_ADDED_KEYS``) takes
    its documented default, which reproduces what that version computed (with a ``UserWarning`` where the
    key's entry asks for one). ``ODESettings.from_dict`` makes the settings object.

    Unknown keys are errors rather than warnings: every ode-bert that writes a key also writes a version
    that names it, so an unknown key at a known version is a typo or a hand edit, and ignoring it would
    load a model that computes something other than what was saved.
    """
    if not isinstance(value, dict):
        raise ValueError(not_a_dict(value, source))
    where = f"{CONFIG_KEY} in {source}"
    version = value.get("version", 1)
    check, expected = _TYPE_CHECKS["version"]
    if not check(version):
        raise ValueError(f"{where}: key 'version' must be {expected}, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"{where} has version {version}, written by a newer ode-bert; this ode-bert reads versions "
            f"1..{CONFIG_VERSION}: upgrade ode-bert to load this model"
        )
    added_by_then = {k for k, (added, _, _) in CONFIG_ADDED_KEYS.items() if added <= version}
    known = set(CONFIG_KEYS_V1) | added_by_then | ({"version"} if version >= 2 else set())
    unknown = [k for k in value if k not in known]
    if unknown:
        hints = "".join(_suggest(str(k), sorted(known)) for k in unknown)
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for config version {version}.{hints} "
            f"Valid keys: {', '.join(sorted(known))}"
        )
    required = list(CONFIG_KEYS_V1) + sorted(added_by_then)
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(map(repr, missing))}; config version {version} requires "
            f"{', '.join(required)}. The file is incomplete or was edited: re-save the model from ode_bert"
        )
    settings = dict(value)
    for key, (added, default, warn) in CONFIG_ADDED_KEYS.items():
        if key not in settings and warn:
            warnings.warn(
                f"{where} (config version {version}) has no {key!r}, added in version {added}: using "
                f"the default {default!r}, which is what older versions did",
                UserWarning,
                stacklevel=3,
            )
        if key not in settings:
            settings[key] = copy.deepcopy(default)
    for key, setting in settings.items():
        if key in _TYPE_CHECKS:
            check, expected = _TYPE_CHECKS[key]
            if not check(setting):
                raise ValueError(f"{where}: key {key!r} must be {expected}, got {setting!r}")
    settings["version"] = CONFIG_VERSION
    return settings


# --------------------------------------------------------------------------------------------------
# Solver changes at evaluation: where their results live
# --------------------------------------------------------------------------------------------------

# RUN_DIR/evals/<changes>/: what a run scored with other solver settings than the trained ones (``ode-bert
# eval --solver``, ``ode-bert attack --solver``), beside the run's own results (trained settings)
EVALS_DIR = "evals"


def changes_label(changes: Mapping[str, Any]) -> str:
    """The folder name of solver ``changes`` (``{"tol": 0.1}``: ``tol=0.1``): ``key=value`` pairs sorted by
    key, values as compact JSON."""
    return ",".join(f"{k}={json.dumps(changes[k], sort_keys=True).replace(' ', '')}" for k in sorted(changes))


def solver_changes_dir(run_dir: str | Path, changes: Mapping[str, Any]) -> Path:
    """``RUN_DIR/evals/<changes_label>``: a run's results evaluated or attacked with solver ``changes``."""
    return Path(run_dir) / EVALS_DIR / changes_label(changes)


# --------------------------------------------------------------------------------------------------
# Variants of training runs and comparisons
# --------------------------------------------------------------------------------------------------

VARIANT_DESCRIPTIONS: dict[str, str] = {
    "bert": "the stock model",
    "ex": "explicit Euler (EX-BERT)",
    "im": "implicit Euler (IM-BERT)",
    "ode": "any registered solver (ode_bert.convert)",
}
# The preset a variant converts with; None: "bert" (the stock model) and "ode" (the ODESettings defaults,
# with the solver the user chooses).
VARIANT_PRESETS: dict[str, str | None] = {"bert": None, "ex": "ex", "im": "im", "ode": None}
VARIANTS: tuple[str, ...] = tuple(VARIANT_DESCRIPTIONS)


def _check_variant(variant: str) -> None:
    if variant not in VARIANT_DESCRIPTIONS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def settings_taken_by(variant: str) -> tuple[str, ...]:
    """The ``ODESettings`` fields a variant takes from its user (``TrainConfig``, command-line flags), in
    field order. ``"bert"``: none (the stock model); ``"ode"``: all; a preset variant (``"ex"``, ``"im"``):
    what its preset's solver accepts (``option_names``), but not the solver, which the preset fixes. So
    ``"ex"`` (explicit Euler) takes ``layers``, ``step`` and ``field``; ``"im"`` all but ``solver``."""
    _check_variant(variant)
    if variant == "bert":
        return ()
    preset = VARIANT_PRESETS[variant]
    if preset is None:
        return SETTING_NAMES
    from solvers import METHODS, option_names

    accepted = set(option_names(METHODS.lookup(PRESETS[preset]["solver"])))
    taken = {"layers", "step", "field"} | (accepted & set(METHOD_SETTINGS))
    if "tol" in accepted:
        taken.add("eval_tol")
    if accepted - set(METHOD_SETTINGS):
        taken.add("solver_options")
    return tuple(name for name in SETTING_NAMES if name in taken)


def settings_for_variant(variant: str, **given: Any) -> ODESettings | None:
    """The conversion of ``variant`` with the settings ``given`` (``None`` for the stock model, ``"bert"``).

    ``given`` holds settings the user chose (``None`` and an empty ``solver_options`` count as not given);
    a setting the variant does not take (``settings_taken_by``) is a ``ValueError``, except the solver a
    preset variant fixes, given as that same solver.
    """
    _check_variant(variant)
    given = {k: v for k, v in given.items() if v is not None and not (k == "solver_options" and not v)}
    unknown = [k for k in given if k not in SETTING_NAMES]
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; settings: {', '.join(SETTING_NAMES)}")
    description, preset = VARIANT_DESCRIPTIONS[variant], VARIANT_PRESETS[variant]
    taken = settings_taken_by(variant)
    fixed = PRESETS[preset] if preset is not None else {}
    refused = [k for k, v in given.items() if k not in taken and not (k in fixed and fixed[k] == v)]
    if refused:
        got = ", ".join(f"{k}={given[k]!r}" for k in refused)
        if not taken:
            raise ValueError(f"variant {variant!r} is {description} and takes no solver options (got {got})")
        raise ValueError(
            f"variant {variant!r} is {description}: it takes {', '.join(taken)}, not {got}; use variant "
            f"'ode' to choose another solver and its options"
        )
    if variant == "bert":
        return None
    return ODESettings(**{**fixed, **given})


# TrainConfig's solver fields: every ODESettings field, None meaning "the variant's default" (an empty
# solver_options: none). A base class of ode_bert.train.TrainConfig, so its fields are not typed twice.
OptionalSettings = dataclasses.make_dataclass(
    "OptionalSettings",
    [
        (f.name, f"{f.type} | None", dataclasses.field(default=None))
        if f.name != "solver_options"
        else (f.name, f.type, dataclasses.field(default_factory=dict))
        for f in dataclasses.fields(ODESettings)
    ],
    namespace={
        "__doc__": "Every ``ODESettings`` field, ``None`` (``solver_options``: empty) when unset.",
        "__module__": __name__,
    },
)
