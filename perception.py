"""Audio perception: NeMo's mel frontend -> FastConformer encoder -> Conformer adapter -> Linear.

Users bring NVIDIA's FastConformer ASR checkpoints (`.nemo` files), so the modules here keep NeMo's
parameter names and math: a `.nemo` file's `preprocessor.*` and `encoder.*` weights load as is.
One deliberate difference: every stage masks the frames past each clip's length (NeMo's subsampling
convolutions do not), so a clip gives the same output alone and inside a padded batch.
"""
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import load_nemo_checkpoint, resolve_pretrained_asr
from config import check_choice, check_nemo_keys, model_defaults

NEMO_MASK_VALUE = -10000.0  # NeMo's attention score for masked positions
NORMALIZE_EPS = 1e-5  # added to the per-feature std, as in NeMo
WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window,
           "blackman": torch.blackman_window, "bartlett": torch.bartlett_window}


def setup_perception(model_cfg: dict, output_dim: int) -> tuple["AudioPerceptionModule", dict]:
    """Build `model_cfg["perception"]`, starting from the pretrained ASR encoder named by
    `pretrained_asr`; returns the module and its resolved config.

    As NeMo does, the checkpoint's preprocessor/encoder config (with the user's keys on top) becomes
    part of the resolved config, so a saved model rebuilds offline with `pretrained_weights: false`.
    """
    model_cfg = model_defaults(model_cfg)
    perception_cfg = model_cfg["perception"]
    if not perception_cfg:
        raise ValueError("the model config has no 'perception' section")
    perception_cfg["output_dim"] = output_dim
    pretrained_asr = model_cfg.get("pretrained_asr")
    if not (pretrained_asr and model_cfg["pretrained_weights"]):
        return AudioPerceptionModule(perception_cfg, output_dim), perception_cfg

    path = resolve_pretrained_asr(pretrained_asr)
    asr_cfg, asr_weights = load_nemo_checkpoint(path)
    for section in ("preprocessor", "encoder"):
        if section not in asr_cfg:
            raise ValueError(f"{path}: model_config.yaml has no '{section}' section; "
                             "is it an ASR model?")
        perception_cfg[section] = {**asr_cfg[section], **(perception_cfg.get(section) or {})}
    perception = AudioPerceptionModule(perception_cfg, output_dim)
    weights = {k: v for k, v in asr_weights.items() if k.startswith(("preprocessor.", "encoder."))}
    try:
        result = perception.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the encoder built from its config and "
                         f"overrides: {error}") from None
    missing = [k for k in result.missing_keys if k.startswith(("preprocessor.", "encoder."))]
    unexpected = result.unexpected_keys
    print(f"perception: loaded {len(weights) - len(unexpected)} tensors from {path}")
    print(f"perception: missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}")
    return perception, perception_cfg


