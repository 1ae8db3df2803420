import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from speech_decoder import (SpeechDecoder, TransformerARSpeechDecoder, build_speech_decoder,
                            decoder_class, sample_codes)

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"

H, K, V = 24, 3, 17  # LLM hidden size, codebooks, codes per codebook

SMALL = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 64,
    "max_seq_len": 64,
    "dropout": 0.0,
    "layernorm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "init_method_std": 0.02,
    "use_cache": True,
}


# NeMo's keys (TransformerARSpeechDecoder), as in NeMo's s2s_duplex_speech_decoder.yaml but small
NEMO = dict(n_layers=2, d_model=32, d_ffn=64, sa_n_heads=4, kernel_size=3, p_dropout=0.0,
            p_dropout_out=0.0, has_xattn=False, xa_d_memory=32, xa_n_heads=4, is_causal=True,
            apply_norm_to_cond=True, apply_norm_out=True, max_length_causal_mask=64,
            cond_on_prev_audio_tokens=True, detach_input=False, use_learnable_pos_emb=True)


def make_decoder(seed=0, hidden_size=H, **overrides):
    torch.manual_seed(seed)
    return SpeechDecoder({**SMALL, **overrides}, hidden_size, K, V).eval()


def make_nemo_decoder(seed=0, hidden_size=H, std=0.2, **overrides):
    """NeMo's decoder with weights spread by `std` (NeMo's init is too small for differences to
    show)."""
    torch.manual_seed(seed)
    decoder = build_speech_decoder({**NEMO, **overrides}, hidden_size, K, V).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0.0 if p.dim() > 1 else 1.0, std)
    return decoder


DECODERS = {"document": lambda **kw: make_decoder(init_method_std=0.2, **kw),
            "nemo": make_nemo_decoder}


def make_inputs(B=2, T=24, hidden_size=H, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, hidden_size, generator=g), torch.randint(0, V, (B, T, K), generator=g)


# ---- caching and causality ----


@pytest.mark.parametrize("use_cache", [True, False])
def test_step_by_step_decoding_matches_full_forward(use_cache):
    # larger weights: differences would show
    decoder = make_decoder(use_cache=use_cache, init_method_std=0.2)
    hidden, codes = make_inputs(T=24)
    with torch.no_grad():
        full = decoder(hidden, codes)
        cache = decoder.new_cache()
        steps = torch.cat([decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
                           for t in range(24)], 1)
        # a multi-frame prefill followed by single steps takes the same path through the cache
        cache = decoder.new_cache()
        chunks = [decoder(hidden[:, :10], codes[:, :10], cache=cache)]
        chunks += [decoder(hidden[:, 10:17], codes[:, 10:17], cache=cache)]
        chunks += [decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
                   for t in range(17, 24)]
    assert full.shape == (2, 24, K, V)
    assert cache.num_frames == 24
    assert len(cache.keys) == (SMALL["n_layers"] if use_cache else 0)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_cache_keeps_one_key_value_pair_per_frame_and_layer():
    decoder = make_decoder()
    hidden, codes = make_inputs(B=2, T=5)
    cache = decoder.new_cache()
    with torch.no_grad():
        for t in range(5):
            decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
    assert [k.shape for k in cache.keys] == [(2, 4, 5, 8)] * SMALL["n_layers"]
    assert cache.hidden is None


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("t", [0, 7, 15])
def test_outputs_before_a_frame_do_not_depend_on_it(t, kind):
    decoder = DECODERS[kind]()
    hidden, codes = make_inputs(T=16)
    hidden2, codes2 = hidden.clone(), codes.clone()
    hidden2[:, t:] += torch.randn_like(hidden2[:, t:])
    codes2[:, t:] = (codes2[:, t:] + 1) % V
    with torch.no_grad():
        a, b = decoder(hidden, codes), decoder(hidden2, codes2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    # every later frame did change
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2, 3)).min() > 1e-3


