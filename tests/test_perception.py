import json
import math
import os
import tarfile
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from lhotse import CutSet

from checkpoint import nemo_state_from_parakeet
from perception import (
    AudioPerceptionModule,
    ConformerEncoder,
    MelSpectrogram,
    SpectrogramAugmentation,
    load_nemo_checkpoint,
    make_attention_mask,
    mel_filterbank,
    resolve_pretrained_asr,
    setup_perception,
)

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = dict(dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)
# A tiny canary-like FastConformer: dw_striding x8, batch norm, full context.
ENCODER_CFG = dict(
    feat_in=80, n_layers=2, d_model=64, n_heads=4, subsampling="dw_striding", subsampling_factor=8,
    subsampling_conv_channels=32, ff_expansion_factor=4, conv_kernel_size=9, **NO_DROPOUT,
)
# A tiny cache-aware streaming FastConformer (the S2S default's shape).
STREAMING_CFG = dict(
    ENCODER_CFG, causal_downsampling=True, att_context_size=[4, 1],
    att_context_style="chunked_limited", conv_norm_type="layer_norm", conv_context_size="causal",
)
ADAPTER_CFG = dict(
    _target_="nemo.collections.asr.modules.ConformerEncoder", feat_in=64, feat_out=-1, n_layers=1,
    d_model=48, subsampling="dw_striding", subsampling_factor=1, subsampling_conv_channels=32,
    n_heads=4, conv_kernel_size=9, **NO_DROPOUT,
)
STREAMING_ADAPTER_CFG = dict(
    ADAPTER_CFG, causal_downsampling=True, att_context_size=[4, 1],
    att_context_style="chunked_limited", conv_norm_type="layer_norm", conv_context_size="causal",
)
PREPROCESSOR_CFG = dict(
    _target_="nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", sample_rate=16000,
    features=80, n_fft=512, window_size=0.025, window_stride=0.01, window="hann",
    normalize="per_feature", dither=1e-5, pad_to=0, pad_value=0.0, frame_splicing=1, log=True,
)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere, including norm statistics and the (zero-initialised)
    position biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = 0.8 / math.sqrt(fan_in) if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.add_(1.0)
    return module


