"""Live duplex sessions (streaming.py): equal to offline inference, flat memory, clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import EncodecConfig, EncodecModel

import infer
from duplex_s2s import load_audio_codec
from config import load_config
from data import load_audio
from manifests import read_duplex_demo
from streaming import (MimiDecodeStream, PerceptionStream, WindowDecodeStream, codec_stream,
                       lookahead_frames)
from train import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"duplex": "configs/s2s_duplex.yaml",
           "speech_decoder": "configs/s2s_duplex_speech_decoder.yaml"}


def shipped_model(name: str, seed: int = 0, *overrides: str):
    """The demo config's model, random init, with sharpened output heads and a louder user channel,
    so that its tokens vary with what it hears."""
    cfg = load_config(ROOT / CONFIGS[name], list(overrides), report=None)
    torch.manual_seed(seed)
    model = build_model(cfg["model"]).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.perception.proj.weight.mul_(30)
        head = model.speech_decoder.final_proj if name == "speech_decoder" else model.audio_head
        head.weight.mul_(30)
    return cfg, model


@pytest.fixture(scope="module")
def duplex():
    return shipped_model("duplex", seed=1)[1]


@pytest.fixture(scope="module")
def users() -> torch.Tensor:
    """The user channels of two demo conversations, 4 s each: (2, 64000) at 16 kHz."""
    conversations = read_duplex_demo(ROOT / "assets" / "demo" / "qa_val")
    audios = [load_audio(c, 16000)[:64000] for c in list(conversations)[:2]]
    return torch.from_numpy(np.stack(audios))


def run(session, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream (B, T) audio: text (B, steps), codes (B, steps, K), agent audio (B, samples)."""
    texts, codes, speech = [], [], []
    n = session.chunk_samples
    for k in range(audio.size(1) // n):
        text, agent = session.step(audio[:, k * n : (k + 1) * n])
        texts.append(text)
        codes.append(session.state.codes.clone())
        speech.append(agent)
    return torch.stack(texts, 1), torch.stack(codes, 1), torch.cat(speech, 1)


@pytest.mark.parametrize("name", CONFIGS)
def test_streamed_equals_offline(name, users):
    _, model = shipped_model(name, seed=1)
    offline = model.offline_inference(users, torch.tensor([users.size(1)] * 2))
    session = model.stream(batch_size=2)
    text, codes, speech = run(session, users)
    delay = session.lookahead
    assert delay == 1 and session.latency_ms == 160  # att_context_size [70, 1]: a frame ahead
    assert (text[:, :delay] == model.text_pad_id).all() and (speech[:, : delay * 1920] == 0).all()
    frames = text.size(1) - delay  # 49 of 50 chunks; offline has 51 (the last two read padding)
    assert offline["tokens_text"].size(1) == frames + 2
    text, codes, speech = text[:, delay:], codes[:, delay:], speech[:, delay * 1920 :]
    assert len(offline["tokens_text"][:, :frames].unique()) >= 4  # the tokens vary
    assert torch.equal(text, offline["tokens_text"][:, :frames])
    assert torch.equal(codes, offline["tokens_audio"][:, :frames])
    reference = offline["audio"][:, : frames * 1920]
    assert (speech - reference).abs().max() <= 1e-5 * reference.abs().max()  # float rounding


@pytest.mark.parametrize("encoder, adapter, lookahead, more", [
    ([70, 0], [70, 0], 0, []), ([9, 2], [9, 2], 2, []), ([72, 3], [70, 1], 3, []),
    ([70, 0], [70, 1], 1, []),
    ([16, 0], [16, 0], 0, ["encoder.att_context_style=regular", "encoder.conv_norm_type=batch_norm",
                           "modality_adapter.att_context_style=regular"])])
def test_perception_stream_equals_offline_for_any_chunking(encoder, adapter, lookahead, more,
                                                           users):
    _, model = shipped_model("duplex", 0, f"model.perception.encoder.att_context_size={encoder}",
                             f"model.perception.modality_adapter.att_context_size={adapter}",
                             *(f"model.perception.{key}" for key in more))
    if more:  # BatchNorm statistics other than the initial ones
        with torch.no_grad():
            for layer in model.perception.encoder.layers:
                layer.conv.batch_norm.running_mean.normal_()
                layer.conv.batch_norm.running_var.uniform_(0.5, 2)
    assert lookahead_frames(model.perception) == lookahead
    with torch.no_grad():
        offline, _ = model.perception(users[:, :40000], torch.tensor([40000, 40000]))  # (2, 33, H)
        stream = PerceptionStream(model.perception, 2)
        pieces = [stream.push(users[:, i : i + 1280]) for i in range(0, 40000, 1280)]
        streamed = torch.cat(pieces, 1)
    # 40000 samples: the windows of mel frames 0..248 are complete; frame i reads mel frame 8 i, so
    # frames 0..31 are known, and final in whole chunks (offline's frame 32 reads zero padding)
    chunk = encoder[1] + 1
    assert streamed.size(1) == 32 // chunk * chunk
    assert (streamed - offline[:, : streamed.size(1)]).abs().max() <= 1e-5 * offline.abs().max()


def test_mimi_streaming_decode_is_exact_past_its_sliding_window():
    codec = load_audio_codec(ROOT / "assets" / "tiny-mimi")
    shape, generator = (2, 130, codec.num_codebooks), torch.Generator().manual_seed(0)
    codes = torch.randint(0, codec.codebook_size, shape, generator=generator)
    offline, _ = codec.decode(codes, torch.tensor([130, 130]))  # 260 transformer steps > window 250
    stream = codec_stream(codec, 2)
    assert isinstance(stream, MimiDecodeStream)
    with torch.no_grad():
        streamed = torch.cat([stream.push(codes[:, t]) for t in range(130)], 1)
    assert (streamed - offline).abs().max() <= 1e-5 * offline.abs().max()
    window = WindowDecodeStream(codec, window=8)  # within its window a causal codec is exact
    with torch.no_grad():
        windowed = torch.cat([window.push(codes[:, t]) for t in range(8)], 1)
    assert (windowed - offline[:, : 8 * 1920]).abs().max() <= 1e-5 * offline.abs().max()


def test_encodec_decodes_in_overlapping_windows(tmp_path):
    """Encodec keeps LSTM state, which transformers does not carry across calls: each step decodes
    the last 8 frames. A causal Encodec is exact within the window, close after it."""
    torch.manual_seed(0)
    config = EncodecConfig(sampling_rate=24000, num_filters=4, hidden_size=16, codebook_dim=16,
                           codebook_size=32, upsampling_ratios=[8, 5, 4, 2],
                           target_bandwidths=[1.5])
    EncodecModel(config).save_pretrained(tmp_path)
    codec = load_audio_codec(tmp_path)
    codes = torch.randint(0, 32, (2, 20, codec.num_codebooks), generator=torch.Generator())
    offline, _ = codec.decode(codes, torch.tensor([20, 20]))
    stream = codec_stream(codec, 2)
    assert isinstance(stream, WindowDecodeStream) and stream.window == 8
    with torch.no_grad():
        streamed = torch.cat([stream.push(codes[:, t]) for t in range(20)], 1)
    errors = (streamed - offline).abs().reshape(2, 20, -1).amax((0, 2)) / offline.abs().max()
    assert errors[:8].max() < 1e-5 and errors[8:].max() < 1e-3


def test_session_memory_stays_flat(duplex):
    """Once full (70 frames of attention context, Mimi's window of 250 steps = 125 frames) the
    perception's and codec's state stops growing: a 10-minute session holds what a 10-second one
    does. The LLM's KV cache grows a frame per step, as offline, up to the model's context."""
    session = duplex.stream(batch_size=1)
    noise = 0.1 * torch.randn(1, 1280, generator=torch.Generator().manual_seed(0))
    sizes = {}
    for step in range(1, 201):
        session.step(noise)
        if step in (130, 200):
            sizes[step] = session.cache_bytes()
    assert sizes[130]["perception"] == sizes[200]["perception"] > 0
    assert sizes[130]["codec"] == sizes[200]["codec"] > 0
    assert [tuple(k.shape) for k in session.perception.stages[0].keys] == [(1, 4, 70, 32)] * 2
    per_frame = 4 * 2 * 2 * 32 * 4  # layers x (keys, values) x KV heads x head_dim x float32 bytes
    assert sizes[200]["llm"] - sizes[130]["llm"] == 70 * per_frame


def test_session_stops_at_the_model_context(duplex):
    limit = duplex.llm.config.max_position_embeddings
    try:
        duplex.llm.config.max_position_embeddings = 5
        session = duplex.stream()
        for _ in range(session.lookahead + 5):
            session.step(torch.zeros(1, 1280))
        expected = r"^the session reached the model's context of 5 frames \(0.4 s\)"
        with pytest.raises(ValueError, match=expected):
            session.step(torch.zeros(1, 1280))
    finally:
        duplex.llm.config.max_position_embeddings = limit


def test_wrong_chunk_size_is_a_one_line_error(duplex):
    session = duplex.stream(batch_size=2)
    for chunk in (torch.zeros(2, 1000), torch.zeros(1, 1280), torch.zeros(2560)):
        with pytest.raises(ValueError) as error:
            session.step(chunk)
        message = str(error.value)
        assert message.startswith("session.step takes (2, 1280) samples") and "\n" not in message


def test_session_resets_and_is_reused(duplex, users):
    session = duplex.stream(batch_size=1)
    first = run(session, users[:1, : 20 * 1280])
    run(session, users[1:, : 10 * 1280])
    session.reset()
    again = run(session, users[:1, : 20 * 1280])
    fresh = run(duplex.stream(batch_size=1), users[:1, : 20 * 1280])
    assert len(first[0].unique()) >= 3
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("overrides, message", [
    (["encoder.causal_downsampling=false", "encoder.att_context_style=regular",
      "encoder.att_context_size=[-1,-1]", "encoder.conv_context_size=null"],
     "streaming needs a causal perception; set perception.encoder.causal_downsampling: true, "
     "perception.encoder.att_context_style: chunked_limited with att_context_size [L, R], L and R "
     ">= 0 (now regular [-1, -1]), perception.encoder.conv_context_size: causal"),
    (["preprocessor.normalize=per_feature", "modality_adapter.att_context_size=[4,2]",
      "modality_adapter.att_context_style=regular"],
     "streaming needs a causal perception; set perception.preprocessor.normalize: NA (per_feature "
     "statistics need the whole recording), perception.modality_adapter.att_context_style: "
     "chunked_limited with att_context_size [L, R], L and R >= 0 (now regular [4, 2])"),
])
def test_a_model_that_cannot_stream_is_refused_naming_the_keys(overrides, message):
    _, model = shipped_model("duplex", 0, *(f"model.perception.{key}" for key in overrides))
    with pytest.raises(ValueError) as error:
        model.stream()
    assert str(error.value) == message


def test_stream_command_writes_the_session(duplex, users, tmp_path):
    config = load_config(ROOT / CONFIGS["duplex"], [], report=None)
    torch.save({"model": duplex.state_dict(), "config": config, "step": 0}, tmp_path / "last.ckpt")
    user = users[0, : 30 * 1280 + 500]  # the last chunk is completed with silence
    sf.write(tmp_path / "user.wav", user.numpy(), 16000, subtype="FLOAT")
    summary = infer.main(["stream", "--model", str(tmp_path / "last.ckpt"),
                          "--audio", str(tmp_path / "user.wav"), "--out", str(tmp_path / "out")])
    offline = duplex.offline_inference(user[None], torch.tensor([len(user)]))
    lines = (tmp_path / "out" / "timeline.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == summary["frames"] == 31 and summary["algorithmic_latency_ms"] == 160
    assert [r["text_id"] for r in records[1:]] == offline["tokens_text"][0, :30].tolist()
    assert [r["time"] for r in records[:3]] == [0.08, 0.16, 0.24] and records[0]["token"] == ""
    assert any(r["user_speaking"] for r in records) and not records[0]["user_speaking"]
    agent, rate = sf.read(tmp_path / "out" / "agent.wav", dtype="float32")
    assert rate == 24000 and len(agent) == 32 * 1920  # an output plays as the next chunk is heard
    expected = offline["audio"][0, : 30 * 1920].clamp(-1, 1).numpy()  # 16-bit WAV: clipped, rounded
    assert np.abs(agent[2 * 1920 :] - expected).max() < 1e-4
    svg = (tmp_path / "out" / "timeline.svg").read_text()
    tokens = sum(bool(r["token"].strip()) for r in records)
    assert svg.startswith("<svg") and svg.count("rotate(-90)") == tokens > 0
    assert set(json.loads((tmp_path / "out" / "summary.json").read_text())) >= {
        "compute_ms_median", "compute_ms_p99", "algorithmic_latency_ms", "first_response_ms"}


def test_response_time_counts_from_the_end_of_the_users_speech():
    records = [{"time": 0.08 * (k + 1), "user_speaking": k < 5, "agent_speaking": 8 <= k < 12,
                "compute_ms": 2.0} for k in range(15)]
    # the user stops at 0.4 s (after chunk 4); chunk 8's step starts the agent's turn: 0.72 s + 2 ms
    assert infer.response_times(records, 0.08) == [322.0]
    records[7]["user_speaking"] = True  # the user speaks first: chunk 4 ends no turn, chunk 7 does
    assert infer.response_times(records, 0.08) == [82.0]