def test_input_is_projected_hidden_plus_mean_code_embedding_plus_position():
    decoder = make_decoder()
    hidden, codes = make_inputs(T=5)
    seen = []
    decoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        decoder(hidden, codes)
        code_embeds = torch.stack([decoder.code_embeddings[k](codes[..., k])
                                   for k in range(K)]).mean(0)
        expected = decoder.input_proj(hidden) + code_embeds + decoder.position_embeddings.weight[:5]
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


def test_attention_matches_a_hand_written_causal_softmax():
    decoder = make_decoder(n_heads=2, d_kv=12, init_method_std=0.3)
    attn = decoder.blocks[0].attn
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv(x).split(24, dim=-1)
    q, k, v = (z.view(2, 9, 2, 12).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, d_kv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(12)
    scores = scores.masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 24))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, None, 0), expected, atol=1e-5, rtol=1e-5)


# ---- sampling ----


def test_default_and_zero_temperature_are_greedy():
    logits = torch.randn(4, 6, K, V)
    assert torch.equal(sample_codes(logits), logits.argmax(-1))
    assert torch.equal(sample_codes(logits, temperature=0.0, top_k=5), logits.argmax(-1))


def test_top_k_1_sampling_equals_greedy():
    logits = torch.randn(8, 10, K, V)
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 5.0):
        assert torch.equal(sample_codes(logits, temperature, top_k=1, generator=g),
                           logits.argmax(-1))


def test_top_k_never_emits_a_code_outside_the_k_best():
    top_k, draws = 4, 20000
    # flat-ish distribution: every code is likely without filtering
    logits = torch.randn(V).expand(draws, V)
    g = torch.Generator().manual_seed(0)
    codes = sample_codes(logits, temperature=3.0, top_k=top_k, generator=g)
    allowed = set(torch.topk(logits[0], top_k).indices.tolist())
    assert set(codes.unique().tolist()) == allowed  # each of the k best is drawn, nothing else
    unfiltered = sample_codes(logits, temperature=3.0, generator=g)
    # so the filter is what kept the others out
    assert len(set(unfiltered.unique().tolist()) - allowed) > 0


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    codes = sample_codes(logits.expand(40000, 4), temperature=2.0, top_k=3, generator=g)
    freq = torch.bincount(codes, minlength=4).float() / 40000
    expected = torch.tensor([2.0, 1.0, 0.0]).div(2.0).softmax(0)
    torch.testing.assert_close(freq[:3], expected, atol=0.01, rtol=0)
    assert freq[3] == 0


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(5, 7, V)
    a = sample_codes(logits, 1.0, top_k=8, generator=torch.Generator().manual_seed(3))
    b = sample_codes(logits, 1.0, top_k=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5, 7)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": 1.0, "top_k": 0}])
def test_bad_sampling_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        sample_codes(torch.randn(3, V), **kwargs)


# ---- config keys ----


def test_unknown_key_raises_naming_it_and_target_is_ignored():
    with pytest.raises(ValueError, match="'d_fff'.*d_ff"):
        SpeechDecoder({**SMALL, "d_fff": 64}, H, K, V)
    target = "nemo.collections.speechlm2.modules.TransformerARSpeechDecoder"
    SpeechDecoder({**SMALL, "target": target}, H, K, V)


def test_defaults_are_the_documented_block():
    # the rest as documented
    decoder = SpeechDecoder({"n_layers": 1, "max_seq_len": 8}, 2048, 2, 16)
    block = decoder.blocks[0]
    assert decoder.input_proj.weight.shape == (1024, 2048)
    assert block.attn.qkv.weight.shape == (3 * 16 * 64, 1024)
    assert block.mlp.fc_in.weight.shape == (4096, 1024)
    assert block.attn.dropout_p == 0.1 and block.norm_attn.eps == 1e-5 and decoder.use_cache


def test_d_kv_different_from_d_model_over_n_heads():
    decoder = make_decoder(n_heads=4, d_kv=16, init_method_std=0.2)  # 4 * 16 = 64 != d_model 32
    attn = decoder.blocks[0].attn
    assert attn.qkv.weight.shape == (3 * 64, 32) and attn.out.weight.shape == (32, 64)
    hidden, codes = make_inputs(T=21)
    with torch.no_grad():
        full = decoder(hidden, codes)
        cache = decoder.new_cache()
        steps = torch.cat([decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
                           for t in range(21)], 1)
    assert cache.keys[0].shape == (2, 4, 21, 16)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_d_model_not_divisible_by_n_heads_needs_d_kv():
    with pytest.raises(ValueError, match="d_kv"):
        make_decoder(n_heads=5)
    make_decoder(n_heads=5, d_kv=8)