class AudioPerceptionModule(nn.Module):
    """Audio (B, T_samples) -> LLM-space embeddings (B, T_enc, output_dim), with their lengths."""

    def __init__(self, cfg: dict, output_dim: int):
        super().__init__()
        for section in ("preprocessor", "encoder", "modality_adapter"):
            if cfg.get(section) is None:
                raise ValueError(f"perception.{section} is missing: without pretrained ASR weights "
                                 "the architecture comes from the config (set pretrained_asr, or "
                                 "copy the section from the ASR model's model_config.yaml)")
        augment = cfg.get("spec_augment")  # as NeMo: none when the section is absent or null
        self.spec_augmentation = None if augment is None else SpectrogramAugmentation(**augment)
        self.preprocessor = MelSpectrogram(**cfg["preprocessor"])
        self.encoder = ConformerEncoder(**cfg["encoder"])
        adapter_cfg = cfg["modality_adapter"]
        if str(adapter_cfg.get("_target_", "")).endswith("IdentityConnector"):
            self.modality_adapter = IdentityConnector()
            adapter_dim = self.encoder.output_dim
        else:
            feat_in, dim = adapter_cfg.get("feat_in"), self.encoder.output_dim
            if feat_in != dim:
                raise ValueError(f"perception.modality_adapter.feat_in={feat_in} but the encoder "
                                 f"outputs {dim} features; set feat_in to {dim}")
            self.modality_adapter = ConformerEncoder(**adapter_cfg)
            adapter_dim = self.modality_adapter.output_dim
        self.proj = nn.Linear(adapter_dim, output_dim)

    @property
    def sample_rate(self) -> int:
        return self.preprocessor.sample_rate

    @property
    def token_equivalent_duration(self) -> float:
        """Seconds of audio per output frame: 0.08 for a 10 ms hop and x8 subsampling."""
        factor = self.encoder.subsampling_factor * self.modality_adapter.subsampling_factor
        return self.preprocessor.hop_length / self.sample_rate * factor

    def output_lengths(self, lengths):
        """The frames `forward` returns for clips of `lengths` samples (ints or a tensor): its
        arithmetic alone, so that the data loader can lay out a batch on the host."""
        lengths = lengths // self.preprocessor.hop_length
        for encoder in (self.encoder, self.modality_adapter):
            for _ in range(round(math.log2(encoder.subsampling_factor))):
                lengths = encoder.pre_encode.output_length(lengths)
        return lengths

    def forward(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        features, feature_lens = self.preprocessor(audio, audio_lens)  # (B, n_mels, T_mel), fp32
        if self.spec_augmentation is not None and self.training:  # as NeMo: after normalisation
            features = self.spec_augmentation(features, feature_lens)
        features = features.to(self.proj.weight.dtype)
        encoded, encoded_lens = self.encoder(features, feature_lens)  # (B, d_enc, T_enc)
        encoded, encoded_lens = self.modality_adapter(encoded, encoded_lens)  # (B, d_adapt, T_enc)
        return self.proj(encoded.transpose(1, 2)), encoded_lens  # (B, T_enc, output_dim)


class IdentityConnector(nn.Module):
    """Stands in for the modality adapter when encoder output goes straight to the projection."""

    subsampling_factor = 1

    def forward(self, audio_signal: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        return audio_signal, length


class MelSpectrogram(nn.Module):
    """NeMo's AudioToMelSpectrogramPreprocessor: audio (B, T_samples) -> log-mel (B, n_mels, T_mel).

    Follows current NeMo: zero-padded centred STFT, pre-emphasis masked past each length, and
    `len // hop` valid frames (the STFT gives one frame more, which is set to `pad_value`).
    The window and filterbank sit under `.featurizer` as in NeMo, so a `.nemo` file's
    `preprocessor.featurizer.window` and `preprocessor.featurizer.fb` load into them.
    """

    keep_fp32 = True  # train.py keeps this module (window, filterbank) in fp32 under bf16-true

    def __init__(self, sample_rate=16000, window_size=0.025, window_stride=0.01, n_window_size=None,
                 n_window_stride=None, n_fft=512, features=80, window="hann",
                 normalize="per_feature", dither=1e-5, pad_to=0, pad_value=0.0, preemph=0.97,
                 log=True, frame_splicing=1, mag_power=2.0, lowfreq=0, highfreq=None,
                 log_zero_guard_type="add", log_zero_guard_value=2**-24, mel_norm="slaney",
                 **nemo_keys):
        super().__init__()
        check_nemo_keys("preprocessor", nemo_keys)
        check_choice("preprocessor.window", window, *WINDOWS)
        check_choice("preprocessor.normalize", normalize, "per_feature", "NA", None, False)
        check_choice("preprocessor.frame_splicing", frame_splicing, 1)
        check_choice("preprocessor.log_zero_guard_type", log_zero_guard_type, "add", "clamp")
        check_choice("preprocessor.mel_norm", mel_norm, "slaney", None)
        if not isinstance(pad_to, int) or pad_to < 0:
            raise ValueError(f"preprocessor.pad_to={pad_to!r} is not supported; "
                             "use 0 or a positive multiple")
        self.sample_rate = sample_rate
        self.win_length = n_window_size or int(window_size * sample_rate)
        self.hop_length = n_window_stride or int(window_stride * sample_rate)
        self.n_fft = n_fft or 2 ** math.ceil(math.log2(self.win_length))
        self.normalize, self.dither, self.preemph, self.log = normalize, dither, preemph, log
        self.pad_to, self.pad_value, self.mag_power = pad_to, pad_value, mag_power
        self.log_zero_guard_type = log_zero_guard_type
        self.log_zero_guard_value = log_zero_guard_value
        fb = mel_filterbank(sample_rate, self.n_fft, features, lowfreq, highfreq or sample_rate / 2,
                            mel_norm)
        self.featurizer = nn.Module()
        self.featurizer.register_buffer("window", WINDOWS[window](self.win_length, periodic=False))
        self.featurizer.register_buffer("fb", fb.unsqueeze(0))  # (1, n_mels, n_fft // 2 + 1)

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        feature_lengths = torch.div(lengths, self.hop_length, rounding_mode="floor").long()
        with torch.autocast(audio.device.type, enabled=False):  # the STFT needs fp32's range
            x = audio.float()
            if self.training and self.dither > 0:
                x = x + self.dither * torch.randn_like(x)
            if self.preemph:
                x = torch.cat([x[:, :1], x[:, 1:] - self.preemph * x[:, :-1]], dim=1)
            x = x.masked_fill(_padding_mask(lengths, x.size(1)), 0.0)
            spec = torch.stft(x, self.n_fft, self.hop_length, self.win_length,
                              window=self.featurizer.window.float(), center=True,
                              pad_mode="constant", return_complex=True)
            power = spec.real.square() + spec.imag.square()  # |X|^2, (B, n_fft // 2 + 1, T_mel)
            spec = power if self.mag_power == 2.0 else power.pow(self.mag_power / 2)  # |X|^power
            x = torch.matmul(self.featurizer.fb.float(), spec)  # (B, n_mels, T_mel)
            if self.log:
                eps = self._log_guard(x.dtype)
                x = torch.log(x + eps if self.log_zero_guard_type == "add" else x.clamp(min=eps))
            if self.normalize == "per_feature":
                x = _normalize_per_feature(x, feature_lengths)
            x = x.masked_fill(_padding_mask(feature_lengths, x.size(-1))[:, None], self.pad_value)
            if self.pad_to and x.size(-1) % self.pad_to:
                x = F.pad(x, (0, self.pad_to - x.size(-1) % self.pad_to), value=self.pad_value)
        return x, feature_lengths

    def _log_guard(self, dtype: torch.dtype) -> float:
        if self.log_zero_guard_value in ("tiny", "eps"):
            return getattr(torch.finfo(dtype), self.log_zero_guard_value)
        return self.log_zero_guard_value


class SpectrogramAugmentation(nn.Module):
    """NeMo's SpectrogramAugmentation on log-mel features (B, F, T): `rect_masks` rectangles set
    to 0.0 (SpecCutout), then `time_masks` and `freq_masks` bands set to `mask_value` (SpecAugment).

    Each mask's width is drawn below its maximum (`time_width`: frames, or a float fraction of each
    clip), per clip, from the global torch RNG in the order of NeMo's vectorised code: a seed gives
    NeMo's masks, and a resumed run (its RNG state restored) masks as the uninterrupted one would.
    Unlike NeMo, nothing past a clip's length is touched, and rectangles are placed within the clip
    with torch's RNG (NeMo: within the padded batch, with Python's RNG).
    """

    def __init__(self, freq_masks=0, time_masks=0, freq_width=10, time_width=10, rect_masks=0,
                 rect_time=5, rect_freq=20, mask_value=0.0, **nemo_keys):
        super().__init__()
        check_nemo_keys("spec_augment", nemo_keys)
        if isinstance(time_width, float) and not 0.0 <= time_width <= 1.0:
            raise ValueError(f"spec_augment.time_width={time_width}: a float must be in [0, 1]")
        if not isinstance(freq_width, int):
            raise ValueError(f"spec_augment.freq_width={freq_width!r} must be an int (mel bins)")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width, self.mask_value = time_masks, time_width, mask_value
        self.rect_masks, self.rect_time, self.rect_freq = rect_masks, rect_time, rect_freq

    @torch.no_grad()
    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        batch, n_freq, n_time = features.shape
        valid = ~_padding_mask(lengths, n_time).unsqueeze(1)  # (B, 1, T)
        if self.rect_masks:
            def upto(high):  # NeMo's randint(0, high), both ends included
                draws = torch.rand(batch, self.rect_masks, device=features.device)
                return (draws * (high + 1)).long()
            freq = _spans(upto(max(n_freq - self.rect_freq, 0)), upto(self.rect_freq), n_freq)
            last_start = (lengths.unsqueeze(1) - self.rect_time).clamp(min=0)
            time = _spans(upto(last_start), upto(self.rect_time), n_time)  # (B, n, T)
            rect = (freq.unsqueeze(-1) & time.unsqueeze(-2)).any(1)  # (B, F, T)
            features = features.masked_fill(rect & valid, 0.0)
        if self.freq_masks + self.time_masks:
            width = self.time_width
            if isinstance(width, float):
                width = torch.clamp(width * lengths, max=n_time).unsqueeze(1)  # (B, 1)
            time = _random_bands(batch, self.time_masks, width, lengths.unsqueeze(1), n_time)
            freq = _random_bands(batch, self.freq_masks, self.freq_width, n_freq, n_freq)
            bands = time.unsqueeze(1) | freq.unsqueeze(2)  # (B, F, T)
            features = features.masked_fill(bands & valid, self.mask_value)
        return features


class ConformerEncoder(nn.Module):
    """NeMo's ConformerEncoder (FastConformer), with NeMo's constructor keys and parameter names.

    (B, feat_in, T) features -> (B, output_dim, T') and lengths, T' = T / subsampling_factor. With
    subsampling_factor 1, `pre_encode` is a plain Linear: that is the modality adapter.
    """

    def __init__(self, feat_in, n_layers, d_model, feat_out=-1, subsampling="dw_striding",
                 subsampling_factor=4, subsampling_conv_channels=-1, causal_downsampling=False,
                 ff_expansion_factor=4, self_attention_model="rel_pos", n_heads=4,
                 att_context_size=None, att_context_probs=None, att_context_style="regular",
                 xscaling=True, untie_biases=True, conv_kernel_size=31, conv_norm_type="batch_norm",
                 conv_context_size=None, use_bias=True, dropout=0.1, dropout_pre_encoder=0.1,
                 dropout_emb=0.1, dropout_att=0.0, **nemo_keys):
        super().__init__()
        check_nemo_keys("encoder", nemo_keys)
        check_choice("encoder.self_attention_model", self_attention_model, "rel_pos", "abs_pos")
        check_choice("encoder.att_context_style", att_context_style, "regular", "chunked_limited")
        check_choice("encoder.conv_norm_type", conv_norm_type, "batch_norm", "layer_norm")
        self.d_model = d_model
        self.relative = self_attention_model == "rel_pos"
        self.att_context_style = att_context_style
        self.att_context_sizes, self.att_context_probs = _att_context_sizes(
            att_context_size, att_context_probs, att_context_style
        )
        self.xscale = math.sqrt(d_model) if xscaling else 1.0
        self.dropout_pre_encoder, self.dropout_emb = dropout_pre_encoder, dropout_emb
        if subsampling and subsampling_factor > 1:
            check_choice("encoder.subsampling", subsampling, "dw_striding", "striding")
            channels = subsampling_conv_channels if subsampling_conv_channels > 0 else d_model
            self.pre_encode = ConvSubsampling(subsampling, subsampling_factor, feat_in, d_model,
                                              channels, causal_downsampling)
            self.subsampling_factor = subsampling_factor
        else:
            self.pre_encode = nn.Linear(feat_in, d_model)
            self.subsampling_factor = 1
        shared_u = shared_v = None  # untie_biases false: one pair of position biases for all layers
        if self.relative and not untie_biases:
            shared_u, shared_v = (nn.Parameter(torch.zeros(n_heads, d_model // n_heads))
                                  for _ in range(2))
        conv_context = _conv_context(conv_context_size, conv_kernel_size)
        self.layers = nn.ModuleList(
            ConformerLayer(d_model, d_model * ff_expansion_factor, n_heads, self.relative,
                           conv_kernel_size, conv_context, conv_norm_type, use_bias, dropout,
                           dropout_att, shared_u, shared_v) for _ in range(n_layers))
        self.output_dim = feat_out if feat_out > 0 else d_model
        self.out_proj = nn.Linear(d_model, feat_out) if 0 < feat_out != d_model else None

    def forward(self, audio_signal: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        x = audio_signal.transpose(1, 2)  # (B, T, feat_in)
        x = x.masked_fill(_padding_mask(length, x.size(1)).unsqueeze(-1), 0.0)
        if self.subsampling_factor > 1:
            x, length = self.pre_encode(x, length)  # (B, T', d_model)
        else:
            x = self.pre_encode(x)
        x = x * self.xscale
        T = x.size(1)
        pos_emb = None
        if self.relative:  # relative positions T-1 ... -(T-1), used inside attention only
            positions = torch.arange(T - 1, -T, -1, device=x.device)
            pos_emb = _sinusoids(positions, self.d_model).to(x.dtype)
            pos_emb = F.dropout(pos_emb, self.dropout_emb, self.training)  # (1, 2T-1, d_model)
        else:
            x = x + _sinusoids(torch.arange(T, device=x.device), self.d_model).to(x.dtype)
        x = F.dropout(x, self.dropout_pre_encoder, self.training)

        sizes, probs = self.att_context_sizes, self.att_context_probs
        drawn = self.training and len(sizes) > 1
        context = random.choices(sizes, weights=probs)[0] if drawn else sizes[0]
        visible = make_attention_mask(length, T, context, self.att_context_style)  # (B, T, T)
        pad_mask = _padding_mask(length, T)  # (B, T)
        for layer in self.layers:
            x = layer(x, pos_emb, visible, pad_mask)
        if self.out_proj is not None:
            x = self.out_proj(x)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        return x.transpose(1, 2), length.long()  # (B, output_dim, T')


def make_attention_mask(lengths: Tensor, max_len: int, att_context_size,
                        att_context_style: str = "regular") -> Tensor:
    """(B, T, T) bool, True where query i may attend to key j (NeMo's `_create_masks`, inverted).

    regular [l, r]: i - l <= j <= i + r (-1 = unlimited). chunked_limited [l, r]: chunks of r + 1
    frames; a frame sees its own chunk and l // (r + 1) chunks before it. No query sees a padded
    key; a padded query sees every valid key (its output is zeroed anyway): a row that sees no key
    at all makes attention kernels (cuDNN's backward on Hopper GPUs) return NaN gradients.
    """
    left, right = att_context_size
    frames = torch.arange(max_len, device=lengths.device)
    if att_context_style == "chunked_limited" and right >= 0:
        chunk = frames // (right + 1)
        chunk_diff = chunk.unsqueeze(1) - chunk  # (T, T): query chunk - key chunk
        left_chunks = left // (right + 1) if left >= 0 else max_len
        visible = (chunk_diff >= 0) & (chunk_diff <= left_chunks)
    else:
        offset = frames.unsqueeze(1) - frames  # (T, T): i - j
        visible = torch.ones(max_len, max_len, dtype=torch.bool, device=lengths.device)
        if left >= 0:
            visible &= offset <= left
        if right >= 0:
            visible &= -offset <= right
    valid = ~_padding_mask(lengths, max_len)
    keys = ~_padding_mask(lengths.clamp(min=1), max_len).unsqueeze(1)  # (B, 1, T)
    return torch.where(valid.unsqueeze(2), visible & keys, keys)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   norm="slaney") -> Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney mel scale (librosa's `filters.mel`)."""
    fft_freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    mel_min, mel_max = (_hz_to_mel(torch.tensor(hz)).item() for hz in (fmin, fmax))
    mels = torch.linspace(mel_min, mel_max, n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mels)  # (n_mels + 2,) lower edge, centre, upper edge of each filter
    rising = (fft_freqs - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - fft_freqs) / (edges[2:] - edges[1:-1])[:, None]
    weights = torch.minimum(rising, falling).clamp(min=0)
    if norm == "slaney":  # each filter integrates to the same area
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.float()


class ConvSubsampling(nn.Module):
    """NeMo's ConvSubsampling (`dw_striding` or `striding`): stride-2 3x3 convs, then Linear.

    Padding: (1, 1) inside the conv, or causal (2, 1) on both axes (NeMo's CausalConv2D) by F.pad;
    frames past each length are zeroed before every strided conv: no clip reads another's padding.
    """

    def __init__(self, subsampling: str, factor: int, feat_in: int, feat_out: int, channels: int,
                 is_causal: bool):
        super().__init__()
        num_stages = int(math.log2(factor))
        if 2**num_stages != factor:
            raise ValueError(f"encoder.subsampling_factor={factor} is not supported; "
                             "use a power of 2")
        self.left_pad, self.right_pad = (2, 1) if is_causal else (1, 1)
        conv_padding = 0 if is_causal else 1  # symmetric: the conv's own, no padded input copy
        layers, in_channels = [], 1
        for stage in range(num_stages):
            if subsampling == "dw_striding" and stage > 0:  # depthwise then pointwise
                layers.append(nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=conv_padding,
                                        groups=in_channels))
                layers.append(nn.Conv2d(in_channels, channels, 1))
            else:
                layers.append(nn.Conv2d(in_channels, channels, 3, stride=2, padding=conv_padding))
            layers.append(nn.ReLU(inplace=True))
            in_channels = channels
        # channels-last weights, the layout of their gradients (see forward): DDP's buckets match
        self.conv = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        freq = feat_in
        for _ in range(num_stages):
            freq = self.output_length(freq)
        self.out = nn.Linear(channels * freq, feat_out)

    def output_length(self, length):
        return (length + self.left_pad + self.right_pad - 3) // 2 + 1

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, F), already zero past each length."""
        # (B, 1, T, F): time is the conv's height. Explicit channels-last strides (ambiguous with
        # one channel) run every conv channels-last: ~2x faster backward on a CPU. Before each ReLU,
        # zero past each length in place (a conv's backward never reads its output).
        b, t, f = x.shape
        x = torch.empty((b, 1, t, f), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last).copy_(x[:, None])
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d) and layer.stride[0] == 2:
                if layer.padding[0] == 0:
                    x = F.pad(x, (self.left_pad, self.right_pad, self.left_pad, self.right_pad))
                lengths = self.output_length(lengths)
            elif isinstance(layer, nn.ReLU):
                x = x.mul_(~_padding_mask(lengths, x.size(2))[:, None, :, None])
            x = layer(x)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # (B, T', feat_out)


class ConformerLayer(nn.Module):
    """Macaron block: + FF/2, + self-attention, + convolution, + FF/2 (each pre-norm), LayerNorm."""

    def __init__(self, d_model, d_ff, n_heads, relative, conv_kernel, conv_context, conv_norm,
                 use_bias, dropout, dropout_att, pos_bias_u=None, pos_bias_v=None):
        super().__init__()
        self.dropout = dropout
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model, d_ff, dropout, use_bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout_att, use_bias, relative,
                                            pos_bias_u, pos_bias_v)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConformerConvolution(d_model, conv_kernel, conv_context, conv_norm, use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model, d_ff, dropout, use_bias)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x, pos_emb, visible, pad_mask):
        x = x + 0.5 * self._dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self._dropout(self.self_attn(self.norm_self_att(x), pos_emb, visible))
        x = x + self._dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self._dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)

    def _dropout(self, x):
        return F.dropout(x, self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, use_bias: bool):
        super().__init__()
        self.dropout = dropout
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x):
        return self.linear2(F.dropout(F.silu(self.linear1(x)), self.dropout, self.training))


class MultiHeadAttention(nn.Module):
    """NeMo's RelPositionMultiHeadAttention (Transformer-XL); relative=False: MultiHeadAttention.

    Runs through SDPA: the position term (q + pos_bias_v) . p, shifted so that entry (i, j) holds
    relative position i - j, is an additive float mask with NeMo's -10000 for masked positions;
    SDPA adds the content term (q + pos_bias_u) . k and scales by 1/sqrt(d_k).
    """

    def __init__(self, d_model, n_heads, dropout_att, use_bias, relative, bias_u=None, bias_v=None):
        super().__init__()
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.dropout, self.relative = dropout_att, relative
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        if relative:
            self.linear_pos = nn.Linear(d_model, d_model, bias=False)
            if bias_u is None:  # untied: this layer's own pair
                bias_u, bias_v = (nn.Parameter(torch.zeros(n_heads, self.d_k)) for _ in range(2))
            self.pos_bias_u, self.pos_bias_v = bias_u, bias_v

    def forward(self, x, pos_emb, visible):
        B, T, _ = x.shape
        q, k, v = (
            linear(x).view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, h, T, d_k)
            for linear in (self.linear_q, self.linear_k, self.linear_v)
        )
        scale = 1.0 / math.sqrt(self.d_k)
        if self.relative:
            p = self.linear_pos(pos_emb).view(1, 2 * T - 1, self.n_heads, self.d_k)
            p = p.transpose(1, 2)  # (1, h, 2T-1, d_k)
            scores = (q + self.pos_bias_v.unsqueeze(1)) @ p.transpose(-2, -1)  # (B, h, T, 2T-1)
            bias = _relative_shift(scores) * scale  # (B, h, T, T)
            q = q + self.pos_bias_u.unsqueeze(1)
        else:
            bias = torch.zeros(B, 1, T, T, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~visible.unsqueeze(1), NEMO_MASK_VALUE)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=scale
        )  # (B, h, T, d_k)
        return self.linear_out(out.transpose(1, 2).reshape(B, T, -1))


class ConformerConvolution(nn.Module):
    """1x1 conv + GLU, depthwise conv (symmetric or causal zero padding), norm, Swish, 1x1 conv."""

    def __init__(self, d_model: int, kernel_size: int, context: tuple[int, int], norm_type: str,
                 use_bias: bool):
        super().__init__()
        self.context = context  # zero frames padded (left, right) around the depthwise conv
        symmetric = context[0] if context[0] == context[1] else 0  # the conv pads it, no copy
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=symmetric,
                                        groups=d_model, bias=use_bias)
        self.batch_norm = (nn.BatchNorm1d if norm_type == "batch_norm" else nn.LayerNorm)(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)

    def forward(self, x, pad_mask):
        # the kernel-1 convs run as matmuls on (B, T, d): the same weights, faster than a 1x1 conv
        x = F.glu(_pointwise(self.pointwise_conv1, x), dim=-1)  # (B, T, d)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(1, 2)  # (B, d, T)
        if self.depthwise_conv.padding[0] == 0:
            x = F.pad(x, self.context)
        x = self.depthwise_conv(x)
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.batch_norm(x)
        return _pointwise(self.pointwise_conv2, F.silu(x).transpose(1, 2))  # (B, T, d)


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A kernel-1 Conv1d applied to (B, T, C_in) as a Linear -> (B, T, C_out)."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _random_bands(batch: int, n: int, width, limit, size: int) -> Tensor:
    """NeMo's SpecAugment draw of n bands per row: width floor(U * width), then start
    floor(U * (limit - width)); `width` and `limit` are numbers or (B, 1) tensors.
    Returns (B, size) bool, True inside a band."""
    device = next((x.device for x in (width, limit) if torch.is_tensor(x)), None)
    widths = (torch.rand(batch, n, device=device) * width).long()
    starts = (torch.rand(batch, n, device=device) * (limit - widths)).long()
    return _spans(starts, widths, size).any(1)


def _spans(starts: Tensor, widths: Tensor, size: int) -> Tensor:
    """(B, n) spans [start, start + width) -> (B, n, size) bool, True inside each span."""
    idx = torch.arange(size, device=starts.device)
    return (idx >= starts.unsqueeze(-1)) & (idx < (starts + widths).unsqueeze(-1))


def _padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool, True past each length."""
    return torch.arange(max_len, device=lengths.device) >= lengths.unsqueeze(1)


def _normalize_per_feature(x: Tensor, lengths: Tensor) -> Tensor:
    """Per clip and mel bin: minus the mean, over the unbiased std (+1e-5), both of valid frames."""
    valid = ~_padding_mask(lengths, x.size(-1)).unsqueeze(1)  # (B, 1, T)
    count = valid.sum(-1, keepdim=True)
    mean = x.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    squares = (x - mean).masked_fill(~valid, 0.0).pow(2).sum(-1, keepdim=True)
    variance = squares / (count - 1).clamp(min=1)
    return (x - mean) / (variance.sqrt() + NORMALIZE_EPS)


def _relative_shift(scores: Tensor) -> Tensor:
    """(..., T, 2T-1) scores at relative positions T-1 ... -(T-1) -> (..., T, T), (i, j) at i-j."""
    T = scores.size(-2)
    frames = torch.arange(T, device=scores.device)
    index = (T - 1 - frames).unsqueeze(1) + frames  # column of relative position i - j
    return scores.gather(-1, index.expand(*scores.shape[:-1], T))


def _sinusoids(positions: Tensor, d_model: int) -> Tensor:
    """(1, P, d_model): NeMo's sinusoidal encoding of `positions`, sin on even, cos on odd dims."""
    channels = torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device)
    div_term = torch.exp(channels * -(math.log(10000.0) / d_model))
    angles = positions.float().unsqueeze(1) * div_term
    pe = torch.zeros(len(positions), d_model, device=positions.device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return pe.unsqueeze(0)


def _hz_to_mel(hz: Tensor) -> Tensor:
    """Slaney mel scale: linear below 1 kHz (3 mels / 200 Hz), logarithmic above."""
    hz = hz.double()
    log_part = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log_part, hz * 3.0 / 200.0)


def _mel_to_hz(mels: Tensor) -> Tensor:
    log_part = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mels - 15.0))
    return torch.where(mels >= 15.0, log_part, mels * 200.0 / 3.0)


