import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import MonoCut
from lhotse.testing.dummies import dummy_recording
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import EncodecConfig, EncodecModel, LlamaConfig, PreTrainedTokenizerFast

import duplex_s2s
import infer
import train
from checkpoint import load_nemo_duplex_weights
from config import ConfigError, load_config
from conftest import WORDS
from data import DuplexS2SDataset
from duplex_s2s import (DuplexS2SModel, DuplexS2SSpeechDecoderModel, check_data_config,
                        load_audio_codec)
from manifests import read_duplex_demo, read_inputs
from salm import DEFAULT_ASR_PROMPT, SALM, load_tokenizer
from speech_decoder import TransformerARSpeechDecoder

ROOT = Path(__file__).resolve().parents[1]
TINY_MIMI = ROOT / "assets" / "tiny-mimi"
DATA_CFG = dict(frame_length=0.08, source_sample_rate=16000, target_sample_rate=24000,
                input_roles=["user"], output_roles=["agent", "assistant"])
SPEECH_DECODER = dict(d_model=32, n_layers=1, n_heads=4, d_kv=8, d_ff=64, max_seq_len=512,
                      dropout=0.0, layernorm_epsilon=1e-5, activation_function="gelu_new",
                      init_method_std=0.02, use_cache=True)
NEMO_SPEECH_DECODER = dict(n_layers=1, d_model=32, d_ffn=64, sa_n_heads=4, kernel_size=3,
                           apply_norm_out=True,
                           max_length_causal_mask=512, use_learnable_pos_emb=True)  # NeMo's keys
DECODERS = dict(argvalues=[False, True, "nemo"],
                ids=["duplex", "speech_decoder", "nemo_speech_decoder"])
NO_DROPOUT = dict(dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)
CAUSAL = dict(causal_downsampling=True, att_context_size=[70, 1],
              att_context_style="chunked_limited", conv_context_size="causal",
              conv_norm_type="layer_norm")


def model_cfg(llm_dir, speech_decoder=False, causal=True, **overrides) -> dict:
    encoder = dict(feat_in=80, n_layers=1, d_model=32, n_heads=4, subsampling="dw_striding",
                   subsampling_factor=8, subsampling_conv_channels=16, ff_expansion_factor=2,
                   conv_kernel_size=9, **NO_DROPOUT)
    adapter = dict(_target_="nemo.collections.asr.modules.ConformerEncoder", feat_in=32,
                   n_layers=1, d_model=32, n_heads=4, subsampling_factor=1, ff_expansion_factor=2,
                   conv_kernel_size=9, **NO_DROPOUT)
    if causal:
        encoder, adapter = dict(encoder, **CAUSAL), dict(adapter, **CAUSAL)
    cfg = {
        "pretrained_llm": str(llm_dir), "pretrained_audio_codec": str(TINY_MIMI),
        "pretrained_weights": False, "freeze_params": ["^audio_codec\\..+$"],
        "audio_loss_weight": 1, "text_loss_weight": 3,
        "perception": {"preprocessor": dict(features=80, normalize="NA", dither=0.0),
                       "encoder": encoder, "modality_adapter": adapter},
    }
    if speech_decoder:
        decoder = NEMO_SPEECH_DECODER if speech_decoder == "nemo" else SPEECH_DECODER
        cfg["speech_decoder"] = dict(decoder)
    return {**cfg, **overrides}


def build(llm_dir, speech_decoder=False, seed=0, **overrides):
    torch.manual_seed(seed)
    cls = DuplexS2SSpeechDecoderModel if speech_decoder else DuplexS2SModel
    return cls(model_cfg(llm_dir, speech_decoder, **overrides)).eval()


def tones(text: str, sample_rate: int = 16000, seconds_per_word: float = 0.2) -> np.ndarray:
    """Stand-in speech: one tone per word, its pitch set by the word."""
    t = np.arange(int(seconds_per_word * sample_rate)) / sample_rate
    return np.concatenate([0.3 * np.sin(2 * np.pi * (200 + 40 * WORDS.index(w)) * t)
                           for w in text.split()])


def memory_cut(cut_id: str, samples: np.ndarray, sample_rate: int = 16000) -> MonoCut:
    data = io.BytesIO()
    sf.write(data, samples.astype(np.float32), sample_rate, format="FLAC", subtype="PCM_16")
    return Recording.from_bytes(data.getvalue(), recording_id=cut_id).to_cut()


QA = [("what is two plus three", "two plus three is five"),
      ("what comes after four", "five comes after four"),
      ("what color is the sky", "the sky is blue"), ("what is one plus one", "one plus one is two"),
      ("what is six plus two", "six plus two is eight"),
      ("what comes after nine", "ten comes after nine")]


@pytest.fixture(scope="session")
def qa_shar(tmp_path_factory):
    """Question/answer utterances laid out as the demo data: custom pair_id and role,
    speaker = role."""
    cuts = []
    for i, (question, answer) in enumerate(QA):
        for role, text in (("user", question), ("agent", answer)):
            cut = memory_cut(f"qa-{i}-{role}", tones(text))
            cut.supervisions = [SupervisionSegment(cut.id, cut.id, 0.0, cut.duration, text=text,
                                                   speaker=role)]
            cut.custom = {"pair_id": f"qa-{i}", "role": role}
            cuts.append(cut)
    path = tmp_path_factory.mktemp("qa")
    CutSet.from_cuts(cuts).to_shar(path, fields={"recording": "flac"}, shard_size=100)
    return path


@pytest.fixture(scope="session")
def conversations(qa_shar):
    return list(read_duplex_demo(qa_shar, seed=0))


def make_batch(model, cuts):
    return model.make_dataset(DATA_CFG)[CutSet.from_cuts(cuts)]


# ---- data ----------------------------------------------------------------------------------------