HAND_ACTIVATIONS = {
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                    * (x + 0.044715 * x**3))),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}


@pytest.mark.parametrize("name", list(HAND_ACTIVATIONS))
def test_activation_matches_its_formula(name):
    mlp = make_decoder(activation_function=name, init_method_std=0.5).blocks[0].mlp
    x = torch.randn(3, 5, 32)
    expected = mlp.fc_out(HAND_ACTIVATIONS[name](mlp.fc_in(x)))
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_each_activation_gives_a_different_output():
    hidden, codes = make_inputs(T=8)
    weights = make_decoder(init_method_std=0.5).state_dict()
    outputs = {}
    for name in HAND_ACTIVATIONS:
        decoder = make_decoder(activation_function=name)
        decoder.load_state_dict(weights)
        with torch.no_grad():
            outputs[name] = decoder(hidden, codes)
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-4, (a, b)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="gelu_new"):
        make_decoder(activation_function="swish")


def test_max_seq_len_exceeded_raises():
    decoder = make_decoder(max_seq_len=6)
    hidden, codes = make_inputs(T=7)
    decoder(hidden[:, :6], codes[:, :6])
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder(hidden, codes)
    cache = decoder.new_cache()
    for t in range(6):
        decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder(hidden[:, 6:7], codes[:, 6:7], cache=cache)
    assert decoder.position_embeddings.weight.shape == (6, 32)


def test_input_projection_only_when_hidden_size_differs():
    assert make_decoder(hidden_size=24).input_proj.weight.shape == (32, 24)
    same = make_decoder(hidden_size=32)
    assert same.input_proj is None
    hidden, codes = make_inputs(T=4, hidden_size=32)
    assert same(hidden, codes).shape == (2, 4, K, V)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_method_std_sets_the_weight_spread(std):
    decoder = make_decoder(d_model=128, d_ff=256, n_layers=2, init_method_std=std)
    block = decoder.blocks[0]
    plain = (block.attn.qkv.weight, block.mlp.fc_in.weight, decoder.head.weight,
             decoder.code_embeddings[0].weight)
    for weight in plain:
        assert abs(weight.std().item() / std - 1) < 0.05
    # residual projections: std / sqrt(2 n_layers)
    for weight in (block.attn.out.weight, block.mlp.fc_out.weight):
        assert abs(weight.std().item() / (std / 2) - 1) < 0.05
    assert all(m.bias.abs().max() == 0 for m in decoder.modules() if isinstance(m, torch.nn.Linear))


def test_dropout_only_in_train_mode():
    hidden, codes = make_inputs(T=8)
    with_dropout = make_decoder(dropout=0.3, init_method_std=0.2)
    without = make_decoder(dropout=0.0)
    without.load_state_dict(with_dropout.state_dict())
    with torch.no_grad():
        eval_a, eval_b = with_dropout(hidden, codes), with_dropout(hidden, codes)
        reference = without(hidden, codes)
        with_dropout.train()
        train_a, train_b = with_dropout(hidden, codes), with_dropout(hidden, codes)
    assert torch.equal(eval_a, eval_b)
    torch.testing.assert_close(eval_a, reference, atol=1e-6, rtol=0)
    assert (train_a - train_b).abs().max() > 1e-3
    assert (train_a - reference).abs().max() > 1e-3


def test_layernorm_epsilon_reaches_every_norm():
    decoder = make_decoder(layernorm_epsilon=1e-3)  # config.py reads 1e-3 as a float
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * SMALL["n_layers"] + 1 and all(n.eps == 1e-3 for n in norms)
    hidden, codes = make_inputs(T=6)
    large = make_decoder(layernorm_epsilon=10.0)
    large.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        assert (large(hidden, codes) - decoder(hidden, codes)).abs().max() > 1e-3