def padded(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    return batch, lengths


def speech_clips() -> list[np.ndarray]:
    """Real speech at 16 kHz: the first two utterances of the shipped demo data (lhotse Shar)."""
    cuts = list(CutSet.from_shar(in_dir=str(ROOT / "assets" / "demo" / "asr_val")).subset(first=2))
    assert [c.sampling_rate for c in cuts] == [16000, 16000]
    return [c.load_audio()[0][: 16000 * 6] for c in cuts]


def test_one_second_gives_101_stft_frames_and_13_or_14_encoder_frames():
    feats, feat_lens = MelSpectrogram().eval()(torch.randn(1, 16000), torch.tensor([16000]))
    # centred STFT frames; current NeMo counts 16000 // 160 = 100 as valid
    assert feats.shape == (1, 80, 101)
    assert feat_lens.tolist() == [100]
    for cfg, frames in ((ENCODER_CFG, 13), (STREAMING_CFG, 14)):  # NeMo's test shapes
        encoded, lens = ConformerEncoder(**cfg).eval()(feats, feat_lens)
        assert encoded.shape == (1, 64, frames) and lens.tolist() == [frames]
    cfg = {"preprocessor": PREPROCESSOR_CFG, "encoder": ENCODER_CFG,
           "modality_adapter": ADAPTER_CFG}
    perception = AudioPerceptionModule(cfg, output_dim=24).eval()
    embeds, lens = perception(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    assert embeds.shape == (2, 13, 24) and lens.tolist() == [13, 7]
    assert perception.token_equivalent_duration == pytest.approx(0.08)
    assert perception.sample_rate == 16000
    identity = {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                "d_model": 64}
    perception = AudioPerceptionModule(dict(cfg, modality_adapter=identity), output_dim=24).eval()
    assert perception(torch.randn(1, 16000), torch.tensor([16000]))[0].shape == (1, 13, 24)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_matches_transformers_slaney(n_mels):
    from transformers.audio_utils import mel_filter_bank

    reference = mel_filter_bank(
        num_frequency_bins=257, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    ours = mel_filterbank(16000, 512, n_mels, 0.0, 8000.0)
    torch.testing.assert_close(ours, torch.from_numpy(reference.T).float(), atol=1e-8, rtol=1e-6)
    mel = MelSpectrogram(features=n_mels)
    assert set(mel.state_dict()) == {"featurizer.window", "featurizer.fb"}  # NeMo's buffer names
    assert mel.featurizer.fb.shape == (1, n_mels, 257) and mel.featurizer.window.shape == (400,)


def test_features_match_parakeet_feature_extractor_on_speech():
    """transformers' ParakeetFeatureExtractor is an independent implementation of NeMo's frontend.

    Both run the same fp32 torch.stft with filterbanks that agree to the bit (test above), so what
    is left is float32 rounding in the mel product, the log and the mean/std: ~1e-7 relative on
    log-mels of size up to ~17, divided by per-bin stds of order 1. 1e-4 absolute leaves two orders
    of margin for that and still catches any real mismatch: reflect instead of zero STFT padding,
    `len // hop + 1` valid frames instead of `len // hop`, a biased std or a periodic window each
    move features by 1e-2 or more.
    """
    from transformers import ParakeetFeatureExtractor

    clips = speech_clips()
    extractor = ParakeetFeatureExtractor(feature_size=80)
    reference = extractor(clips, sampling_rate=16000, return_tensors="pt")
    audio, lengths = padded([torch.from_numpy(c) for c in clips])
    feats, feat_lens = MelSpectrogram(**PREPROCESSOR_CFG).eval()(audio, lengths)
    assert feat_lens.tolist() == reference["attention_mask"].sum(-1).tolist()
    expected = reference["input_features"].transpose(1, 2)
    assert feats.shape == expected.shape
    assert (feats - expected).abs().max() < 1e-4


def test_stft_in_fp32_under_autocast_and_dither_only_in_training():
    mel = MelSpectrogram().eval()
    audio, lengths = torch.randn(2, 8000), torch.tensor([8000, 5000])
    plain, _ = mel(audio, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = mel(audio, lengths)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    assert torch.equal(mel(audio, lengths)[0], plain)  # eval: deterministic
    assert not torch.equal(mel.train()(audio, lengths)[0], plain)  # training: dithered


def test_encoder_matches_transformers_parakeet_encoder_on_padded_batch():
    """Same weights in ours and in transformers.ParakeetEncoder, same outputs.

    Both mask padding the same way inside (zeroed frames in the subsampling convs and the conv
    module, masked keys in attention); they differ only in what they leave in padded output frames
    (we zero them), so only valid frames are compared.
    """
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    config = ParakeetEncoderConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=32, num_mel_bins=80,
        scale_input=True, dropout=0.0, dropout_positions=0.0, layerdrop=0.0,
        activation_dropout=0.0, attention_dropout=0.0,
    )
    reference = randomize(ParakeetEncoder(config)).eval()
    ours = ConformerEncoder(**ENCODER_CFG).eval()
    ours.load_state_dict(nemo_state_from_parakeet(reference.state_dict()), strict=True)

    lengths = torch.tensor([203, 150, 97])
    feats = torch.randn(3, 80, 203) * (torch.arange(203) < lengths[:, None]).unsqueeze(1)
    with torch.no_grad():
        out = reference(feats.transpose(1, 2), attention_mask=torch.arange(203) < lengths[:, None])
        encoded, encoded_lens = ours(feats, lengths)
    assert encoded_lens.tolist() == out.attention_mask.sum(-1).tolist() == [26, 19, 13]
    expected = out.last_hidden_state.transpose(1, 2)
    for i, n in enumerate(encoded_lens.tolist()):
        assert (encoded[i, :, :n] - expected[i, :, :n]).abs().max() <= 1e-4
    assert expected.abs().mean() > 0.1  # outputs are not degenerate


@pytest.mark.parametrize(
    "encoder_cfg, adapter_cfg",
    [
        (ENCODER_CFG, ADAPTER_CFG),
        (STREAMING_CFG, STREAMING_ADAPTER_CFG),
        (STREAMING_CFG, dict(ADAPTER_CFG, self_attention_model="abs_pos")),
    ],
    ids=["offline", "streaming", "abs_pos_adapter"],
)
def test_each_clip_of_a_padded_batch_equals_the_clip_alone(encoder_cfg, adapter_cfg):
    cfg = {"preprocessor": PREPROCESSOR_CFG, "encoder": encoder_cfg,
           "modality_adapter": adapter_cfg}
    # BatchNorm uses running stats
    perception = randomize(AudioPerceptionModule(cfg, output_dim=24)).eval()
    torch.manual_seed(0)
    clips = [torch.randn(n) * 0.1 for n in (16000, 11111, 5003)]
    with torch.no_grad():
        batch_embeds, batch_lens = perception(*padded(clips))
        for i, clip in enumerate(clips):
            alone, alone_lens = perception(clip[None], torch.tensor([len(clip)]))
            assert batch_lens[i] == alone_lens[0] == alone.size(1)
            assert (batch_embeds[i, : alone.size(1)] - alone[0]).abs().max() < 1e-5


def test_attention_masks_match_hand_computed_cases():
    def mask(lengths, T, context, style):
        return make_attention_mask(torch.tensor(lengths), T, context, style).int().tolist()

    # regular [1, 0]: one frame of left context, none to the right; the second clip has 3 valid
    # frames, and its padded query sees every valid key (a row that sees nothing gives NaN gradients
    # in cuDNN attention)
    assert mask([4, 3], 4, [1, 0], "regular") == [
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]],
    ]
    assert mask([5], 5, [2, 1], "regular") == [
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    ]
    assert mask([3], 4, [-1, -1], "regular") == [[[1, 1, 1, 0]] * 4]
    # chunked_limited [2, 1]: chunks of 2 frames, each sees itself and 2 // 2 = 1 chunk to the left
    assert mask([6], 6, [2, 1], "chunked_limited") == [[
        [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1],
    ]]
    # unlimited left context, 5 valid frames of 6
    assert mask([5], 6, [-1, 1], "chunked_limited") == [[
        [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0],
    ]]
    # [4, 0]: chunks of one frame, i.e. the last 4 frames and itself
    assert mask([6], 6, [4, 0], "chunked_limited")[0][5] == [0, 1, 1, 1, 1, 1]


def changed_frames(encoder: ConformerEncoder, feat_in: int, num_frames: int,
                   first_changed: int) -> list[bool]:
    """Which output frames move when the input frames from `first_changed` on are replaced."""
    torch.manual_seed(1)
    feats, lengths = torch.randn(1, feat_in, num_frames), torch.tensor([num_frames])
    altered = feats.clone()
    altered[..., first_changed:] = torch.randn(1, feat_in, num_frames - first_changed)
    with torch.no_grad():
        before, _ = encoder(feats, lengths)
        after, _ = encoder(altered, lengths)
    return ((before - after).abs().amax(dim=1)[0] > 1e-6).tolist()


def test_causal_subsampling_and_causal_conv_do_not_look_ahead():
    # Causal x8 subsampling: output frame j reads mel frames <= 8j, so mel frames >= 97 reach
    # frames >= 13.
    causal = randomize(ConformerEncoder(**dict(ENCODER_CFG, causal_downsampling=True,
                                               conv_context_size="causal",
                                               att_context_size=[-1, 0]))).eval()
    changed = changed_frames(causal, 80, 200, first_changed=97)
    assert not any(changed[:13]) and all(changed[13:])
    offline = randomize(ConformerEncoder(**ENCODER_CFG)).eval()
    # the check does catch look-ahead
    assert any(changed_frames(offline, 80, 200, first_changed=97)[:13])

    # Adapter (no subsampling), chunks of 2 frames: frames 10, 11 are the first changed chunk.
    small = dict(STREAMING_ADAPTER_CFG, feat_in=16, d_model=16, n_layers=2)
    streaming = randomize(ConformerEncoder(**small)).eval()
    changed = changed_frames(streaming, 16, 30, first_changed=10)
    assert not any(changed[:10]) and all(changed[10:])
    symmetric_conv = randomize(ConformerEncoder(**dict(small, conv_context_size=None))).eval()
    assert any(changed_frames(symmetric_conv, 16, 30, first_changed=10)[:10])


def write_nemo(path: Path, config: dict, state_dict: dict, mode: str) -> None:
    """A .nemo as NeMo writes it: a tar of ./model_config.yaml and ./model_weights.ckpt (a plain
    state dict)."""
    staging = path.parent / (path.name + ".files")
    staging.mkdir()
    (staging / "model_config.yaml").write_text(yaml.safe_dump(config))
    torch.save(state_dict, staging / "model_weights.ckpt")
    with tarfile.open(path, mode) as tar:
        for name in ("model_config.yaml", "model_weights.ckpt"):
            tar.add(staging / name, arcname=f"./{name}")


def fake_asr_model(path: Path, mode: str = "w") -> nn.Module:
    """Writes a small FastConformer 'ASR model' with a decoder to `path`; returns its
    preprocessor + encoder."""
    asr = nn.Module()
    asr.preprocessor = MelSpectrogram(**PREPROCESSOR_CFG)
    asr.encoder = randomize(ConformerEncoder(**dict(ENCODER_CFG, dropout=0.1)))
    # so the test can tell loaded buffers from recomputed ones
    asr.preprocessor.featurizer.fb.mul_(1.5)
    state = {**asr.state_dict(), "decoder.weight": torch.randn(10, 64),
             "joint.bias": torch.randn(10)}
    config = {
        "sample_rate": 16000,
        "preprocessor": PREPROCESSOR_CFG,
        "encoder": dict(ENCODER_CFG, _target_="nemo.collections.asr.modules.ConformerEncoder",
                        dropout=0.1, pos_emb_max_len=5000, stochastic_depth_drop_prob=0.0,
                        subsampling_conv_chunking_factor=1),
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "num_classes": 10},
    }
    write_nemo(path, config, state, mode)
    return asr.eval()


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_nemo_file_loads_with_overrides_and_rebuilds_offline(tmp_path, capsys, mode):
    path = tmp_path / "asr.nemo"
    asr = fake_asr_model(path, mode)
    config, state = load_nemo_checkpoint(str(path))
    assert config["encoder"]["n_layers"] == 2 and "decoder.weight" in state

    model_cfg = {
        "pretrained_asr": str(path),
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "preprocessor": {"normalize": "NA"},
            "encoder": {"dropout": 0.0},
            "modality_adapter": ADAPTER_CFG,
        },
    }
    perception, written = setup_perception(model_cfg, output_dim=24)
    perception.eval()
    printed = capsys.readouterr().out
    assert str(path) in printed and "missing keys: none" in printed
    assert "unexpected keys: none" in printed

    # written: the checkpoint's config, with the user's keys on top; the caller's dict is left as
    # it was
    assert "preprocessor" not in model_cfg["perception"] or model_cfg["perception"] != written
    assert written["preprocessor"]["normalize"] == "NA"
    assert written["preprocessor"]["features"] == 80
    assert written["encoder"]["dropout"] == 0.0 and written["encoder"]["n_layers"] == 2
    assert perception.preprocessor.normalize == "NA"
    assert torch.equal(perception.preprocessor.featurizer.fb, asr.preprocessor.featurizer.fb)

    audio, lengths = padded([torch.randn(12000) * 0.1, torch.randn(9000) * 0.1])
    feats, feat_lens = perception.preprocessor(audio, lengths)
    with torch.no_grad():
        reference = MelSpectrogram(**dict(PREPROCESSOR_CFG, normalize="NA")).eval()
        reference.featurizer.fb.mul_(1.5)
        assert torch.equal(feats, reference(audio, lengths)[0])
        assert torch.equal(perception.encoder(feats, feat_lens)[0],
                           asr.encoder(feats, feat_lens)[0])
        embeds, _ = perception(audio, lengths)

        rebuilt_cfg = dict(model_cfg, perception=written, pretrained_weights=False)
        rebuilt = setup_perception(rebuilt_cfg, 24)[0].eval()
        rebuilt.load_state_dict(perception.state_dict(), strict=True)
        assert torch.equal(rebuilt(audio, lengths)[0], embeds)