def nemo_example_cut() -> MonoCut:
    """NeMo's test_s2s_dataset cut: 1 s, user "hi" 0-0.1, assistant "hello" 0.3-0.4,
    user "ok" 0.5-0.6, assistant "okay" 0.6-1.0."""
    recording = dummy_recording(0, duration=1.0, with_data=True)
    turns = [("user", "hi", 0.0, 0.1), ("assistant", "hello", 0.3, 0.1), ("user", "ok", 0.5, 0.1),
             ("assistant", "okay", 0.6, 0.4)]
    supervisions = [SupervisionSegment(f"s{i}", recording.id, start, duration, text=text,
                                       speaker=role)
                    for i, (role, text, start, duration) in enumerate(turns)]
    return MonoCut("example", 0.0, 1.0, 0, recording=recording, supervisions=supervisions,
                   custom={"target_audio": dummy_recording(1, duration=1.0, with_data=True)})


# NeMo's vectors for that cut with TinyLlama's tokenizer (pad 0, BOS 1, EOS 2; "hello" and "ok"
# one token each).
NEMO_TARGET_TOKENS = [0, 0, 0, 0, 1, 2, 0, 0, 1, 20759, 0, 0, 0]
NEMO_SOURCE_TOKENS = [1, 2, 0, 0, 0, 0, 1, 3431, 2, 0, 0, 0, 0]


def test_text_channel_of_nemo_example(llm_dir):
    model = build(llm_dir)
    tok, pad, bos, eos = model.tokenizer, model.text_pad_id, model.text_bos_id, model.text_eos_id
    dataset = model.make_dataset(dict(DATA_CFG, output_roles=["assistant"]))
    batch = dataset[CutSet.from_cuts([nemo_example_cut()])]
    target, source = batch["target_tokens"][0].tolist(), batch["source_tokens"][0].tolist()
    marks = lambda row, b, e: [("B" if t == b else "E" if t == e else ".") for t in row]
    # BOS and EOS on the same frames as NeMo's
    assert marks(target, bos, eos) == marks(NEMO_TARGET_TOKENS, 1, 2)
    assert marks(source, bos, eos) == marks(NEMO_SOURCE_TOKENS, 1, 2)
    # by hand: text right after each BOS, one token per frame; EOS at the end-of-speech frame over
    # "hello"'s first token; this tokenizer splits some words, so their later pieces take NeMo's
    # pad frames
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    expected = [pad] * 13
    expected[4 : 5 + len(ids("hello"))] = [bos] + ids("hello")
    expected[5] = eos
    expected[8 : 9 + len(ids("okay"))] = [bos] + ids("okay")
    assert target == expected
    nemo_pads = [i for i, t in enumerate(NEMO_TARGET_TOKENS) if t == 0]
    spill = set(range(6, 5 + len(ids("hello")))) | set(range(10, 9 + len(ids("okay"))))
    assert all(target[i] == pad for i in nemo_pads if i not in spill)
    assert batch["target_texts"] == ["hello okay"]
    assert batch["source_audio"].shape == (1, 16000) and batch["target_audio"].shape == (1, 24000)
    assert batch["target_token_lens"].tolist() == [13]


# NeMo 3.0's DuplexS2SDataset on that cut with the tiny LLM's tokenizer in NeMo's tokenizer wrapper,
# as kept in tests/fixtures/nemo/tokenizer ("hi" 313, "hello" 266 303 87, "ok" 362, "okay" 362 347;
# pad 3, BOS 1, EOS 2)
NEMO_TINY_TARGET_TOKENS = [3, 3, 3, 3, 1, 2, 303, 87, 1, 362, 347, 3, 3]
NEMO_TINY_SOURCE_TOKENS = [1, 2, 3, 3, 3, 3, 1, 362, 2, 3, 3, 3, 3]


def test_both_text_channels_equal_nemos_with_the_same_tokenizer():
    tokenizer = load_tokenizer(str(ROOT / "tests" / "fixtures" / "nemo" / "tokenizer"), None)
    dataset = DuplexS2SDataset(tokenizer, tokenizer.pad_token_id, 0.08, 16000, 22050, ["user"],
                               ["assistant"])
    batch = dataset[CutSet.from_cuts([nemo_example_cut()])]
    assert batch["target_tokens"].tolist() == [NEMO_TINY_TARGET_TOKENS]
    assert batch["source_tokens"].tolist() == [NEMO_TINY_SOURCE_TOKENS]  # the user's channel
    assert batch["target_texts"] == ["hello okay"]
    assert batch["source_audio"].shape == (1, 16000) and batch["target_audio"].shape == (1, 22050)