def _att_context_sizes(att_context_size, att_context_probs, style):
    """NeMo's att_context_size: [l, r] or a list (one drawn per training step, first at eval)."""
    sizes = att_context_size or [-1, -1]
    sizes = [list(s) for s in sizes] if isinstance(sizes[0], (list, tuple)) else [list(sizes)]
    for left, right in sizes:
        if style == "chunked_limited" and left > 0 and right >= 0 and left % (right + 1):
            raise ValueError(f"encoder.att_context_size [{left}, {right}]: chunked_limited needs "
                             "left % (right+1) == 0")
        if style == "chunked_limited" and right < 0 and len(sizes) == 1:
            raise ValueError("encoder.att_context_size: chunked_limited needs a right context >= 0")
    probs = list(att_context_probs) if att_context_probs else [1.0 / len(sizes)] * len(sizes)
    if len(probs) != len(sizes):
        raise ValueError("encoder.att_context_probs needs one probability per att_context_size")
    return sizes, probs


def _conv_context(conv_context_size, kernel_size: int) -> tuple[int, int]:
    """(left, right) frames the depthwise conv sees: null/'regular' symmetric, 'causal', [l, r]."""
    if conv_context_size in (None, "regular"):
        return ((kernel_size - 1) // 2, (kernel_size - 1) // 2)
    if conv_context_size == "causal":
        return (kernel_size - 1, 0)
    if isinstance(conv_context_size, (list, tuple)) and len(conv_context_size) == 2:
        if sum(conv_context_size) == kernel_size - 1:
            return tuple(conv_context_size)
    raise ValueError(
        f"encoder.conv_context_size={conv_context_size!r}: use null, 'causal' or [left, right] "
        "with left + right + 1 == conv_kernel_size"
    )