def test_model_name_resolves_from_offline_hf_cache_and_unknown_names_fail_clearly(tmp_path,
                                                                                   monkeypatch):
    hf_home = tmp_path / "hf_home"
    repo = hf_home / "hub" / "models--nvidia--stt_en_tiny_test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    fake_asr_model(repo / "snapshots" / commit / "stt_en_tiny_test.nemo")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables when it is first imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    expected = os.path.realpath(repo / "snapshots" / commit / "stt_en_tiny_test.nemo")
    assert os.path.realpath(resolve_pretrained_asr("stt_en_tiny_test")) == expected
    assert os.path.realpath(resolve_pretrained_asr("nvidia/stt_en_tiny_test")) == expected
    perception = {"modality_adapter": ADAPTER_CFG}
    model_cfg = {"pretrained_asr": "stt_en_tiny_test", "perception": perception}
    assert setup_perception(model_cfg, output_dim=24)[0].encoder.subsampling_factor == 8

    with pytest.raises(FileNotFoundError) as error:
        setup_perception({"pretrained_asr": "stt_no_such_model", "perception": perception}, 24)
    message = str(error.value)
    assert "nvidia/stt_no_such_model" in message and "stt_no_such_model.nemo" in message
    assert "local .nemo path" in message and "pretrained_weights: false" in message
    with pytest.raises(FileNotFoundError, match="no such .nemo file"):
        resolve_pretrained_asr(str(tmp_path / "missing.nemo"))