def test_duplex_demo_conversations(qa_shar, conversations):
    again = list(read_duplex_demo(qa_shar, seed=0))
    assert [c.id for c in again] == [c.id for c in conversations]
    starts = lambda cuts: [s.start for c in cuts for s in c.supervisions]
    assert starts(again) == starts(conversations)
    assert sorted(s.text for c in conversations for s in c.supervisions) == \
        sorted(t for qa in QA for t in qa)
    for cut in conversations:
        user = cut.load_audio()[0]
        agent = cut.custom["target_audio"].load_audio()[0]
        sups = sorted(cut.supervisions, key=lambda s: s.start)
        assert 1 <= len(sups) // 2 <= 3
        assert [s.speaker for s in sups] == ["user", "agent"] * (len(sups) // 2)
        # turns alternate with pauses between
        assert all(a.end < b.start for a, b in zip(sups, sups[1:]))
        for sup in sups:
            span = slice(round(sup.start * 16000), round(sup.end * 16000))
            speaking, silent = (user, agent) if sup.speaker == "user" else (agent, user)
            assert np.abs(speaking[span]).max() > 0.1 and np.abs(silent[span]).max() == 0.0
            assert np.allclose(speaking[span], tones(sup.text), atol=1e-3)


def test_duplex_data_round_trips_through_shar(llm_dir, conversations, tmp_path):
    model = build(llm_dir)
    fields = {"recording": "flac", "target_audio": "flac"}
    CutSet.from_cuts(conversations[:3]).to_shar(tmp_path, fields=fields, shard_size=10)
    shar = {"input_cfg": [{"type": "lhotse_shar", "shar_path": str(tmp_path)}]}
    from_shar = list(read_inputs(shar, train=False))
    direct, stored = make_batch(model, conversations[:3]), make_batch(model, from_shar)
    for key in ("source_audio", "target_audio", "target_tokens", "source_tokens",
                "target_audio_lens"):
        assert torch.allclose(direct[key].float(), stored[key].float(), atol=1e-4), key
    assert direct["target_texts"] == stored["target_texts"]


# ---- model ---------------------------------------------------------------------------------------

def test_alignment_of_inputs_and_labels(llm_dir, conversations):
    model = build(llm_dir)
    batch = make_batch(model, conversations[:2])
    inputs = model.prepare_inputs(batch)
    # codes: (B, Tc, K)
    codes, _ = model.audio_codec.encode(batch["target_audio"], batch["target_audio_lens"])
    T = inputs["text_inputs"].size(1) + 1  # the shorter of the perception and codec streams
    assert T == codes.size(1) and T >= batch["target_tokens"].size(1)
    text = torch.nn.functional.pad(batch["target_tokens"], (0, T - batch["target_tokens"].size(1)),
                                   value=model.text_pad_id)
    bos, eos = model.text_bos_id, model.text_eos_id
    # text: fed text[t], predicts text[t+1]
    assert torch.equal(inputs["text_inputs"], text[:, :-1])
    assert torch.equal(inputs["text_labels"], text[:, 1:])
    # audio: fed codes[t-1] (the delay code first), predicts codes[t]; speech BOS/EOS where the
    # text has BOS/EOS
    assert (inputs["audio_inputs"][:, 0] == model.speech_delay_id).all()
    expected = torch.where(text[..., None] == bos, model.speech_bos_id, codes)
    expected = torch.where(text[..., None] == eos, model.speech_eos_id, expected)
    assert torch.equal(inputs["audio_labels"], expected[:, :-1])
    assert torch.equal(inputs["audio_inputs"][:, 1:], expected[:, :-2])
    # the text BOS is predicted one step before the speech BOS codes
    for special, speech in ((bos, model.speech_bos_id), (eos, model.speech_eos_id)):
        text_steps = (inputs["text_labels"] == special).nonzero().tolist()
        speech_steps = (inputs["audio_labels"] == speech).all(-1).nonzero().tolist()
        assert text_steps and [[b, t + 1] for b, t in text_steps if t + 1 < T - 1] == speech_steps
    assert not (inputs["audio_labels"] == model.speech_delay_id).any()
    assert inputs["frame_lens"].tolist() == [n - 1 for n in batch["target_token_lens"].tolist()]


def test_loss_matches_hand_computation(llm_dir, monkeypatch):
    model = build(llm_dir)
    K, V_t, V_s = model.num_codebooks, 5, 4
    g = torch.Generator().manual_seed(0)
    text_logits = torch.randn(2, 3, V_t, generator=g)
    audio_logits = torch.randn(2, 3, K, V_s, generator=g)
    text_labels = torch.randint(V_t, (2, 3), generator=g)
    audio_labels = torch.randint(V_s, (2, 3, K), generator=g)
    inputs = {"user_embeds": None, "text_inputs": None, "audio_inputs": None,
              "text_labels": text_labels, "audio_labels": audio_labels,
              "frame_lens": torch.tensor([3, 1])}
    monkeypatch.setattr(model, "prepare_inputs", lambda batch: inputs)
    logits = {"text_logits": text_logits, "audio_logits": audio_logits}
    monkeypatch.setattr(model, "forward", lambda *args: logits)
    out = model.training_step({})

    def nll(logits, label):  # -log softmax, by hand
        return math.log(sum(math.exp(v) for v in logits.tolist())) - logits[label].item()

    # the second session has one frame; its padding is not scored
    frames = [(0, 0), (0, 1), (0, 2), (1, 0)]
    text_loss = sum(nll(text_logits[b, t], text_labels[b, t]) for b, t in frames) / 4
    audio_loss = sum(nll(audio_logits[b, t, k], audio_labels[b, t, k])
                     for b, t in frames for k in range(K)) / (4 * K)
    assert out["count"] == 4
    assert out["log"]["text_loss"] == pytest.approx(text_loss, rel=1e-5)
    assert out["log"]["audio_loss"] == pytest.approx(audio_loss, rel=1e-5)
    assert (out["loss_sum"] / out["count"]).item() == \
        pytest.approx(3 * text_loss + 1 * audio_loss, rel=1e-5)


@pytest.mark.parametrize("speech_decoder", **DECODERS)
def test_training_steps_drive_both_losses_down(llm_dir, conversations, speech_decoder):
    model = build(llm_dir, speech_decoder)
    batch = make_batch(model, conversations[:2])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        out = model.training_step(batch)
        (out["loss_sum"] / out["count"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["log"])
    assert losses[-1]["text_loss"] < 0.5 * losses[0]["text_loss"]
    assert losses[-1]["audio_loss"] < 0.8 * losses[0]["audio_loss"]
    assert not any(p.grad is not None for p in model.audio_codec.parameters())


@pytest.mark.parametrize("speech_decoder", **DECODERS)
def test_offline_inference_on_one_second(llm_dir, speech_decoder):
    model = build(llm_dir, speech_decoder)
    out = model.offline_inference(torch.randn(1, 16000), torch.tensor([16000]))
    K = model.num_codebooks
    assert set(out) == {"text", "tokens_text", "tokens_audio", "tokens_len", "audio", "audio_len"}
    # causal encoder
    assert out["tokens_text"].shape == (1, 14) and out["tokens_audio"].shape == (1, 14, K)
    assert 0 <= out["tokens_text"].min() and out["tokens_text"].max() < model.lm_head.out_features
    assert 0 <= out["tokens_audio"].min() and out["tokens_audio"].max() < model.speech_vocab_size
    assert out["audio"].dtype == torch.float32 and out["audio"].shape == (1, 14 * 1920)
    assert out["audio_len"].tolist() == [14 * 1920] and isinstance(out["text"][0], str)
    assert build(llm_dir, speech_decoder, causal=False).offline_inference(
        torch.randn(1, 16000), torch.tensor([16000]))["tokens_audio"].shape == (1, 13, K)


@pytest.mark.parametrize("speech_decoder", **DECODERS)
def test_cached_loop_equals_full_forward_over_its_outputs(llm_dir, conversations, speech_decoder):
    model = build(llm_dir, speech_decoder, seed=1)
    # make the outputs vary: a random model answers with the same token every frame
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        decoder = getattr(model, "speech_decoder", None)
        head = model.audio_head if not speech_decoder else getattr(decoder, "head", None)
        head = head or decoder.final_proj
        head.weight.mul_(30)
    audio = make_batch(model, conversations[:1])["source_audio"][:, :40000]
    out = model.offline_inference(audio, torch.tensor([audio.size(1)]), decode_audio=False)
    text, codes = out["tokens_text"], out["tokens_audio"]  # (1, T), (1, T, K)
    assert len(text.unique()) >= 3 and len(codes.unique()) >= 3
    text_in = torch.cat([torch.full_like(text[:, :1], model.text_pad_id), text[:, :-1]], 1)
    codes_in = torch.cat([torch.full_like(codes[:, :1], model.speech_delay_id), codes[:, :-1]], 1)
    with torch.no_grad():
        user, _ = model.perception(audio, torch.tensor([audio.size(1)]))
        logits = model(user, text_in, codes_in)
    assert torch.equal(logits["text_logits"].argmax(-1), text)
    assert torch.equal(logits["audio_logits"].argmax(-1), codes)


def test_batched_inference_equals_one_by_one(llm_dir):
    model = build(llm_dir)
    audio = torch.randn(2, 24000)
    lens = torch.tensor([24000, 16000])
    batched = model.offline_inference(audio, lens)
    for i, n in enumerate(lens.tolist()):
        alone = model.offline_inference(audio[i : i + 1, :n], lens[i : i + 1])
        frames = int(alone["tokens_len"][0])
        assert int(batched["tokens_len"][i]) == frames
        assert torch.equal(batched["tokens_text"][i, :frames], alone["tokens_text"][0])
        assert torch.equal(batched["tokens_audio"][i, :frames], alone["tokens_audio"][0])


def test_validation_scores_and_bleu(llm_dir, conversations):
    model = build(llm_dir)
    batch = make_batch(model, conversations[:2])
    out = model.validation_step(batch, generate=True)
    assert [ref for ref, _ in out["pairs"]] == batch["target_texts"]
    summary = model.validation_summary(out)
    assert summary["loss"] == pytest.approx(3 * summary["text_loss"] + summary["audio_loss"])
    assert 0.0 <= summary["txt_bleu"] <= 100.0 and "asr_bleu" not in summary

    class Echo:  # a perfect scoring ASR: transcribes each clip as its reference
        def transcribe(self, clips, sample_rate):
            assert sample_rate == 24000
            assert [len(c) for c in clips] == (out2["tokens_len"] * 1920).tolist()
            return list(batch["target_texts"])

    model._scorer = Echo()
    out2 = model.offline_inference(batch["source_audio"], batch["source_audio_lens"],
                                   decode_audio=False)
    out = model.validation_step(batch, generate=True)
    assert model.validation_summary(out)["asr_bleu"] == pytest.approx(100.0)


def test_scoring_asr_from_a_salm_checkpoint(llm_dir, tmp_path):
    cfg = dict(model_cfg(llm_dir, causal=False), audio_locator_tag="<|audio|>",
               prompt_format="llama2", freeze_params=[])
    del cfg["pretrained_audio_codec"]
    torch.manual_seed(0)
    salm = SALM(cfg).eval()
    tags = {"context": "Repeat after me"}
    data = {"train_ds": {"input_cfg": [{"type": "lhotse_as_conversation", "tags": tags}]}}
    torch.save({"model": salm.state_dict(), "config": {"model": cfg, "data": data}},
               tmp_path / "last.ckpt")
    scorer = build(llm_dir, scoring_asr=str(tmp_path))._scoring_asr()
    clip = 0.1 * torch.randn(24000)
    # by hand: the clip at 16 kHz, prompted as SALM was trained (its context tag, then the audio)
    clip_16k = torch.from_numpy(duplex_s2s.resample(clip.numpy(), 24000, 16000))
    ids = salm.generate([[{"role": "user", "content": "Repeat after me <|audio|>"}]],
                        audios=clip_16k[None], audio_lens=torch.tensor([16000]),
                        max_new_tokens=128)
    expected = salm.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert scorer.transcribe([clip], 24000) == [expected]
    # trained without a context: asked with the audio alone; not a checkpoint: infer's default
    # ASR prompt
    torch.save({"model": {}, "config": {"model": cfg}}, tmp_path / "bare.ckpt")
    assert duplex_s2s.scoring_asr_prompt(tmp_path / "bare.ckpt") == ""
    assert duplex_s2s.scoring_asr_prompt("openai/whisper-small") == DEFAULT_ASR_PROMPT


def test_decode_text_joins_turns():
    class Tok:
        def decode(self, ids, skip_special_tokens):
            return "".join(chr(96 + i) for i in ids if i > 3)

    model = DuplexS2SModel.__new__(DuplexS2SModel)
    torch.nn.Module.__init__(model)
    model.tokenizer = type("T", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                                     "decode": Tok.decode})()
    assert model.decode_text(torch.tensor([3, 1, 8, 9, 3, 2, 3, 1, 15, 11, 3])) == "hi ok"


# ---- codec and start-up checks -------------------------------------------------------------------

def test_tiny_codec_is_seeded_and_not_degenerate(conversations):
    codec, again = load_audio_codec(str(TINY_MIMI)), load_audio_codec(str(TINY_MIMI))
    assert all(torch.equal(a, b)
               for a, b in zip(codec.state_dict().values(), again.state_dict().values()))
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == \
        (24000, 12.5, 8, 256)
    audio = torch.from_numpy(conversations[0].custom["target_audio"].resample(24000).load_audio())
    codes, lens = codec.encode(audio, torch.tensor([audio.size(1)]))
    assert codes.shape == (1, math.ceil(audio.size(1) / 1920), 8)
    assert lens.tolist() == [codes.size(1)]
    # a fresh Mimi gives code 0 everywhere
    assert all(len(codes[0, :, k].unique()) >= 8 for k in range(8))
    # a causal codec: right padding in a batch leaves a clip's complete frames as they are alone
    short = audio[:, :30000]  # 15.6 frames
    padded = torch.cat([audio[:, :60000], torch.nn.functional.pad(short, (0, 30000))])
    batch_codes, batch_lens = codec.encode(padded, torch.tensor([60000, 30000]))
    alone = codec.encode(short, torch.tensor([30000]))[0][0]
    assert batch_lens.tolist() == [32, 16] and torch.equal(batch_codes[1, :15], alone[:15])
    decoded, decoded_lens = codec.decode(codes, lens)
    assert decoded.shape == (1, codes.size(1) * 1920) and decoded.abs().max() > 0
    assert codec.silence_codes.shape == (8,)
    codec.train()
    assert not codec.training and not any(p.requires_grad for p in codec.parameters())


def test_frame_rate_and_sample_rate_mismatch_fail_with_the_key(llm_dir, tmp_path):
    model = build(llm_dir)
    with pytest.raises(ValueError, match=r"set data\.frame_length to 0\.08"):
        model.make_dataset(dict(DATA_CFG, frame_length=0.04))
    with pytest.raises(ValueError, match=r"set data\.target_sample_rate to 24000"):
        model.make_dataset(dict(DATA_CFG, target_sample_rate=22050))
    with pytest.raises(ValueError, match=r"set data\.source_sample_rate to 16000"):
        model.make_dataset(dict(DATA_CFG, source_sample_rate=8000))
    # a real transformers codec at another rate: Encodec's 75 frames/s
    torch.manual_seed(0)
    config = EncodecConfig(sampling_rate=24000, num_filters=4, hidden_size=16, codebook_dim=16,
                           codebook_size=32, upsampling_ratios=[8, 5, 4, 2],
                           target_bandwidths=[1.5])
    EncodecModel(config).save_pretrained(tmp_path)
    encodec = load_audio_codec(str(tmp_path))
    assert encodec.frame_rate == 75.0
    codes, lens = encodec.encode(torch.randn(1, 24000), torch.tensor([24000]))
    assert codes.shape == (1, 75, encodec.num_codebooks)
    assert encodec.decode(codes, lens)[0].shape == (1, 24000)
    with pytest.raises(ValueError, match=r"runs at 75 frames/s but data\.frame_length is 0\.08"):
        check_data_config(DATA_CFG, encodec, model.perception, str(tmp_path))
    with pytest.raises(ValueError,
                       match="every 0.0133 s but the perception encoder every 0.0800 s"):
        build(llm_dir, pretrained_audio_codec=str(tmp_path))


def test_nemo_codec_path_names_supported_kinds():
    with pytest.raises(ValueError,
                       match=r"\.nemo.*not supported.*MimiModel.*EncodecModel / DacModel"):
        load_audio_codec("/models/low-frame-rate-speech-codec-22khz.nemo")
    with pytest.raises(FileNotFoundError, match="pretrained_audio_codec"):
        load_audio_codec("/no/such/codec")


# ---- command line --------------------------------------------------------------------------------

@pytest.mark.parametrize("speech_decoder", **DECODERS)
def test_command_line_writes_agent_audio_and_text(llm_dir, tmp_path, capsys, speech_decoder):
    model = build(llm_dir, speech_decoder)
    config = {"model": model_cfg(llm_dir, speech_decoder), "data": DATA_CFG}
    (tmp_path / "run").mkdir()
    torch.save({"model": model.state_dict(), "config": config, "step": 0},
               tmp_path / "run" / "last.ckpt")
    infer.export(tmp_path / "run" / "last.ckpt", tmp_path / "export")
    noise = 0.1 * np.random.default_rng(0).standard_normal(8000)
    sf.write(tmp_path / "in.wav", noise, 8000)  # resampled to 16 kHz
    expected = model.offline_inference(
        torch.from_numpy(duplex_s2s.resample(noise, 8000, 16000))[None], torch.tensor([16000]))
    assert int(expected["audio_len"][0]) == 14 * 1920
    raw = expected["audio"][0].numpy()
    assert np.abs(raw).max() > 1.5  # the untrained codec's output is far beyond full scale
    paths = [tmp_path / "run" / "last.ckpt", tmp_path / "run", tmp_path / "export"]
    for i, path in enumerate(paths):
        infer.main(["duplex", "--model", str(path), "--audio", str(tmp_path / "in.wav"),
                    "--out", str(tmp_path / f"out{i}")])
        agent, sample_rate = sf.read(tmp_path / f"out{i}" / "agent.wav", dtype="float32")
        assert sample_rate == 24000 and len(agent) == 14 * 1920
        assert np.abs(agent).max() == pytest.approx(0.9, abs=1e-4)  # scaled to 0.9, not clipped
        scaled = raw * 0.9 / np.abs(raw).max()
        assert np.abs(agent - scaled).max() < 1e-4  # the same waveform (16-bit rounding)
        assert (tmp_path / f"out{i}" / "agent.txt").read_text().strip() == expected["text"][0]
    assert "scaled to a peak of 0.9 instead of clipped" in capsys.readouterr().out


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", ["s2s_duplex.yaml", "s2s_duplex_speech_decoder.yaml"])
def test_train_script_lowers_both_losses(config, tmp_path):
    cmd = [sys.executable, "train.py", f"configs/{config}", "trainer.max_steps=60",
           "trainer.log_every_n_steps=10", "trainer.limit_val_batches=2",
           "trainer.enable_progress_bar=false",
           f"exp_manager.explicit_log_dir={tmp_path}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    logged = re.findall(r"text_loss ([\d.]+) \| audio_loss ([\d.]+)", run.stdout)
    first, last = [float(v) for v in logged[0]], [float(v) for v in logged[-1]]
    assert last[0] < 0.5 * first[0] and last[1] < 0.8 * first[1], run.stdout
    assert "val_txt_bleu" in run.stdout and (tmp_path / "checkpoints" / "last.ckpt").is_file()


# ---- NeMo interop: validation, weights, LoRA, padding, NeMo's example configs --------------------

NEMO_FIXTURES = ROOT / "tests" / "fixtures" / "nemo"
# NeMo's examples/speechlm2/conf/s2s_duplex*.yaml, verbatim (their git blob ids)
NEMO_CONFIGS = {"s2s_duplex.yaml": "a3801abcd32bc363791cfd751cdd441a90601c68",
                "s2s_duplex_speech_decoder.yaml": "acfe2c7958ad442ce1c0d82ce64687c821069161"}
NEMO_DECODER_KEYS = ["n_layers", "d_model", "d_ffn", "sa_n_heads", "kernel_size", "p_dropout",
                     "p_dropout_out", "has_xattn", "xa_d_memory", "xa_n_heads", "is_causal",
                     "apply_norm_to_cond", "apply_norm_out", "max_length_causal_mask",
                     "cond_on_prev_audio_tokens", "detach_input", "use_learnable_pos_emb"]


def test_every_validation_answers_the_conversations(llm_dir, conversations):
    model = build(llm_dir)
    batch = make_batch(model, conversations[:2])
    # the periodic validation (generate=False) answers them too, as NeMo's validation does
    results, pairs = train.validate(model, {"demo": [batch]}, 1.0, torch.device("cpu"), None)
    assert [ref for ref, _ in pairs] == batch["target_texts"]
    assert {"val_txt_bleu_demo", "val_txt_bleu", "val_loss_demo", "val_loss"} <= set(results)
    assert "val_asr_bleu" not in results  # no scoring ASR


def test_a_monitor_validation_never_logs_fails_before_training(llm_dir):
    model = build(llm_dir)
    exp = {"create_checkpoint_callback": True,
           "checkpoint_callback_params": {"monitor": "val_asr_bleu", "save_top_k": 1}}
    loaders = {"val_set_0": []}
    with pytest.raises(ConfigError, match=r"^checkpoint monitor 'val_asr_bleu' is never logged: "
                                          r"ASR-BLEU needs a scoring ASR: set model.scoring_asr "):
        train.check_monitor(exp, model, loaders)
    for monitor in ("val_txt_bleu", "val_txt_bleu_val_set_0", "val_loss",
                    "val_audio_loss_val_set_0"):
        params = {"monitor": monitor, "save_top_k": 1}
        train.check_monitor({**exp, "checkpoint_callback_params": params}, model, loaders)
    typo = {**exp, "checkpoint_callback_params": {"monitor": "val_wer", "save_top_k": 1}}
    with pytest.raises(ConfigError, match="'val_wer' is not a validation metric of this model; "
                                          "pick one of val_loss, val_loss_val_set_0, val_text_"):
        train.check_monitor(typo, model, loaders)
    model._scorer = object()  # a scoring ASR is there
    train.check_monitor(exp, model, loaders)


@pytest.mark.parametrize("name", ["stt_en_fastconformer_transducer_large", "/models/asr.nemo"])
def test_nemo_scoring_asr_says_it_is_out_of_scope_and_what_to_use(llm_dir, name):
    with pytest.raises(ValueError, match="NeMo ASR models .* are not supported, their transducer "
                                         "decoding is out of scope; use a SALM checkpoint or "
                                         "export of this project or a transformers "
                                         "speech-recognition model"):
        build(llm_dir, scoring_asr=name).validation_metrics()


def nemo_fixture_model(speech_decoder: bool, seed: int, **overrides):
    """Our model built from the config NeMo's state-dict fixture was built with (the tiny codec for
    NeMo's, a 64-frame decoder limit for NeMo's 5000: its causal masks would be 200 MB)."""
    name = f"nemo_duplex{'_speech_decoder' if speech_decoder else ''}_state_dict.json"
    info = json.loads((NEMO_FIXTURES / name).read_text())
    cfg = dict(info["config"], pretrained_llm=str(ROOT / "assets" / "tiny-llm"),
               pretrained_audio_codec=str(TINY_MIMI), pretrained_asr=None, scoring_asr=None,
               **overrides)
    cfg["perception"] = {k: v for k, v in cfg["perception"].items() if k != "output_dim"}
    if speech_decoder:
        cfg["speech_decoder"] = dict(cfg["speech_decoder"], max_length_causal_mask=64)
    torch.manual_seed(seed)
    cls = DuplexS2SSpeechDecoderModel if speech_decoder else DuplexS2SModel
    return cls(cfg).eval(), info


def nemo_named(model) -> dict:
    """Our model's weights under NeMo's names, written from NeMo's layout (llm = the decoder stack,
    embed_tokens and lm_head at the top, speech_generation), with the tensors only NeMo has."""
    renames = (("llm.model.base_model.model.embed_tokens.", "embed_tokens."),
               ("llm.model.embed_tokens.", "embed_tokens."), ("llm.lm_head.", "lm_head."),
               ("llm.model.", "llm."), ("speech_decoder.", "speech_generation."))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("audio_codec."):
            continue
        ours, nemo = next(((a, b) for a, b in renames if name.startswith(a)), ("", ""))
        state[nemo + name.removeprefix(ours)] = tensor
    state["_control_codes"] = torch.tensor([256, 257, 258])
    state["audio_codec.audio_encoder.pre_conv.conv.weight"] = torch.zeros(2, 1, 3)
    if hasattr(model, "speech_decoder"):
        for i in range(len(model.speech_decoder.t5_decoder.layers)):
            mask = torch.ones(64, 64).tril().view(1, 1, 64, 64)
            state[f"speech_generation.t5_decoder.layers.{i}.self_attention.causal_mask"] = mask
        state.update({f"embed_audio_tokens.{k}.weight": torch.zeros(259, 128) for k in range(8)})
        state.update({"audio_head.weight": torch.zeros(8 * 259, 128),
                      "audio_head.bias": torch.zeros(8 * 259)})
    return state


@pytest.mark.parametrize("speech_decoder", [False, True], ids=["duplex", "speech_decoder"])
def test_nemo_named_weights_load_and_answer_as_the_model_they_came_from(speech_decoder, tmp_path):
    source, info = nemo_fixture_model(speech_decoder, seed=0)
    state = nemo_named(source)
    # the names are NeMo's: those of the model NeMo 3.0 built from this config
    assert set(state) - {"audio_codec.audio_encoder.pre_conv.conv.weight"} == \
        {name for name in info["state_dict"] if not name.startswith("audio_codec.")}
    # a Lightning checkpoint's state_dict, or the state dict itself
    torch.save({"state_dict": state, "global_step": 7, "hyper_parameters": {"cfg": info["config"]}},
               tmp_path / "nemo.ckpt")
    audio = 0.1 * torch.randn(1, 24000, generator=torch.Generator().manual_seed(0))
    expected = source.offline_inference(audio, torch.tensor([24000]))
    for weights in (tmp_path / "nemo.ckpt", state):
        target, _ = nemo_fixture_model(speech_decoder, seed=1)
        load_nemo_duplex_weights(target, weights)
        got = target.offline_inference(audio, torch.tensor([24000]))
        assert torch.equal(got["tokens_text"], expected["tokens_text"])
        assert torch.equal(got["tokens_audio"], expected["tokens_audio"])
        torch.testing.assert_close(got["audio"], expected["audio"])
    # NeMo's codec has 2016 codes per codebook, the tiny one 256: the audio heads cannot load
    nemo_head = torch.zeros(info["state_dict"]["audio_head.weight"])
    nemo_shapes = {**state, "audio_head.weight": nemo_head}
    if not speech_decoder:
        with pytest.raises(ValueError, match=r"shapes differ \['audio_head.weight \(16152, 128\) "
                                             r"here \(2072, 128\)'\]"):
            load_nemo_duplex_weights(target, nemo_shapes)
    with pytest.raises(ValueError, match=r"missing \['perception.proj.weight'\]"):
        load_nemo_duplex_weights(target,
                                 {k: v for k, v in state.items() if k != "perception.proj.weight"})


def test_lora_wraps_the_decoder_stack_only_as_in_nemo(conversations):
    lora = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "task_type": "CAUSAL_LM"}
    model, _ = nemo_fixture_model(False, seed=0, lora=lora)
    # NeMo's parameters, with LoRA installed as NeMo's duplex models do (wrapping `llm` only)
    nemo = json.loads((NEMO_FIXTURES / "nemo_duplex_lora_parameters.json").read_text())
    nemo = nemo["parameters"]
    ours = {name: p for name, p in model.named_parameters(remove_duplicate=False)
            if not name.startswith("audio_codec.")}
    renames = (("embed_tokens.", "llm.model.base_model.model.embed_tokens."),
               ("lm_head.", "llm.lm_head."), ("llm.", "llm.model."))
    for name, (shape, trainable) in nemo.items():
        prefix, ours_prefix = next((a, b) for a, b in renames + (("", ""),) if name.startswith(a))
        param = ours[ours_prefix + name.removeprefix(prefix)]
        assert param.requires_grad == trainable, name
        if not name.startswith(("embed_audio_tokens.", "audio_head.")):  # NeMo's codec differs
            assert list(param.shape) == shape, name
    assert len(ours) == len(nemo) + 1  # + the embedding: lm_head's tensor, which NeMo lists once
    assert model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    # the adapters and the embedding learn; the merged model answers as the adapted one
    model.train()
    model.training_step(make_batch(model, conversations[:1]))["loss"].backward()
    assert model.embed_tokens.weight.grad.abs().max() > 0
    lora_b = model.llm.model.base_model.model.layers[0].self_attn.q_proj.lora_B.default.weight
    assert lora_b.grad.abs().max() > 0  # (A's gradient is 0 while B is at its initial 0)
    model.eval()
    audio = torch.randn(1, 16000)
    before = model.offline_inference(audio, torch.tensor([16000]), decode_audio=False)
    model.merge_lora()
    after = model.offline_inference(audio, torch.tensor([16000]), decode_audio=False)
    assert not any("lora" in name for name in model.state_dict())
    assert torch.equal(before["tokens_text"], after["tokens_text"])
    assert torch.equal(before["tokens_audio"], after["tokens_audio"])


def test_nemo_named_lora_weights_load(tmp_path):
    lora = {"r": 4, "lora_alpha": 8}
    source, _ = nemo_fixture_model(False, seed=0, lora=lora)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters something to carry
        for name, param in source.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    state = nemo_named(source)
    assert "llm.base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
    target, _ = nemo_fixture_model(False, seed=1, lora=lora)
    load_nemo_duplex_weights(target, state)
    audio = torch.randn(1, 16000)
    expected = source.offline_inference(audio, torch.tensor([16000]), decode_audio=False)
    got = target.offline_inference(audio, torch.tensor([16000]), decode_audio=False)
    assert torch.equal(got["tokens_text"], expected["tokens_text"])
    assert torch.equal(got["tokens_audio"], expected["tokens_audio"])


@pytest.fixture(scope="session")
def llm_dir_without_pad(tmp_path_factory):
    """A Llama-3-like tokenizer: BOS and EOS (added last), no pad and no unk token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    tokenizer.add_special_tokens(["<|begin|>", "<|end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin|>",
                                   eos_token="<|end|>")
    path = tmp_path_factory.mktemp("llm_without_pad")
    fast.save_pretrained(path)
    LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=fast.bos_token_id,
                eos_token_id=fast.eos_token_id).save_pretrained(path)
    return path


def test_a_tokenizer_without_pad_or_unk_pads_with_id_0_as_nemo(llm_dir_without_pad, conversations):
    with pytest.warns(UserWarning, match="has no pad or unk token: padding with id 0"):
        model = build(llm_dir_without_pad)
    assert model.text_pad_id == 0 and model.text_bos_id > 0 and model.text_eos_id > 0
    batch = make_batch(model, conversations[:1])
    silent = batch["target_tokens"][0, :5]  # the agent is silent while the user asks
    assert silent.tolist() == [0] * 5
    text = model.decode_text(batch["target_tokens"][0])  # id 0 is "!": pads are dropped, as NeMo
    assert "!" not in text and text.split()[:3] == batch["target_texts"][0].split()[:3]
    salm_tokenizer = load_tokenizer(str(llm_dir_without_pad), None)
    assert salm_tokenizer.pad_token_id == model.text_eos_id  # SALM pads with EOS


def nemo_overrides(shar: Path, out: Path, speech_decoder: bool) -> list[str]:
    """Paths and sizes only: NeMo's example configs offline on a CPU, with the tiny LLM and codec,
    no pretrained ASR but a small encoder, small adapter and speech decoder, conversations in
    `shar`."""
    encoder = ("{feat_in: 80, n_layers: 1, d_model: 32, n_heads: 2, subsampling: dw_striding, "
               "subsampling_factor: 8, subsampling_conv_channels: 16, causal_downsampling: true, "
               "att_context_size: [70, 1], att_context_style: chunked_limited, "
               "conv_context_size: causal, conv_norm_type: layer_norm}")
    overrides = [
        "model.pretrained_llm=assets/tiny-llm", "model.pretrained_weights=false",
        "model.pretrained_audio_codec=assets/tiny-mimi", "model.pretrained_asr=null",
        "model.scoring_asr=null", "+model.perception.preprocessor={features: 80, normalize: NA}",
        f"+model.perception.encoder={encoder}",
        *(f"model.perception.modality_adapter.{key}" for key in
          ("feat_in=32", "d_model=32", "n_heads=2", "subsampling_conv_channels=16")),
        "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.limit_val_batches=2",
        "data.target_sample_rate=24000",  # the tiny codec's (NeMo's codec: 22050)
        f"data.train_ds.input_cfg.0.shar_path={shar / 'train'}", "data.train_ds.num_workers=0",
        f"data.validation_ds.datasets.val_set_0.shar_path={shar / 'val'}",
        f"exp_manager.explicit_log_dir={out}",
    ]
    if speech_decoder:
        overrides += [f"model.speech_decoder.{key}" for key in
                      ("n_layers=1", "d_model=32", "d_ffn=64", "sa_n_heads=2",
                       "max_length_causal_mask=512")]
    return overrides


def write_shar(cuts, path: Path) -> None:
    path.mkdir(parents=True)
    fields = {"recording": "flac", "target_audio": "flac"}
    CutSet.from_cuts(cuts).to_shar(path, fields=fields, shard_size=100)


def test_nemo_example_config_refuses_its_asr_bleu_monitor_at_start_up(conversations, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(ROOT)
    write_shar(conversations[:2], tmp_path / "shar" / "train")
    write_shar(conversations[2:3], tmp_path / "shar" / "val")
    overrides = nemo_overrides(tmp_path / "shar", tmp_path / "run", speech_decoder=False)
    with pytest.raises(ConfigError, match="'val_asr_bleu' is never logged: .*model.scoring_asr"):
        train.main([str(NEMO_FIXTURES / "s2s_duplex.yaml"), *overrides])
    assert not (tmp_path / "run" / "checkpoints").exists()  # before the first step


@pytest.fixture(scope="module")
def demo_shar(tmp_path_factory):
    """The demo conversations as NeMo's duplex data (lhotse Shar, user audio + target_audio)."""
    path = tmp_path_factory.mktemp("demo_shar")
    write_shar(list(read_duplex_demo(ROOT / "assets" / "demo" / "qa_train"))[:16], path / "train")
    write_shar(list(read_duplex_demo(ROOT / "assets" / "demo" / "qa_val"))[:4], path / "val")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("config", list(NEMO_CONFIGS))
def test_nemo_example_configs_train_with_path_and_size_overrides(config, demo_shar, tmp_path,
                                                                 monkeypatch, capsys):
    path = NEMO_FIXTURES / config
    text = path.read_text()
    blob = hashlib.sha1(f"blob {len(text.encode())}\0".encode() + text.encode()).hexdigest()
    assert blob == NEMO_CONFIGS[config]  # NeMo's file, verbatim: NeMo's key names
    nemo = yaml.safe_load(text)
    assert nemo["exp_manager"]["checkpoint_callback_params"]["monitor"] == "val_asr_bleu"
    speech_decoder = "speech_decoder" in nemo["model"]
    if speech_decoder:
        assert list(nemo["model"]["speech_decoder"]) == NEMO_DECODER_KEYS
    monkeypatch.chdir(ROOT)
    monitor = ["exp_manager.checkpoint_callback_params.monitor=val_loss",  # no scoring ASR offline
               "exp_manager.checkpoint_callback_params.mode=min"]
    model = train.main([str(path), *nemo_overrides(demo_shar, tmp_path, speech_decoder), *monitor])
    out = capsys.readouterr().out
    assert "stopped at step 2: max_steps" in out and "val_txt_bleu_val_set_0" in out
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"last.ckpt", "step=2.ckpt"}
    if speech_decoder:
        assert isinstance(model.speech_decoder, TransformerARSpeechDecoder)


