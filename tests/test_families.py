"""``convert`` on model families beyond BERT, from tiny random configs: decoders with a key/value cache,
ALBERT's shared layers, encoder stacks of other models, named stacks, refusals, layouts and masks.

References are the stock models and the converted model itself without a cache (``use_cache=False``
evaluates every layer on the whole sequence, which is what incremental decoding must reproduce).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    BartConfig,
    BartModel,
    DynamicCache,
    FunnelConfig,
    FunnelModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LongformerConfig,
    LongformerModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SqueezeBertConfig,
    SqueezeBertModel,
    SwinConfig,
    SwinModel,
    T5Config,
    T5EncoderModel,
    T5Model,
    XLMConfig,
    XLMModel,
    XLNetConfig,
    XLNetModel,
)

import ode_bert
from ode_bert import convert, find_layers, solver_stats, unconvert

VOCAB = 64
DECODER_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64}  # fmt: skip
TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
DECODERS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, **TOKENS)
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER_SIZE, **TOKENS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER_SIZE, **TOKENS)),
}


def tiny_decoder(kind: str) -> nn.Module:
    """A seeded random causal LM in eval mode (two calls give identical weights)."""
    torch.manual_seed(0)
    return DECODERS[kind]().eval()


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 6 tokens; ``padded``: the second left-padded to 4 real tokens."""
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool) -> tuple:
    """Greedy tokens and the per-step logits (scores) of 2 new tokens."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, use_cache=use_cache,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.scores)


# Explicit stages are exact (float rounding; 0 in float64 on these configs); implicit ones agree up to the
# root finder's tolerance, as the joint solve over the whole sequence stops on a different residual.
CACHE_ATOL = {"euler": 1e-5, "rk4": 1e-5, "implicit_euler": 1e-4}


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("solver", sorted(CACHE_ATOL))
def test_cached_decoding_equals_decoding_without_a_cache(kind: str, solver: str) -> None:
    model = convert(tiny_decoder(kind), solver, step=0.5)
    for padded in (False, True):
        ids, mask = prompts(padded)
        with torch.no_grad():
            tokens, scores = generate(model, ids, mask, use_cache=True)
            want_tokens, want_scores = generate(model, ids, mask, use_cache=False)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(scores, want_scores, atol=CACHE_ATOL[solver], rtol=0)
    ids, _ = prompts(padded=False)
    with torch.no_grad():  # prompt, then one token at a time, against one forward over the whole sequence
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :3], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(3, 6)]
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=CACHE_ATOL[solver], rtol=0)
    assert cache.get_seq_length() == 6


@pytest.mark.parametrize("solver", ["implicit_midpoint", "trapezoid", "midpoint"])
def test_other_fixed_step_methods_decode_with_a_cache(solver: str) -> None:
    model = convert(tiny_decoder("gpt2"), solver, step=0.5)
    ids, mask = prompts(padded=True)
    with torch.no_grad():
        tokens, scores = generate(model, ids, mask, use_cache=True)
        want_tokens, want_scores = generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=0)


def test_beam_search_reorders_every_stage_history() -> None:
    model = convert(tiny_decoder("llama"), "rk4", step=0.5)
    ids, mask = prompts(padded=True)
    with torch.no_grad():
        beams = [model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, num_beams=3,
                                use_cache=use_cache) for use_cache in (True, False)]  # fmt: skip
    assert torch.equal(beams[0], beams[1])


def test_implicit_step_with_a_cache_writes_its_keys_once() -> None:
    model = convert(tiny_decoder("llama"), "implicit_euler", step=0.5)
    ids, _ = prompts(padded=False)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == 6
    assert all(layer.get_seq_length() == 6 for layer in out.past_key_values.layers)
    converted = convert(tiny_decoder("llama"), "implicit_euler", step=0.5)
    with torch.no_grad():
        converted(ids, use_cache=False)
    without = [s.nfev for s in solver_stats(converted)]
    assert [s.nfev for s in solver_stats(model)] == [n + 1 for n in without]  # + the final evaluation


def test_adaptive_solvers_refuse_a_cache_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"use_cache=True.*'dopri5'.*sub-steps depend on the whole sequence"):
        convert(tiny_decoder("gpt2"), "dopri5")
    model = tiny_decoder("qwen2")
    model.config.use_cache = False
    convert(model, "dopri5")
    ids, mask = prompts(padded=True)
    with pytest.raises(ValueError, match=r"layer 0 \(dopri5.*receives a key/value cache.*adaptive method"):
        model(ids, attention_mask=mask, use_cache=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, use_cache=False)
    assert tokens.shape == (2, 8)


def test_a_cache_filled_by_another_method_is_refused() -> None:
    model = tiny_decoder("gpt2")
    ids, _ = prompts(padded=False)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values  # the stock model's keys and values
        convert(model, "rk4")
        with pytest.raises(ValueError, match="already holds 6 positions that were not computed by rk4"):
            model(ids[:, :1], cache=cache, use_cache=True)
        cache = model(ids, use_cache=True).past_key_values
        convert(model, "implicit_euler")
        with pytest.raises(ValueError, match=r"filled by rk4 \(step 1, field='residual'\), not implicit_eu"):
            model(ids[:, :1], cache=cache, use_cache=True)


# --------------------------------------------------------------------------------------------------
# Shared layers (ALBERT), encoder stacks of other models, named stacks, refusals, layouts and masks
# --------------------------------------------------------------------------------------------------

IDS = torch.randint(3, VOCAB - 6, (3, 8), generator=torch.Generator().manual_seed(2))
MASK = torch.ones_like(IDS)
MASK[1, 5:] = 0
MASK[2, 3:] = 0
ALBERT = {"vocab_size": VOCAB, "hidden_size": 32, "embedding_size": 16, "num_hidden_layers": 4,
          "num_attention_heads": 4, "intermediate_size": 37}  # fmt: skip


def seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


GROUPINGS = [{}, {"num_hidden_groups": 2}, {"num_hidden_groups": 2, "inner_group_num": 2}]


@pytest.mark.parametrize("groups", GROUPINGS)
def test_albert_shared_groups_are_steps_of_one_field(groups: dict) -> None:
    make = lambda: AlbertModel(AlbertConfig(**ALBERT, **groups))  # noqa: E731
    model = seeded(make)
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        convert(model, "euler", field="residual", step=1.0)
        got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(find_layers(model)) == 4 and [s.layer for s in solver_stats(model)] == [0, 1, 2, 3]

    # rk4 on steps 1 and 3 only, against the encoder loop written out with a hand-made rk4
    convert(model, "rk4", layers="1,3", step=0.5)
    stock = seeded(make)
    encoder = stock.encoder
    groups_of = [int(i / (4 / stock.config.num_hidden_groups)) for i in range(4)]
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        extended = stock(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
        h = encoder.embedding_hidden_mapping_in(stock.embeddings(input_ids=IDS))
        mask = (1.0 - MASK[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for step, group in enumerate(groups_of):
            block = encoder.albert_layer_groups[group]
            if step in (1, 3):
                f = lambda x, block=block: block(x, mask) - x  # noqa: E731
                k1 = f(h)
                k2 = f(h + 0.25 * k1)
                k3 = f(h + 0.25 * k2)
                k4 = f(h + 0.5 * k3)
                h = h + 0.5 / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            else:
                h = block(h, mask)
    torch.testing.assert_close(got, h, atol=1e-5, rtol=0)
    assert not torch.allclose(got, extended.last_hidden_state, atol=1e-3)  # the steps did change the output
    assert [(s.layer, s.nfev) for s in solver_stats(model)] == [(1, 4), (3, 4)]
    unconvert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).last_hidden_state, want)


T5 = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
BART = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 37,
        "decoder_ffn_dim": 37, "max_position_embeddings": 64}  # fmt: skip
ENCODER_STACKS = {  # model, inputs, the output the encoder stack decides, where the stack is
    "t5 encoder": (lambda: T5EncoderModel(T5Config(**T5)), {}, "last_hidden_state", "encoder.block"),
    "t5 (encoder of encoder-decoder)": (lambda: T5Model(T5Config(**T5)), {"decoder_input_ids": IDS[:, :3]},
                                        "last_hidden_state", "encoder.block"),
    "bart (encoder of encoder-decoder)": (lambda: BartModel(BartConfig(**BART)), {},
                                          "encoder_last_hidden_state", "encoder.layers"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ENCODER_STACKS))
def test_encoder_stacks_of_other_models_convert_and_leave_the_decoder(name: str) -> None:
    make, extra, output, path = ENCODER_STACKS[name]
    model = seeded(make)
    inputs = {"input_ids": IDS, "attention_mask": MASK, **extra}
    with torch.no_grad():
        want = getattr(model(**inputs), output)
        convert(model, "euler", field="residual", step=1.0)
        got = getattr(model(**inputs), output)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert find_layers(model).path == path
    decoder = getattr(model, "decoder", None)
    assert decoder is None or not any("forward" in vars(m) for m in decoder.modules())
    ode_bert.im_bert(model)
    with torch.no_grad():
        model(**inputs)
    assert [s.converged for s in solver_stats(model)] == [True, True]


FUNNEL = {"vocab_size": VOCAB, "d_model": 32, "n_head": 4, "d_head": 8, "d_inner": 37, "block_sizes": [2, 2],
          "num_decoder_layers": 1}  # fmt: skip


def test_layers_path_names_a_stack_the_search_cannot_find(tmp_path: Path) -> None:
    model = seeded(lambda: FunnelModel(FunnelConfig(**FUNNEL)))
    nested = r"no layer stack of 4 .*encoder\.blocks\.0 \(2 x FunnelLayer\).*layers_path"
    with pytest.raises(TypeError, match=nested):
        convert(model, "euler")
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        convert(model, "euler", field="residual", step=1.0, layers_path="encoder.blocks.0")
        got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    convert(model, "rk4", step=0.5)  # reconverting keeps the named stack
    assert find_layers(model).path == "encoder.blocks.0" and ode_bert.ode_config(model)["layers"] == [0, 1]
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = ode_bert.from_pretrained(tmp_path, FunnelModel).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS, attention_mask=MASK).last_hidden_state, want)
    assert [s.layer for s in solver_stats(loaded)] == [0, 1]
    with pytest.raises(TypeError, match=r"layers_path='embeddings' is a FunnelEmbeddings, not an nn.Module"):
        convert(model, "euler", layers_path="embeddings")


SQUEEZEBERT = {"vocab_size": VOCAB, "hidden_size": 32, "embedding_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 37, "q_groups": 1, "k_groups": 1, "v_groups": 1,
               "post_attention_groups": 1, "intermediate_groups": 1, "output_groups": 1}  # fmt: skip
REFUSED = {
    "swin": (lambda: SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                          num_heads=[2, 2], window_size=2)),
             r"SwinStage at encoder.layers\[0\] changes the hidden state's shape from \(1, 64, 16\) to "),
    "squeezebert": (lambda: SqueezeBertModel(SqueezeBertConfig(**SQUEEZEBERT)),
                    r"SqueezeBertModule at encoder.layers\[0\] returns dict, not a hidden-state tensor"),
    "xlm": (lambda: XLMModel(XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4)),
            r"split across parallel lists \(attentions, ffns"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_stacks_that_cannot_be_ode_steps_are_refused_before_any_change(name: str) -> None:
    make, reason = REFUSED[name]
    model = seeded(make)
    with pytest.raises(TypeError, match=reason):
        convert(model, "implicit_euler")
    assert ode_bert.ode_config(model) is None
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_probe_forward_leaves_modes_random_state_and_weights_alone() -> None:
    model = seeded(lambda: AlbertModel(AlbertConfig(**ALBERT))).train()
    model.encoder.albert_layer_groups[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    random_state = torch.get_rng_state()
    convert(model, "implicit_euler")
    assert torch.equal(torch.get_rng_state(), random_state)
    assert [m.training for m in model.modules()] == modes and True in modes and False in modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_sequence_first_xlnet_and_longformer_masks_hold_padding() -> None:
    xlnet = seeded(lambda: XLNetModel(XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4,
                                                  d_inner=37)))  # fmt: skip
    longformer = seeded(lambda: LongformerModel(LongformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        attention_window=4)))  # fmt: skip
    for model, sequence_first in ((xlnet, True), (longformer, False)):
        with torch.no_grad():
            want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
            convert(model, "euler", field="residual", step=1.0)
            torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).last_hidden_state, want,
                                       atol=1e-5, rtol=0)  # fmt: skip
        convert(model, "implicit_euler", step=0.5)
        seen: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, args: tuple, out: object, seen: dict[str, torch.Tensor] = seen) -> None:
            seen["in"], seen["out"] = args[0], out[0] if isinstance(out, tuple) else out

        handle = find_layers(model)[0].register_forward_hook(keep)
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
        handle.remove()
        before, after = seen["in"], seen["out"]
        if sequence_first:  # XLNet's layers take (tokens, batch, hidden)
            assert before.shape[:2] == (8, 3)
            before, after = before.transpose(0, 1), after.transpose(0, 1)
        assert torch.equal(before[1, 5:], after[1, 5:]) and torch.equal(before[2, 3:], after[2, 3:])
        assert not torch.allclose(before[1, :5], after[1, :5])
        assert all(len(s.root.converged) == 3 and s.converged for s in solver_stats(model))  # per sequence