def test_config_keys_are_checked():
    ConformerEncoder(**ENCODER_CFG, _target_="x", pos_emb_max_len=5000,
                     stochastic_depth_drop_prob=0.0, reduction=None)
    MelSpectrogram(_target_="x", exact_pad=False, use_grads=False)
    with pytest.raises(ValueError, match="stochastic_depth_drop_prob=0.1"):
        ConformerEncoder(**ENCODER_CFG, stochastic_depth_drop_prob=0.1)
    with pytest.raises(ValueError, match="unknown key 'n_layer'"):
        ConformerEncoder(**ENCODER_CFG, n_layer=3)
    with pytest.raises(ValueError, match="normalize='all_features'"):
        MelSpectrogram(normalize="all_features")
    with pytest.raises(ValueError, match="exact_pad"):
        MelSpectrogram(exact_pad=True)
    with pytest.raises(ValueError, match="conv_context_size"):
        ConformerEncoder(**dict(ENCODER_CFG, conv_context_size=[3, 3]))
    no_encoder = {"pretrained_weights": False,
                  "perception": {"preprocessor": {}, "modality_adapter": ADAPTER_CFG}}
    with pytest.raises(ValueError, match="perception.encoder is missing"):
        setup_perception(no_encoder, 8)
    wrong_adapter = {"preprocessor": {}, "encoder": ENCODER_CFG,
                     "modality_adapter": dict(ADAPTER_CFG, feat_in=32)}
    with pytest.raises(ValueError, match="set feat_in to 64"):
        AudioPerceptionModule(wrong_adapter, 8)
    multi = ConformerEncoder(**dict(STREAMING_CFG, att_context_size=[[4, 1], [4, 0]],
                                    att_context_probs=[0.5, 0.5]))
    # eval uses the first, training draws one per step
    assert multi.att_context_sizes == [[4, 1], [4, 0]]
    tied = ConformerEncoder(**ENCODER_CFG, untie_biases=False)
    assert tied.layers[0].self_attn.pos_bias_u is tied.layers[1].self_attn.pos_bias_u
    # NeMo lists the shared bias under every layer
    assert "layers.1.self_attn.pos_bias_u" in tied.state_dict()