@pytest.mark.slow
def test_nemo_example_config_monitors_asr_bleu_with_a_salm_as_scoring_asr(demo_shar, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    salm_cfg = load_config("configs/salm.yaml", report=None)
    salm = SALM(salm_cfg["model"])
    (tmp_path / "salm").mkdir()
    torch.save({"model": salm.state_dict(), "config": salm_cfg}, tmp_path / "salm" / "last.ckpt")
    overrides = nemo_overrides(demo_shar, tmp_path / "run", speech_decoder=False)
    overrides[overrides.index("model.scoring_asr=null")] = f"model.scoring_asr={tmp_path / 'salm'}"
    train.main([str(NEMO_FIXTURES / "s2s_duplex.yaml"), *overrides])  # monitors val_asr_bleu, max
    out = capsys.readouterr().out
    assert "val_asr_bleu_val_set_0" in out and "stopped at step 2: max_steps" in out
    state = torch.load(tmp_path / "run" / "checkpoints" / "step=2.ckpt", weights_only=True)
    logged = float(re.search(r"^validation: .*val_asr_bleu ([\d.]+)", out, re.M).group(1))
    assert [step for _, step in state["best"]] == [2]
    assert state["best"][0][0] == pytest.approx(-logged, abs=1e-4)  # mode max: kept negated
