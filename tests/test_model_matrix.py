"""The architecture matrix of ``bench.model_matrix`` (tiny random configs) and the table it renders.

Each family is checked once (``row``, cached for the session): a family not listed as refused must pass every
check (identity with the stock model, im_bert train-mode forward and backward converged, rk4/dopri5, save
and load; decoders with a cache and ``generate()``), a family listed as refused must be refused at
``convert`` with its reason. ``docs/supported-models.md`` must be what the matrix renders now.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import pytest
import torch
import transformers

import ode_bert
from bench import model_matrix
from bench.model_matrix import ARCHITECTURES, ARCHITECTURES_BY_NAME, Row

DOC = Path(__file__).resolve().parents[1] / "docs" / "supported-models.md"


@functools.cache
def row(name: str) -> Row:
    """The checks of one family, run once per test session, on one thread and without touching the global
    RNG state (so the numbers are those of the documented command and other tests are unaffected)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return model_matrix.run_architecture(ARCHITECTURES_BY_NAME[name])
    finally:
        torch.set_num_threads(threads)


def test_the_matrix_covers_every_kind_of_family() -> None:
    kinds = {arch.kind for arch in ARCHITECTURES}
    assert kinds == {"encoder", "vision encoder", "audio encoder", "encoder stack", "decoder"}
    assert len([a for a in ARCHITECTURES if a.refused is None]) >= 30
    assert len(ARCHITECTURES_BY_NAME) == len(ARCHITECTURES)  # family names are unique


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES if a.refused is None])
def test_supported_family_passes_every_check(name: str) -> None:
    """Every check passes; a decoder listed with ``cache_refused`` has its cache refused with that reason."""
    result = row(name)
    expected = {"identity", "implicit", "rk4", "dopri5", "save/load"}
    assert {c.name for c in result.checks} == expected | ({"cache"} if result.arch.decoder else set())
    refused_cache = result.arch.cache_refused
    if refused_cache is not None:
        cache = result.check("cache")
        assert cache.outcome == "refused" and refused_cache in cache.detail, (
            f"{name}: the cache check is no longer refused with {refused_cache!r} ({cache.outcome}: "
            f"{cache.detail}); if it passes, drop cache_refused from its entry")
    problems = "\n".join(f"{c.name} ({c.outcome}): {c.detail}" for c in result.checks
                         if c.outcome != "pass" and not (c.name == "cache" and refused_cache))  # fmt: skip
    assert not problems, f"{name}:\n{problems}"


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES if a.refused is not None])
def test_refused_family_is_refused_at_convert_with_its_reason(name: str) -> None:
    result = row(name)
    arch = result.arch
    assert result.status == "refused", f"{name}: {[(c.name, c.outcome, c.detail) for c in result.checks]}"
    assert arch.refused in result.reason, result.reason


def test_a_conversion_that_changes_the_outputs_fails_the_identity_check(monkeypatch) -> None:
    convert = ode_bert.convert

    def half_step(model, solver, **settings):
        return convert(model, solver, **{**settings, "step": 0.5})

    monkeypatch.setattr(ode_bert, "convert", half_step)
    result = model_matrix.run_architecture(ARCHITECTURES_BY_NAME["BERT"])
    identity = result.check("identity")
    assert identity.outcome == "fail" and "differs from the stock model" in identity.detail
    assert result.status == "failing"


def test_a_type_error_in_the_forward_is_a_failure_not_a_refusal(monkeypatch) -> None:
    """Only ``convert``'s own ValueError/TypeError counts as a refusal; the same error types raised later,
    by the converted model's forward, are failures."""
    convert = ode_bert.convert

    def convert_then_break_layer_0(model, solver, **settings):
        convert(model, solver, **settings)

        def crash(*args, **kwargs):
            raise TypeError("layer 0 exploded")

        ode_bert.find_layers(model)[0].forward = crash
        return model

    monkeypatch.setattr(ode_bert, "convert", convert_then_break_layer_0)
    result = model_matrix.run_architecture(ARCHITECTURES_BY_NAME["BERT"])
    assert {c.outcome for c in result.checks} == {"fail"}
    assert all("layer 0 exploded" in c.detail for c in result.checks)


def test_a_stock_model_that_fails_on_the_inputs_is_an_error_of_the_matrix() -> None:
    arch = ARCHITECTURES_BY_NAME["ViT"]
    wrong = model_matrix.Architecture("ViT on text", arch.kind, arch.model_class, arch.config_class,
                                      arch.config)  # fmt: skip
    with pytest.raises(model_matrix.MatrixError, match="fails on the matrix inputs"):
        model_matrix.run_architecture(wrong)


def test_docs_table_is_what_the_matrix_renders_now() -> None:
    committed = DOC.read_text(encoding="utf-8")
    machine = next(line for line in committed.splitlines() if line.startswith(model_matrix.MACHINE_PREFIX))
    rendered = model_matrix.render([row(a.name) for a in ARCHITECTURES], machine)
    diff = "".join(difflib.unified_diff(committed.splitlines(True), rendered.splitlines(True), "committed",
                                        "rendered now", n=0))  # fmt: skip
    assert rendered == committed, f"{DOC.name} is out of date; run `{model_matrix.COMMAND}`:\n{diff}"


def test_the_command_prints_the_table_of_the_families_named(capsys: pytest.CaptureFixture[str]) -> None:
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    try:  # the command sets one thread and quiet transformers logging for its process: restore them here
        rows = model_matrix.main(["--only", "BERT", "Swin"])
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    assert [r.status for r in rows] == ["supported", "refused"]
    printed = capsys.readouterr().out
    assert "| BERT | encoder |" in printed and "- **Swin** (refused at `convert`)" in printed
    with pytest.raises(SystemExit):  # a partial table must not overwrite the committed one
        model_matrix.main(["--only", "BERT", "--write", "table.md"])