class _Payload:
    """Pickles as a call to os.system: what a malicious .nemo file would carry."""

    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_a_pickled_payload_in_a_nemo_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_nemo(tmp_path / "evil.nemo", {"preprocessor": PREPROCESSOR_CFG},
               {"w": torch.ones(1), "x": _Payload()}, "w")
    with pytest.raises(ValueError, match="pickled objects are refused"):
        load_nemo_checkpoint(str(tmp_path / "evil.nemo"))
    assert not (tmp_path / "pwned.txt").exists()


# NeMo 3.0's constructor arguments with their defaults (inspect.signature of ConformerEncoder and
# AudioToMelSpectrogramPreprocessor), as a NeMo 3.0 model_config.yaml spells them out
NEMO3_ENCODER_DEFAULTS = dict(
    feat_out=-1, causal_downsampling=False, subsampling="striding", subsampling_factor=4,
    subsampling_conv_chunking_factor=1, subsampling_conv_channels=-1, reduction=None,
    reduction_position=None, reduction_factor=1, ff_expansion_factor=4,
    self_attention_model="rel_pos", n_heads=4, att_context_size=None, att_context_probs=None,
    att_chunk_context_size=None, att_context_style="regular", xscaling=True, untie_biases=True,
    pos_emb_max_len=5000, conv_kernel_size=31, conv_norm_type="batch_norm", conv_context_size=None,
    conv_context_style="regular", use_bias=True, dropout=0.1, dropout_pre_encoder=0.1,
    dropout_emb=0.1, dropout_att=0.0, stochastic_depth_drop_prob=0.0,
    stochastic_depth_mode="linear", stochastic_depth_start_layer=1, global_tokens=0,
    global_tokens_spacing=1, global_attn_separate=False, use_pytorch_sdpa=False,
    use_pytorch_sdpa_backends=None, sync_max_audio_length=True,
)
NEMO3_PREPROCESSOR_DEFAULTS = dict(
    sample_rate=16000, window_size=0.02, window_stride=0.01, n_window_size=None,
    n_window_stride=None, window="hann", normalize="per_feature", n_fft=None, preemph=0.97,
    features=64, lowfreq=0, highfreq=None, log=True, log_zero_guard_type="add",
    log_zero_guard_value=2**-24, dither=1e-5, pad_to=16, frame_splicing=1, exact_pad=False,
    pad_value=0, mag_power=2.0, rng=None, nb_augmentation_prob=0.0, nb_max_freq=4000,
    mel_norm="slaney", use_torchaudio=False, stft_exact_pad=False, stft_conv=False,
)


