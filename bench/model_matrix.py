"""Which Hugging Face architectures ``ode_bert.convert`` handles, checked on tiny random configs.

Every architecture is built in code from a tiny random config (hidden size 32, 2 layers, a small vocabulary;
nothing downloads) and put through the same checks:

* ``identity``: ``convert(model, "euler", field="residual", step=1)`` against the stock model's outputs on
  a padded batch, every layer converted (bit-identical, or equal up to float rounding, with the size);
* ``implicit``: ``im_bert`` (``max_iter=IMPLICIT_MAX_ITER``, ``tol=IMPLICIT_SOLVE_TOL``) in train mode
  (dropout on), forward and backward: finite loss and gradients, every converted layer reached by the
  gradient, every root solve converged, one solver record per sequence; and whether the padding positions
  were held fixed;
* ``rk4``: forward and backward finite; ``dopri5``: forward finite;
* ``save/load``: ``ode_bert.save_pretrained`` then ``ode_bert.from_pretrained`` gives identical outputs;
* decoders, ``cache``: with ``use_cache=True``, euler/residual/step 1 generates the stock model's tokens; rk4
  and ``im_bert`` decode the last token with a cache as they compute it without one, and ``generate()``
  gives the same tokens with and without a cache.

A check that ``ode_bert.convert`` refuses with a ``ValueError`` or ``TypeError`` is a *refusal* (the row keeps
the message); any other error, or the same error types raised later (by the converted model's forward), a
non-finite value, an unconverged solve or a wrong output is a *failure*. ``Architecture.refused`` marks the
families that are meant to be refused, with a substring of the reason. ``docs/supported-models.md`` is this
module's rendering (``tests/test_model_matrix.py`` checks that it is current):

    python -m bench.model_matrix                                  # print the table
    python -m bench.model_matrix --write docs/supported-models.md # regenerate the committed table
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

import ode_bert
from ode_bert.field import split_hidden

VOCAB = 99
BATCH, TOKENS, PADDED = 2, 8, 3  # two sequences of 8 tokens; the second has 3 padding positions
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
           "use_cache": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
IDENTITY_TOL = 1e-5  # relative to the output's largest magnitude: float32 rounding of the residual framing
CACHE_TOL = 1e-5  # explicit methods: logits with and without a cache, relative to their largest magnitude
IMPLICIT_MAX_ITER = 50  # the preset's 20 is not always enough for the first layer of a random tiny model
IMPLICIT_SOLVE_TOL = 1e-4  # the checks test the mechanism: tighter than the preset's 1e-2 (ode-bert 0.2.0)
IMPLICIT_CACHE_TOL = 1e-3  # implicit: the cached positions come from their own solves, each to tolerance 1e-4


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """One family: how to build its tiny random model and inputs, and whether it is meant to be refused."""

    name: str  # family name as the table shows it
    kind: str  # "encoder", "vision encoder", "audio encoder", "encoder stack", "decoder"
    model_class: str  # transformers class name
    config_class: str
    config: dict[str, Any]
    inputs: str = "text"  # key of INPUTS
    refused: str | None = None  # a substring of the refusal's message, for families meant to be refused
    note: str = ""
    stack: str | None = None  # where the converted blocks must be found, when the model has several stacks
    cache_refused: str | None = None  # decoders whose cache is meant to be refused: a substring of the reason
    convert_options: dict[str, Any] = field(default_factory=dict)  # keywords of every convert: layers_path

    @property
    def decoder(self) -> bool:
        return self.kind == "decoder"

    def build(self) -> nn.Module:
        """The tiny random model in eval mode (seeded, so every build gives the same weights)."""
        config = getattr(transformers, self.config_class)(**self.config)
        torch.manual_seed(0)
        return getattr(transformers, self.model_class)(config).eval()


def _text(name: str, model: str, config: str, kind: str = "encoder", **changes: Any) -> Architecture:
    note = changes.pop("note", "")
    refused = changes.pop("refused", None)
    inputs = changes.pop("inputs", "text")
    return Architecture(name, kind, model, config, {**TEXT, **changes}, inputs, refused, note)


def _decoder(name: str, model: str, config: str, **changes: Any) -> Architecture:
    note = changes.pop("note", "")
    cache_refused = changes.pop("cache_refused", None)
    return Architecture(name, "decoder", model, config, {**DECODER, **changes}, "causal", None, note,
                        cache_refused=cache_refused)


_AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "conv_dim": (16, 16), "conv_stride": (5, 4), "conv_kernel": (10, 4), "num_conv_pos_embeddings": 8,
          "num_conv_pos_embedding_groups": 4, "vocab_size": VOCAB, "mask_time_prob": 0.0}  # fmt: skip
_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "image_size": 32, "patch_size": 8}  # fmt: skip
_BART = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
         "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
         "decoder_ffn_dim": 64, "max_position_embeddings": 64}  # fmt: skip
_T5 = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}

ARCHITECTURES: tuple[Architecture, ...] = (
    # text encoders
    _text("BERT", "BertForSequenceClassification", "BertConfig"),
    _text("RoBERTa", "RobertaModel", "RobertaConfig", pad_token_id=1),
    _text("XLM-RoBERTa", "XLMRobertaModel", "XLMRobertaConfig", pad_token_id=1),
    _text("XLM-RoBERTa-XL", "XLMRobertaXLModel", "XLMRobertaXLConfig", pad_token_id=1),
    _text("CamemBERT", "CamembertModel", "CamembertConfig", pad_token_id=1),
    _text("Data2VecText", "Data2VecTextModel", "Data2VecTextConfig", pad_token_id=1),
    _text("DeBERTa", "DebertaModel", "DebertaConfig"),
    _text("DeBERTa-v2", "DebertaV2Model", "DebertaV2Config"),
    _text("MPNet", "MPNetModel", "MPNetConfig", pad_token_id=1),
    _text("ModernBERT", "ModernBertModel", "ModernBertConfig", pad_token_id=0),
    _text("Longformer", "LongformerModel", "LongformerConfig", attention_window=4, pad_token_id=1),
    _text("BigBird", "BigBirdModel", "BigBirdConfig", attention_type="original_full"),
    _text("ESM", "EsmModel", "EsmConfig", pad_token_id=1),
    _text("ELECTRA", "ElectraModel", "ElectraConfig", embedding_size=32),
    _text("DistilBERT", "DistilBertModel", "DistilBertConfig", dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    _text("ALBERT", "AlbertModel", "AlbertConfig", embedding_size=16,
          note="one layer module, called at both steps"),
    _text("ALBERT, 2 groups", "AlbertModel", "AlbertConfig", embedding_size=16, num_hidden_layers=4,
          num_hidden_groups=2, note="4 layers, `num_hidden_groups=2`: each group's module called at 2 steps"),
    _text("ERNIE", "ErnieModel", "ErnieConfig"),
    _text("RemBERT", "RemBertModel", "RemBertConfig", input_embedding_size=16, output_embedding_size=16),
    _text("RoFormer", "RoFormerModel", "RoFormerConfig"),
    _text("ConvBERT", "ConvBertModel", "ConvBertConfig", embedding_size=32),
    _text("MobileBERT", "MobileBertModel", "MobileBertConfig", embedding_size=32, intra_bottleneck_size=32,
          num_feedforward_networks=1),
    _text("MegatronBERT", "MegatronBertModel", "MegatronBertConfig"),
    _text("Nystromformer", "NystromformerModel", "NystromformerConfig", num_landmarks=TOKENS,
          segment_means_seq_len=TOKENS),
    _text("FNet", "FNetModel", "FNetConfig", note="no attention mask"),
    Architecture("XLNet", "encoder", "XLNetModel", "XLNetConfig",
                 {"vocab_size": VOCAB, "d_model": 32, "n_layer": 2, "n_head": 4, "d_inner": 64,
                  "pad_token_id": 3},
                 note="sequence-first hidden states"),
    # encoder stacks of seq2seq models
    Architecture("T5 encoder", "encoder stack", "T5EncoderModel", "T5Config", _T5, stack="encoder.block"),
    Architecture("mT5 encoder", "encoder stack", "MT5EncoderModel", "MT5Config", _T5, stack="encoder.block"),
    Architecture("BART encoder", "encoder stack", "BartForSequenceClassification", "BartConfig",
                 {**_BART, "eos_token_id": 2}, "text_eos",
                 note="the encoder of `BartForSequenceClassification`; the decoder stays stock",
                 stack="model.encoder.layers"),
    Architecture("mBART encoder", "encoder stack", "MBartForSequenceClassification", "MBartConfig",
                 {**_BART, "eos_token_id": 2}, "text_eos",
                 note="the encoder of `MBartForSequenceClassification`; the decoder stays stock",
                 stack="model.encoder.layers"),
    Architecture("Whisper encoder", "encoder stack", "WhisperForAudioClassification", "WhisperConfig",
                 {**_BART, "num_mel_bins": 8, "max_source_positions": 16, "pad_token_id": 0,
                  "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}, "features",
                 stack="encoder.layers"),
    # vision and audio encoders
    Architecture("ViT", "vision encoder", "ViTModel", "ViTConfig", _VISION, "pixels"),
    Architecture("DeiT", "vision encoder", "DeiTModel", "DeiTConfig", _VISION, "pixels"),
    Architecture("BEiT", "vision encoder", "BeitModel", "BeitConfig", _VISION, "pixels"),
    Architecture("DINOv2", "vision encoder", "Dinov2Model", "Dinov2Config", _VISION, "pixels"),
    Architecture("Wav2Vec2", "audio encoder", "Wav2Vec2Model", "Wav2Vec2Config", _AUDIO, "audio"),
    Architecture("HuBERT", "audio encoder", "HubertModel", "HubertConfig", _AUDIO, "audio"),
    Architecture("WavLM", "audio encoder", "WavLMModel", "WavLMConfig", {**_AUDIO, "num_buckets": 8},
                 "audio"),
    # decoders
    _decoder("GPT-2", "GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    _decoder("Llama", "LlamaForCausalLM", "LlamaConfig"),
    _decoder("Mistral", "MistralForCausalLM", "MistralConfig", sliding_window=4, note="sliding window 4"),
    _decoder("Qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    _decoder("Qwen3", "Qwen3ForCausalLM", "Qwen3Config", head_dim=8),
    _decoder("Gemma", "GemmaForCausalLM", "GemmaConfig", head_dim=8),
    _decoder("Phi-3", "Phi3ForCausalLM", "Phi3Config"),
    _decoder("GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig"),
    _decoder("OPT", "OPTForCausalLM", "OPTConfig", ffn_dim=64, word_embed_proj_dim=32),
    _decoder("GPT-Neo", "GPTNeoForCausalLM", "GPTNeoConfig", attention_types=[[["global", "local"], 1]],
             window_size=4, cache_refused="cache index", note="local attention on layer 1"),
    _decoder("Falcon", "FalconForCausalLM", "FalconConfig"),
    _decoder("BLOOM", "BloomForCausalLM", "BloomConfig", n_layer=2, n_head=4, note="ALiBi positions"),
    _decoder("Phi", "PhiForCausalLM", "PhiConfig", note="parallel attention and MLP"),
    _decoder("GPT-J", "GPTJForCausalLM", "GPTJConfig", n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    # meant to be refused
    Architecture("Swin", "vision encoder", "SwinModel", "SwinConfig",
                 {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (2, 2),
                  "window_size": 4}, "pixels", refused="changes the hidden state's shape",
                 note="stages change the shape (patch merging)"),
    _text("SqueezeBERT", "SqueezeBertModel", "SqueezeBertConfig", embedding_size=32, q_groups=1, k_groups=1,
          v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1, refused="returns dict",
          note="its layer returns a dict"),
    Architecture("Funnel, one block named", "encoder", "FunnelModel", "FunnelConfig",
                 {"vocab_size": VOCAB, "block_sizes": (2, 1), "num_decoder_layers": 1, "d_model": 32,
                  "n_head": 4, "d_head": 8, "d_inner": 64}, stack="encoder.blocks.0",
                 convert_options={"layers_path": "encoder.blocks.0"},
                 note="`layers_path=\"encoder.blocks.0\"`: the first block's 2 layers"),
    Architecture("Funnel", "encoder", "FunnelModel", "FunnelConfig",
                 {"vocab_size": VOCAB, "block_sizes": (1, 1), "num_decoder_layers": 1, "d_model": 32,
                  "n_head": 4, "d_head": 8, "d_inner": 64}, refused="no layer stack",
                 note="without `layers_path`: blocks nested in lists, pooling between them"),
    _text("XLM", "XLMModel", "XLMConfig", emb_dim=32, n_layers=2, n_heads=4,
          refused="split across parallel lists",
          note="attention and FFN in separate lists"),
    _text("FlauBERT", "FlaubertModel", "FlaubertConfig", emb_dim=32, n_layers=2, n_heads=4,
          refused="split across parallel lists",
          note="attention and FFN in separate lists"),
)

ARCHITECTURES_BY_NAME = {arch.name: arch for arch in ARCHITECTURES}


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _text_inputs(model: nn.Module, left: bool = False, eos: bool = False) -> dict[str, Tensor]:
    """Two sequences of ``TOKENS`` ids, the second with ``PADDED`` padding positions (right, or ``left``)."""
    ids = torch.randint(4, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pad = slice(0, PADDED) if left else slice(TOKENS - PADDED, TOKENS)
    mask[1, pad] = 0
    ids[1, pad] = _pad_id(model)
    if eos:  # BART-style classifiers pool the last end-of-sequence token of each row
        ids[0, -1] = ids[1, TOKENS - PADDED - 1] = model.config.eos_token_id
    return {"input_ids": ids, "attention_mask": mask}


def _generator_randn(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


INPUTS: dict[str, Callable[[nn.Module], dict[str, Tensor]]] = {
    "text": _text_inputs,
    "text_eos": lambda model: _text_inputs(model, eos=True),
    "causal": lambda model: _text_inputs(model, left=True),
    "pixels": lambda model: {"pixel_values": _generator_randn(BATCH, 3, 32, 32)},
    "audio": lambda model: {"input_values": _generator_randn(BATCH, 400)},
    "features": lambda model: {"input_features": _generator_randn(BATCH, 8, 32)},
}


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``"pass"``, ``"refused"`` (a clean refusal at ``convert``) or ``"fail"``."""

    name: str
    outcome: str
    detail: str = ""
    facts: dict[str, str] = field(default_factory=dict)  # what else the check found (e.g. "padding")