# ---- training ----


@pytest.mark.parametrize("kind", list(DECODERS))
def test_a_few_adamw_steps_drive_the_loss_down(kind):
    if kind == "document":
        decoder = make_decoder().train()
    else:
        decoder = build_speech_decoder(NEMO, H, K, V).train()
    hidden, targets = make_inputs(B=4, T=16)
    # frame 0 gets a start code
    prev_codes = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = decoder(hidden, prev_codes)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if kind == "document":  # NeMo keeps PyTorch's default init for its output layer
        assert abs(losses[0] - math.log(V)) < 0.1  # starts at chance
    assert losses[-1] < 0.5 * losses[0]


# ---- NeMo's decoder ----


def nemo_fixture():
    """NeMo 3.0's TransformerARSpeechDecoder: constructor arguments, state dict, inputs, outputs."""
    meta = json.loads((FIXTURES / "nemo_speech_decoder.json").read_text())["constructor_kwargs"]
    return meta, load_file(FIXTURES / "nemo_speech_decoder.safetensors"), \
        load_file(FIXTURES / "nemo_speech_decoder_io.safetensors")


def test_nemo_weights_give_nemo_logits_in_one_pass_and_frame_by_frame():
    meta, state, io = nemo_fixture()
    section = meta["speech_decoder_parms"]
    unchanged = copy.deepcopy(section)
    k, v = meta["num_audio_codebooks"], meta["num_audio_tokens_per_codebook"]
    decoder = build_speech_decoder(section, meta["lantent_dim"], k, v).eval()
    assert isinstance(decoder, TransformerARSpeechDecoder)
    assert section == unchanged  # NeMo pops keys from it; not here
    masks = {name: t for name, t in state.items() if name.endswith("causal_mask")}
    assert len(masks) == 2
    assert all(torch.equal(m[0, 0], torch.ones(32, 32).tril()) for m in masks.values())
    decoder.load_state_dict({n: t for n, t in state.items() if n not in masks})  # strict
    hidden, codes = io["hidden_states"], io["input_audio_tokens"]  # (B, T, H), (B, T, K)
    with torch.no_grad():
        full = decoder(hidden, codes)
        cache = decoder.new_cache()
        steps = torch.cat([decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache)
                           for t in range(7)], 1)
        t5_output = decoder.t5_decoder(io["t5_input"], None)
    torch.testing.assert_close(full, io["audio_logits"], atol=1e-6, rtol=0)
    nemo_steps = io["all_code_logits_stepwise"].view(2, 7, k, v)
    torch.testing.assert_close(steps, nemo_steps, atol=1e-6, rtol=0)
    torch.testing.assert_close(t5_output, io["t5_output"], atol=1e-6, rtol=0)
    # NeMo masks right padding; frames before it do not see it (causal): they agree without a mask
    valid = io["speech_mask_padded"]
    assert not valid.all()
    padded = io["all_code_logits_padded"].view(2, 7, k, v)
    torch.testing.assert_close(full[valid], padded[valid], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("use_cache", [True, False])
def test_nemo_decoder_step_by_step_matches_full_forward(kernel_size, use_cache):
    decoder = make_nemo_decoder(kernel_size=kernel_size)
    decoder.use_cache = use_cache  # off: each call recomputes the frames so far (as NeMo's does)
    hidden, codes = make_inputs(T=24)
    with torch.no_grad():
        full = decoder(hidden, codes)
        cache = decoder.new_cache()
        steps = torch.cat([decoder(hidden[:, t : t + 1], codes[:, t : t + 1], cache=cache)
                           for t in range(24)], 1)
        chunked = decoder.new_cache()  # chunks shorter and longer than the convolutions' context
        bounds = [0, 1, 11, 13, *range(14, 25)]
        chunks = [decoder(hidden[:, a:b], codes[:, a:b], cache=chunked)
                  for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)
    if use_cache:  # keys and values, and each convolution's last kernel_size - 1 inputs
        shapes = [tuple(t.shape) for t in cache.conv_inputs[1]]
        assert shapes == [(2, kernel_size - 1, 32), (2, kernel_size - 1, 64)]
        assert cache.keys[0].shape == (2, 4, 24, 8) and cache.hidden is None


def test_nemo_feed_forward_sees_kernel_size_frames_per_convolution():
    decoder = make_nemo_decoder(n_layers=1, kernel_size=3)
    ff = decoder.t5_decoder.layers[0].pos_ff
    x = torch.randn(2, 9, 32)
    with torch.no_grad():  # by hand: zeros before the first frame, no bias, GELU (tanh) between
        w1, w2 = ff.proj.conv.weight, ff.o_net.conv.weight  # (64, 32, 3), (32, 64, 3)
        padded = F.pad(x, (0, 0, 2, 0))
        h = sum(padded[:, j : j + 9] @ w1[:, :, j].T for j in range(3))
        h = F.pad(F.gelu(h, approximate="tanh"), (0, 0, 2, 0))
        expected = sum(h[:, j : j + 9] @ w2[:, :, j].T for j in range(3))
        torch.testing.assert_close(ff(x, None, 0), expected, atol=1e-5, rtol=1e-5)


def test_the_keys_choose_the_architecture():
    assert decoder_class(NEMO) is TransformerARSpeechDecoder
    assert decoder_class(SMALL) is SpeechDecoder
    assert decoder_class({"n_layers": 1, "d_model": 8}) is SpeechDecoder  # shared keys only
    nemo_target = "nemo.collections.speechlm2.modules.speech_generation.TransformerARSpeechDecoder"
    assert decoder_class({**NEMO, "target": nemo_target}) is TransformerARSpeechDecoder
    assert decoder_class({**SMALL, "target": nemo_target}) is SpeechDecoder  # as in the document
    ar_target = "speech_decoder.TransformerARSpeechDecoder"
    assert decoder_class({"target": ar_target}) is TransformerARSpeechDecoder
    with pytest.raises(ValueError, match=r"mixes NeMo's keys \(d_ffn, kernel_size\) with the "
                                         r"configuration document's \(d_ff\); use one set"):
        decoder_class({"d_ffn": 8, "kernel_size": 3, "d_ff": 8})
    with pytest.raises(ValueError, match="unknown speech_decoder key 'd_ff' for TransformerARConf"):
        build_speech_decoder({**NEMO, "d_ff": 8, "target": ar_target}, H, K, V)
    with pytest.raises(ValueError, match="speech_decoder.kernel_size is required"):
        build_speech_decoder({"n_layers": 1, "d_model": 8, "d_ffn": 8, "sa_n_heads": 2}, H, K, V)


@pytest.mark.parametrize("key, value, message", [
    ("is_causal", False, "needs a causal decoder; set is_causal: true"),
    ("has_xattn", True, "no memory to cross-attend to .*set has_xattn: false"),
    ("cfg_unconditional_prob", 0.1, "classifier-free guidance is not implemented"),
    ("d_ffn", 0, "d_ffn must be a positive integer"),
    ("p_dropout", 1.0, r"p_dropout must be in \[0, 1\)"),
    ("sa_n_heads", 5, "not divisible by sa_n_heads=5"),
])
def test_nemo_options_the_duplex_models_cannot_use_are_refused(key, value, message):
    with pytest.raises(ValueError, match=f"speech_decoder.*{message}"):
        build_speech_decoder({**NEMO, key: value}, H, K, V)


def test_nemo_keys_without_effect_here_change_nothing():
    unused = dict(xa_d_memory=7, xa_n_heads=3, xa_d_head=5, apply_norm_to_cond=False, cfg_scale=4.0,
                  cfg_unconditional_prob=None)
    a, b = make_nemo_decoder(), make_nemo_decoder(**unused)
    hidden, codes = make_inputs(T=6)
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(a(hidden, codes), b(hidden, codes), atol=0, rtol=0)


def test_nemo_defaults_and_optional_parts():
    nemo_defaults = {"n_layers": 1, "d_model": 16, "d_ffn": 32, "sa_n_heads": 2, "kernel_size": 3}
    decoder = build_speech_decoder(nemo_defaults, H, K, V)
    # NeMo's defaults: no positions, no final norm, 4096 frames, no dropout
    names = set(decoder.state_dict())
    assert not any("position_embeddings" in n or "norm_out" in n for n in names)
    assert decoder.max_seq_len == 4096 and decoder.t5_decoder.dropout.p == 0.0
    assert {n for n in names if not n.startswith("t5_decoder.layers")} == {
        "input_proj.weight", "input_proj.bias", "final_proj.weight", "final_proj.bias",
        *(f"audio_embeddings.{k}.weight" for k in range(K))}
    assert not any(n.endswith(".bias") for n in names if n.startswith("t5_decoder."))  # as NeMo
    same = make_nemo_decoder(hidden_size=32)
    assert same.input_proj is None
    hidden, codes = make_inputs(T=5, hidden_size=32)
    assert same(hidden, codes).shape == (2, 5, K, V)


def test_nemo_decoder_without_previous_codes_ignores_them():
    decoder = make_nemo_decoder(cond_on_prev_audio_tokens=False)
    assert decoder.audio_embeddings is None
    hidden, codes = make_inputs(T=6)
    with torch.no_grad():
        same = decoder(hidden, (codes + 1) % V)
        torch.testing.assert_close(decoder(hidden, codes), same, atol=0, rtol=0)
    conditioned = make_nemo_decoder()
    assert (conditioned(hidden, codes) - conditioned(hidden, (codes + 1) % V)).abs().max() > 1e-3


@pytest.mark.parametrize("detach_input", [False, True])
def test_detach_input_keeps_the_audio_loss_out_of_the_llm(detach_input):
    decoder = make_nemo_decoder(detach_input=detach_input)
    hidden, codes = make_inputs(T=6)
    hidden.requires_grad_(True)
    decoder(hidden, codes).sum().backward()
    assert (hidden.grad is None) == detach_input
    assert decoder.input_proj.weight.grad.abs().max() > 0  # the decoder itself still learns


def test_nemo_init():
    torch.manual_seed(0)
    decoder = build_speech_decoder({**NEMO, "d_model": 128, "d_ffn": 256, "n_layers": 2}, 64, K, V)
    layer = decoder.t5_decoder.layers[0]
    for weight in (layer.self_attention.qkv_net.weight, layer.pos_ff.proj.conv.weight,
                   decoder.t5_decoder.position_embeddings.weight):
        assert abs(weight.std().item() / 0.02 - 1) < 0.05
    for weight in (layer.self_attention.o_net.weight, layer.pos_ff.o_net.conv.weight):
        # the projections into the residual stream: 0.02 / sqrt(2 n_layers)
        assert abs(weight.std().item() / 0.01 - 1) < 0.05
    # outside the transformer PyTorch's defaults, as in NeMo: uniform(+-1/sqrt(fan_in)) linears,
    # N(0, 1) embeddings
    for linear in (decoder.input_proj, decoder.final_proj):
        bound = 1 / math.sqrt(linear.in_features)
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
    assert abs(decoder.audio_embeddings[0].weight.std().item() - 1) < 0.1


def test_nemo_dropout_only_in_train_mode():
    decoder = make_nemo_decoder(p_dropout=0.3, p_dropout_out=0.2)
    hidden, codes = make_inputs(T=8)
    with torch.no_grad():
        eval_a, eval_b = decoder(hidden, codes), decoder(hidden, codes)
        decoder.train()
        train_a, train_b = decoder(hidden, codes), decoder(hidden, codes)
    assert torch.equal(eval_a, eval_b) and (train_a - train_b).abs().max() > 1e-3
    assert decoder.t5_decoder.dropout_out.p == 0.2


def test_max_length_causal_mask_exceeded_raises():
    decoder = make_nemo_decoder(max_length_causal_mask=6, use_learnable_pos_emb=False)
    hidden, codes = make_inputs(T=7)
    decoder(hidden[:, :6], codes[:, :6])
    with pytest.raises(ValueError, match="got 7 frames but max_length_causal_mask is 6"):
        decoder(hidden, codes)