def test_nemo3_encoder_and_preprocessor_configs_load():
    mel = MelSpectrogram(**NEMO3_PREPROCESSOR_DEFAULTS).eval()
    encoder = ConformerEncoder(feat_in=64, n_layers=1, d_model=32, **NEMO3_ENCODER_DEFAULTS).eval()
    features, lengths = mel(0.1 * torch.randn(1, 16000), torch.tensor([16000]))
    encoded, encoded_lens = encoder(features, lengths)
    assert features.shape == (1, 64, 112)  # pad_to 16: 101 frames -> 112
    assert encoded.shape == (1, 32, 28) and encoded_lens.tolist() == [25]
    refused = {"att_chunk_context_size": [[70], [1, 2], [0, 1]], "conv_context_style": "dcc"}
    for key, value in refused.items():
        with pytest.raises(ValueError, match=f"encoder.{key}=.* is not supported; set it to"):
            ConformerEncoder(feat_in=64, n_layers=1, d_model=32,
                             **dict(NEMO3_ENCODER_DEFAULTS, **{key: value}))
# ------------------------------------------------------------------------------------------------
# SpecAugment


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) of each run of True in a 1-D bool tensor."""
    padded_row = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()
    edges = torch.diff(padded_row).nonzero().flatten()
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def test_spec_augment_masks_what_nemo_masks_for_the_same_seed():
    """tests/fixtures/nemo/spec_augment.safetensors: where NeMo's SpectrogramAugmentation masked.
    Ours masks the same frames and bins of every clip and leaves the padding alone."""
    path = ROOT / "tests" / "fixtures" / "nemo" / "spec_augment.safetensors"
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        cases = json.loads(f.metadata()["cases"])
    arrays = load_file(str(path))
    lengths = torch.from_numpy(arrays["lengths"])
    features = torch.randn(len(lengths), 80, 200)
    valid = (torch.arange(200) < lengths[:, None]).unsqueeze(1).expand_as(features)
    for name, case in cases.items():
        nemo = torch.from_numpy(np.unpackbits(arrays[name], axis=-1, count=200).astype(bool))
        torch.manual_seed(case["seed"])
        out = SpectrogramAugmentation(**case["keys"])(features, lengths)
        masked = out != features
        assert torch.equal(masked[valid], nemo[valid]), name
        assert not masked[~valid].any(), name
        assert (out[masked] == case["keys"].get("mask_value", 0.0)).all()
        assert 0.05 < masked[valid].float().mean() < 0.95, name  # the case masks something


def test_spec_augment_mask_counts_widths_and_limits():
    torch.manual_seed(0)
    lengths = torch.randint(30, 101, (3000,))
    valid = torch.arange(100) < lengths[:, None]  # (B, T)
    ones = torch.ones(3000, 80, 100)

    time = SpectrogramAugmentation(time_masks=1, time_width=10)(ones, lengths)[:, 0] == 0  # (B, T)
    widths = time.sum(1)
    assert set(widths.tolist()) == set(range(10))  # int time_width W: widths 0 .. W-1
    assert not (time & ~valid).any()
    assert not time[torch.arange(3000), lengths - 1].any()  # as NeMo: never the last frame

    fraction = SpectrogramAugmentation(time_masks=1, time_width=0.2)(ones, lengths)[:, 0] == 0
    limit = torch.ceil(0.2 * lengths)  # float time_width: below that fraction of each clip's length
    assert (fraction.sum(1) < limit).all() and (fraction.sum(1) == limit - 1).any()

    freq = SpectrogramAugmentation(freq_masks=1, freq_width=27)(ones, lengths)  # (B, F, T)
    bins = freq[:, :, 0] == 0
    assert set(bins.sum(1).tolist()) == set(range(27))
    assert torch.equal(freq == 0, bins.unsqueeze(-1) & valid.unsqueeze(1))  # whole clip, no padding

    masks = dict(time_masks=3, time_width=4, freq_masks=2, freq_width=5)
    three = SpectrogramAugmentation(**masks)(ones, lengths)
    time_runs = [runs(row) for row in (three == 0).all(1)]
    freq_runs = [runs(row[:n]) for row, n in zip((three == 0).transpose(1, 2).all(1), lengths)]
    assert max(map(len, time_runs)) == 3 and max(map(len, freq_runs)) == 2  # at most n bands each
    assert max(w for r in time_runs for _, w in r) <= 3 * 3  # overlapping bands merge
    assert max(w for r in freq_runs for _, w in r) <= 2 * 4

    cutout = SpectrogramAugmentation(rect_masks=1, rect_freq=20, rect_time=5, mask_value=7.0)
    rect = cutout(ones, lengths)
    assert set(rect.unique().tolist()) == {0.0, 1.0}  # as NeMo: rectangles are 0.0, not mask_value
    for row, n in zip(rect[:300] == 0, lengths):
        rows, cols = row.any(1).nonzero().flatten(), row.any(0).nonzero().flatten()
        if len(rows):  # one rectangle of at most 20 bins x 5 frames inside the clip
            assert torch.equal(row, row.any(1)[:, None] & row.any(0)[None])
            assert rows[-1] - rows[0] < 20 and cols[-1] - cols[0] < 5 and cols[-1] < n


def test_spec_augment_in_training_only_and_off_without_the_section():
    no_dither = dict(PREPROCESSOR_CFG, dither=0.0)
    cfg = {"preprocessor": no_dither, "encoder": ENCODER_CFG, "modality_adapter": ADAPTER_CFG}
    plain = randomize(AudioPerceptionModule(cfg, output_dim=24))
    augment = {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation", "freq_masks": 2,
               "time_masks": 10, "freq_width": 27, "time_width": 0.05}
    augmented = AudioPerceptionModule({**cfg, "spec_augment": augment}, output_dim=24)
    augmented.load_state_dict(plain.state_dict())
    assert AudioPerceptionModule({**cfg, "spec_augment": None}, 24).spec_augmentation is None
    assert plain.spec_augmentation is None
    audio, lengths = padded([torch.randn(n) * 0.1 for n in (16000, 9000)])
    with torch.no_grad():
        for mode in ("eval", "train"):  # BatchNorm: eval uses running stats, train batch statistics
            expected = getattr(plain, mode)()(audio, lengths)[0]
            state = torch.get_rng_state()
            out = getattr(augmented, mode)()(audio, lengths)[0]
            assert torch.equal(out, expected) == (mode == "eval"), mode
            assert torch.equal(torch.get_rng_state(), state) == (mode == "eval")  # the run's RNG


def test_spec_augment_keys_are_checked():
    SpectrogramAugmentation(_target_="x", rng=None, use_vectorized_spec_augment=True, time_width=1.)
    for keys, message in [({"time_width": 1.5}, "in \\[0, 1\\]"),
                          ({"freq_width": 0.1}, "must be an int"),
                          ({"use_numba_spec_augment": True}, "set it to False"),
                          ({"use_vectorized_spec_augment": False}, "set it to True"),
                          ({"freq_mask": 2}, "unknown key 'freq_mask'")]:
        with pytest.raises(ValueError, match=message):
            SpectrogramAugmentation(**keys)