class CheckFailed(AssertionError):
    """A check found a wrong, non-finite or unconverged result."""


class MatrixError(RuntimeError):
    """The stock model fails on the matrix's inputs: a mistake in the architecture's entry, not a result."""


class Refused(Exception):
    """``convert`` refused the model with a ``ValueError`` or ``TypeError``; the message is the reason."""


@dataclass
class Row:
    """All checks of one architecture."""

    arch: Architecture
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def status(self) -> str:
        """``"supported"`` (every check passes), ``"refused"`` (refused at convert), ``"partial"`` (some
        checks refused, the rest pass) or ``"failing"`` (a check failed)."""
        outcomes = {c.outcome for c in self.checks}
        if "fail" in outcomes:
            return "failing"
        if outcomes == {"pass"}:
            return "supported"
        return "refused" if outcomes == {"refused"} else "partial"

    @property
    def reason(self) -> str:
        """The first refusal's or failure's message."""
        return next((c.detail for c in self.checks if c.outcome != "pass"), "")


def outputs(out: Any) -> Tensor:
    """The model's outputs that the checks compare, flattened into one vector: logits and hidden states."""
    names = ("logits", "last_hidden_state", "encoder_last_hidden_state")
    found = [getattr(out, n) for n in names if isinstance(getattr(out, n, None), Tensor)]
    if not found:
        raise CheckFailed(f"no logits or hidden states in the output ({type(out).__name__})")
    return torch.cat([t.reshape(-1).float() for t in found])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings of random tiny configs (the checks look at solver_stats themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def convert_or_refuse(model: nn.Module, arch: Architecture, solver: str, **settings: Any) -> nn.Module:
    """``ode_bert.convert`` (``solver="im_bert"``: the ``im`` preset, as ``ode_bert.im_bert``) with the
    entry's ``convert_options``; its ``ValueError``/``TypeError`` becomes ``Refused``; every layer of the
    stack must be converted."""
    try:
        if solver == "im_bert":  # what ode_bert.im_bert does, through the one entry point
            ode_bert.convert(model, ode_bert.ODESettings.preset("im", **settings), **arch.convert_options)
        else:
            ode_bert.convert(model, solver, **settings, **arch.convert_options)
    except (ValueError, TypeError) as err:
        raise Refused(str(err)) from err
    layers = ode_bert.find_layers(model)
    if len(ode_bert.ode_config(model)["layers"]) != len(layers):
        raise CheckFailed(f"{len(ode_bert.ode_config(model)['layers'])} of {len(layers)} layers converted")
    return model


def _every_layer_ran(model: nn.Module) -> None:
    stats = ode_bert.solver_stats(model)
    count = len(ode_bert.find_layers(model))
    if len(stats) != count or any(s.nfev < 1 for s in stats):
        raise CheckFailed(f"the forward ran {len(stats)} of the {count} converted layers")


def _finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise CheckFailed(f"{name} is not finite")


def _rounding(got: Tensor, want: Tensor) -> tuple[float, float]:
    """Max absolute difference, and its ratio to the reference's largest magnitude."""
    error = float((got - want).abs().max())
    return error, error / max(1.0, float(want.abs().max()))


def check_identity(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> dict[str, str]:
    """Euler/residual/step 1 against the stock outputs; the converted blocks must be at ``arch.stack``."""
    with torch.no_grad():
        want = outputs(model(**inputs))
        convert_or_refuse(model, arch, "euler", field="residual", step=1.0)
        got = outputs(model(**inputs))
    _every_layer_ran(model)
    path = getattr(ode_bert.find_layers(model), "path", None) or "?"
    if arch.stack is not None and path != arch.stack:
        raise CheckFailed(f"converted the blocks at {path}, not those at {arch.stack}")
    if torch.equal(got, want):
        return {"detail": "bit-identical", "stack": path}
    error, relative = _rounding(got, want)
    if not relative <= IDENTITY_TOL:
        raise CheckFailed(f"euler/residual/step 1 differs from the stock model by {error:.2e}")
    return {"detail": f"rounding, max |diff| {error:.1e}", "stack": path}


def _padding_probe(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
    """A hook on the first converted layer that keeps its hidden input and output (for ``_padding_fate``)."""
    seen: dict[str, Tensor] = {}
    layer = ode_bert.find_layers(model)[0]

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        hidden, _, _ = split_hidden(module, args, kwargs)
        seen["in"], seen["out"] = hidden.detach(), (out[0] if isinstance(out, tuple) else out).detach()

    return seen, layer.register_forward_hook(hook, with_kwargs=True)


def _padding_fate(seen: dict[str, Tensor], inputs: dict[str, Tensor]) -> str:
    """``"held"`` when the implicit step left the padding positions of the padded sequence unchanged,
    ``"solved"`` when it moved them, ``"no padding"`` for inputs without an attention mask."""
    if "attention_mask" not in inputs or "in" not in seen:
        return "no padding"
    before, after = seen["in"], seen["out"]
    if before.shape[:2] == (TOKENS, BATCH):  # sequence-first layers (XLNet)
        before, after = before.transpose(0, 1), after.transpose(0, 1)
    if before.shape[:2] != (BATCH, TOKENS) or after.shape != before.shape:
        return "unknown layout"
    padding = inputs["attention_mask"][1] == 0
    return "held" if torch.equal(before[1, padding], after[1, padding]) else "solved"


def check_implicit(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> dict[str, str]:
    """IM-BERT in train mode, forward and backward: finite, converged, every layer reached by the gradient."""
    convert_or_refuse(model, arch, "im_bert", max_iter=IMPLICIT_MAX_ITER, tol=IMPLICIT_SOLVE_TOL)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    seen, handle = _padding_probe(model, inputs)
    try:
        loss = outputs(model(**inputs)).pow(2).mean()
    finally:
        handle.remove()
    loss.backward()
    model.eval()
    _finite("the loss", loss)
    _every_layer_ran(model)
    stats = ode_bert.solver_stats(model)
    if not all(s.converged for s in stats):
        raise CheckFailed(f"im_bert did not converge in train mode:\n{stats}")
    records = {len(s.root.converged) for s in stats}
    if records != {BATCH}:
        raise CheckFailed(f"the per-sample solver record has {records} entries for a batch of {BATCH}")
    for index, layer in enumerate(ode_bert.find_layers(model)):
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        if not grads or not any(bool(g.abs().sum() > 0) for g in grads):
            raise CheckFailed(f"no gradient reached layer {index}")
        for g in grads:
            _finite(f"a gradient of layer {index}", g)
    iterations = max(s.iterations for s in stats)
    return {"detail": f"converged, {iterations} iterations", "padding": _padding_fate(seen, inputs)}


def check_rk4(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> str:
    """Classical RK4 (four evaluations per layer), forward and backward finite."""
    convert_or_refuse(model, arch, "rk4", field="residual", step=0.5)
    model.zero_grad(set_to_none=True)
    loss = outputs(model(**inputs)).pow(2).mean()
    loss.backward()
    _finite("the loss", loss)
    _every_layer_ran(model)
    for p in model.parameters():
        if p.grad is not None:
            _finite("a gradient", p.grad)
    model.zero_grad(set_to_none=True)
    return "finite"


def check_dopri5(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> str:
    """Adaptive Dormand-Prince, forward finite."""
    convert_or_refuse(model, arch, "dopri5", field="residual", step=1.0, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        out = outputs(model(**inputs))
    _finite("the output", out)
    _every_layer_ran(model)
    return f"finite, {max(s.nfev for s in ode_bert.solver_stats(model))} evaluations"


def check_save_load(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> str:
    """``ode_bert.save_pretrained``, then ``ode_bert.from_pretrained``: same settings, identical outputs."""
    convert_or_refuse(model, arch, "im_bert")
    with torch.no_grad():
        want = outputs(model(**inputs))
    with tempfile.TemporaryDirectory() as folder:
        ode_bert.save_pretrained(model, folder)
        loaded = ode_bert.from_pretrained(folder, type(model)).eval()
    if ode_bert.ode_config(loaded) != ode_bert.ode_config(model):
        raise CheckFailed(f"settings {ode_bert.ode_config(model)} reloaded as {ode_bert.ode_config(loaded)}")
    with torch.no_grad():
        got = outputs(loaded(**inputs))
    if not torch.equal(got, want):
        raise CheckFailed(f"reloaded outputs differ by {float((got - want).abs().max()):.2e}")
    return "identical"


def _generate(model: nn.Module, inputs: dict[str, Tensor], use_cache: bool) -> Tensor:
    config = model.config
    return model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                          pad_token_id=config.pad_token_id, eos_token_id=None)  # fmt: skip


def _incremental_error(model: nn.Module, inputs: dict[str, Tensor]) -> float:
    """Relative difference of the last position's logits: decoded with a cache after a prefill of the other
    positions, against one forward of the whole sequence without a cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
    prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    last = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=prefill.past_key_values,
                 use_cache=True).logits[:, -1]  # fmt: skip
    return _rounding(last, full)[1]


ODE_BERT_DIR = Path(ode_bert.__file__).resolve().parent


@contextlib.contextmanager
def cache_refusals() -> Iterator[None]:
    """A ``ValueError`` that ode_bert raises at call time about a key/value cache becomes ``Refused``.

    A cache is an argument of each call (``use_cache=True``), so ode_bert can only refuse one when it meets
    it; any other error at call time stays a failure.
    """
    try:
        yield
    except ValueError as err:
        frame = Path(traceback.extract_tb(err.__traceback__)[-1].filename).resolve()
        if ODE_BERT_DIR in frame.parents and "cache" in str(err):
            raise Refused(f"at call time: {err}") from err
        raise


def check_cache(model: nn.Module, inputs: dict[str, Tensor], arch: Architecture) -> dict[str, str]:
    """Decoders with ``use_cache=True``: euler/residual/step 1 generates the stock tokens; rk4 and im_bert
    decode incrementally as they compute without a cache (last-token logits, ``generate()`` tokens)."""
    model.config.use_cache = True
    errors = {}
    with torch.no_grad(), cache_refusals():
        stock_tokens = _generate(model, inputs, use_cache=True)
        convert_or_refuse(model, arch, "euler", field="residual", step=1.0)
        if not torch.equal(_generate(model, inputs, use_cache=True), stock_tokens):
            raise CheckFailed("euler/residual/step 1 with a cache generates other tokens than stock")
        implicit = {"max_iter": IMPLICIT_MAX_ITER, "tol": IMPLICIT_SOLVE_TOL}
        for solver, settings, tol in (("rk4", {}, CACHE_TOL), ("im_bert", implicit, IMPLICIT_CACHE_TOL)):
            convert_or_refuse(model, arch, solver, **settings)
            errors[solver] = _incremental_error(model, inputs)
            if not errors[solver] <= tol:
                raise CheckFailed(f"{solver}: the last token's logits decoded with a cache differ from those "
                                  f"without by {errors[solver]:.2e} (relative)")
            if not torch.equal(_generate(model, inputs, True), _generate(model, inputs, False)):
                raise CheckFailed(f"{solver}: generate() with use_cache=True gives other tokens than without")
    return {"detail": ", ".join(f"{solver} {error:.1e}" for solver, error in errors.items()),
            **{f"cache {solver}": f"{error:.1e}" for solver, error in errors.items()}}  # fmt: skip


CheckFunction = Callable[[nn.Module, dict[str, Tensor], Architecture], "str | dict[str, str]"]
CHECKS: dict[str, CheckFunction] = {
    "identity": check_identity,
    "implicit": check_implicit,
    "rk4": check_rk4,
    "dopri5": check_dopri5,
    "save/load": check_save_load,
}


def _message(err: BaseException) -> str:
    """One line: the message; for a crash (not a refusal or a failed check) also its type and last frame."""
    text = " ".join(str(err).split())
    if isinstance(err, (Refused, CheckFailed)):
        return text
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}: {text}"


def run_architecture(arch: Architecture) -> Row:
    """Run every check of ``arch``, each on a freshly built stock model; a refusal or failure is a result.

    Raises ``MatrixError`` if the stock model itself fails on the inputs (the entry is wrong, not ode_bert).
    """
    row = Row(arch)
    start = time.perf_counter()
    checks = dict(CHECKS)
    if arch.decoder:
        checks["cache"] = check_cache
    stock = arch.build()
    inputs = INPUTS[arch.inputs](stock)
    try:
        with torch.no_grad(), quiet():
            outputs(stock(**inputs))
    except Exception as err:
        raise MatrixError(f"the stock {arch.model_class} of {arch.name!r} fails on the matrix inputs: "
                          f"{_message(err)}") from err
    for name, check in checks.items():
        model = stock if name == "identity" else arch.build()
        try:
            with quiet():
                found = check(model, inputs, arch)
            facts = {} if isinstance(found, str) else dict(found)
            detail = found if isinstance(found, str) else facts.pop("detail")
            row.checks.append(Check(name, "pass", detail, facts))
        except Refused as err:
            row.checks.append(Check(name, "refused", _message(err)))
        except Exception as err:  # a crash is a result of the matrix, recorded with its place
            row.checks.append(Check(name, "fail", _message(err)))
        if name == "identity" and row.checks[-1].outcome == "refused":
            # the other checks would be refused the same way: record that without rebuilding
            row.checks.extend(Check(n, "refused", row.checks[-1].detail) for n in list(checks)[1:])
            break
    row.seconds = time.perf_counter() - start
    return row


def run_matrix(archs: Sequence[Architecture] = ARCHITECTURES, progress: bool = False) -> list[Row]:
    rows = []
    for arch in archs:
        rows.append(run_architecture(arch))
        if progress:
            print(f"{arch.name:<20} {rows[-1].status:<9} {rows[-1].seconds:5.2f} s  {rows[-1].reason[:90]}",
                  file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

COMMAND = "python -m bench.model_matrix --write docs/supported-models.md"
MACHINE_PREFIX = "Measured on: "


def machine_line() -> str:
    """The line naming what the table was measured with (left out of the drift test's comparison)."""
    from ode_bert.train import machine_record

    record = machine_record()
    return (f"{MACHINE_PREFIX}{record['cpu']} ({record['cpu_count']} cores, 1 torch thread), "
            f"torch {torch.__version__}, transformers {transformers.__version__}, float32.")  # fmt: skip


def _cell(check: Check | None) -> str:
    if check is None:
        return "n/a"
    if check.outcome == "pass":
        return check.detail
    return "refused" if check.outcome == "refused" else "**fails**"


def _magnitude(error: float) -> str:
    """An error's order of magnitude, ``< 1eN`` (stable across runs and thread counts, unlike its digits)."""
    return "0" if error == 0 else f"< 1e{math.ceil(math.log10(error))}"


def _identity_cell(check: Check | None) -> str:
    """Bit-identical, or rounding with the error's order of magnitude."""
    if check is None or check.outcome != "pass" or check.detail == "bit-identical":
        return _cell(check)
    return f"rounding ({_magnitude(float(check.detail.rsplit(' ', 1)[-1]))})"


def _cache_cell(row: Row) -> str:
    """Decoders: the relative last-token error of cached decoding; ``n/a`` for encoders.

    rk4's is float rounding, given as its order of magnitude; the implicit step's depends on where each root
    solve stopped (any change of a root finder moves it), so the cell gives the bound it passed.
    """
    check = row.check("cache")
    if check is None:
        return "n/a"
    if check.outcome != "pass":
        return _cell(check)
    bound = f"< 1e{round(math.log10(IMPLICIT_CACHE_TOL))}"
    return f"rk4 {_magnitude(float(check.facts['cache rk4']))}, im_bert {bound}"


def _combined(*checks: Check | None) -> str:
    outcomes = {c.outcome for c in checks if c is not None}
    if outcomes == {"pass"}:
        return "yes"
    return "**fails**" if "fail" in outcomes else "refused"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _stack_cell(check: Check | None) -> str:
    return f"`{check.facts['stack']}`" if check is not None and check.outcome == "pass" else "-"


def _padding_cell(check: Check | None) -> str:
    if check is None or check.outcome != "pass":
        return "-"
    return check.facts.get("padding", "-")


def _specific(reason: str) -> str:
    """A refusal's message without the list of supported layouts that every such message ends with."""
    head, sep, _ = reason.partition("ode_bert supports ")
    return head.rstrip(" ;.") + "." if sep else reason


def _problems(row: Row) -> list[str]:
    """One line per distinct refusal or failure message of ``row``, naming the checks that got it."""
    if row.status == "refused":
        return [f"- **{row.arch.name}** (refused at `convert`): {_escape(_specific(row.reason))}"]
    by_message: dict[tuple[str, str], list[str]] = {}
    for check in row.checks:
        if check.outcome != "pass":
            by_message.setdefault((check.outcome, check.detail), []).append(check.name)
    return [f"- **{row.arch.name}** ({', '.join(names)}: {outcome}): {_escape(detail)}"
            for (outcome, detail), names in by_message.items()]  # fmt: skip


def render(rows: Sequence[Row], machine: str | None = None) -> str:
    """``docs/supported-models.md``: a summary, the table, and the reason of every refusal or failure."""
    counts = {s: sum(r.status == s for r in rows) for s in ("supported", "partial", "refused", "failing")}
    lines = [
        "# Supported models",
        "",
        f"Generated by `{COMMAND}` from tiny random configs (hidden size 32, 2 layers, a small "
        "vocabulary, built in code); `tests/test_model_matrix.py` runs the same checks and fails when this "
        "file is out of date. What each check does is in the docstring of `bench/model_matrix.py`.",
        "",
        machine or machine_line(),
        "",
        f"**{len(rows)} architectures. Every check passes: {counts['supported']}; some checks refused, the "
        f"others pass: {counts['partial']}; refused at `convert`: {counts['refused']}; failing: "
        f"{counts['failing']}.**",
        "",
        "- **layers**: where `ode_bert.find_layers` found the blocks that were converted.",
        "- **identity**: `convert(model, \"euler\", field=\"residual\", step=1)` against the stock model on "
        "a padded batch: bit-identical, or equal up to float32 rounding (the order of magnitude of the "
        "largest absolute difference).",
        f"- **implicit**: `im_bert(model, max_iter={IMPLICIT_MAX_ITER}, tol={IMPLICIT_SOLVE_TOL:g})` in "
        "train mode (dropout on), forward and backward: finite, gradients reach every layer, every root "
        "solve converged (the preset's limit of 20 iterations is not always enough for the first layer of "
        "a random tiny model; the tolerance is tighter than the preset's 1e-2, to test the mechanism), one "
        "solver record per sequence. "
        "**padding**: whether that "
        "implicit step held the padding positions of the padded sequence fixed (`held`) or solved them too "
        "(`solved`; real tokens do not attend to them either way).",
        "- **RK**: `rk4` forward and backward finite, `dopri5` forward finite.",
        "- **save/load**: `ode_bert.save_pretrained` then `ode_bert.from_pretrained` gives identical outputs "
        "and settings.",
        "- **cache** (decoders, left-padded batch): with `use_cache=True`, euler/residual/step 1 generates "
        "the stock model's tokens; with `rk4` and with `im_bert`, `generate()` gives the tokens it gives "
        "with `use_cache=False`, and the last token's logits decoded with a cache after a prefill of the "
        "others equal those of one forward without a cache, relative to their largest magnitude: to float32 "
        "rounding for rk4 (the cell gives the order of magnitude), and for `im_bert` to the root finder's "
        "tolerance (1e-4 on each position's own solve; the cell gives the bound checked).",
        "- **refused**: `convert` raised a `ValueError` or `TypeError` saying why (listed below), or, for a "
        "cache (an argument of each call), the call raised ode_bert's `ValueError` about it; **fails**: "
        "anything else (a crash, a wrong or non-finite result, an unconverged solve).",
        "",
        "| family | kind | class | layers | identity | implicit fwd+bwd | padding | RK fwd+bwd | save/load "
        "| cache | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        arch = row.arch
        notes = arch.note
        if row.status != "supported":
            notes = f"{notes}; see below" if notes else "see below"
        implicit = row.check("implicit")
        lines.append(
            f"| {arch.name} | {arch.kind} | `{arch.model_class}` | {_stack_cell(row.check('identity'))} "
            f"| {_identity_cell(row.check('identity'))} "
            f"| {_combined(implicit)} | {_padding_cell(implicit)} "
            f"| {_combined(row.check('rk4'), row.check('dopri5'))} | {_combined(row.check('save/load'))} "
            f"| {_cache_cell(row)} | {_escape(notes)} |"
        )
    problems = [line for row in rows for line in _problems(row)]
    if problems:
        lines += ["", "## Refused and failing", "", *problems]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.model_matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the table there (else print it)")
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(ARCHITECTURES_BY_NAME),
                        metavar="FAMILY", help="check these families only (not with --write)")
    args = parser.parse_args(argv)
    if args.only and args.write:
        parser.error("--write renders every family; leave out --only")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    archs = [ARCHITECTURES_BY_NAME[n] for n in args.only] if args.only else ARCHITECTURES
    rows = run_matrix(archs, progress=True)
    text = render(rows)
    if args.write is None:
        print(text)
    else:
        from ode_bert.io import atomic_open

        with atomic_open(args.write) as f:
            f.write(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
