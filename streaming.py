"""Live duplex sessions: 80 ms of the user in, the agent's next text token and 80 ms of speech out.

    session = model.stream(batch_size=1)       # a DuplexS2SModel whose encoder is causal
    text_ids, audio = session.step(user_chunk)  # (B, 1280) at 16 kHz -> (B,), (B, 1920) at 24 kHz
    session.reset()                             # a new conversation with the same model

The outputs equal `offline_inference`'s frame for frame, and nothing is recomputed over the past:
* Mel frontend: pre-emphasis carries the previous raw sample; frame t of the centred STFT is made
  once the last sample its window weighs has arrived (t * hop + 199 for 400 samples in a 512 FFT).
* FastConformer, cache-aware as NeMo's streaming encoders: one attention chunk (chunked_limited
  att_context_size [L, R]: R + 1 frames) at a time. The causal subsampling convolutions re-run over
  the chunk's mel frames plus two output frames of left context, whose outputs (they saw the
  window's zero padding) are dropped; each layer keeps the keys and values of its last L frames and
  the last K - 1 inputs of its causal depthwise convolution. The modality adapter streams alike.
* Latency: a frame is final once its chunk is complete, so step k feeds the LLM frame k - 1 - R and
  the first R steps return the text pad and silence: (1 + R) x 80 ms of algorithmic latency.
* The LLM and the speech decoder keep their KV caches in the model's DuplexState, as offline.
* Codec: Mimi decodes each frame exactly: every causal convolution keeps its last inputs, every
  transposed convolution the overlap it has not added yet, the decoder transformer its sliding
  window KV cache. (transformers' own `decode(decoder_cache=...)` zero-pads every convolution at
  every call, so calling it frame by frame is wrong.) Encodec and DAC are not causal end to end
  (DAC's convolutions, Encodec's LSTM): each step decodes their last 8 frames and keeps the newest
  one, close to offline decoding but not equal to it.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

from perception import (AudioPerceptionModule, ConformerEncoder, MelSpectrogram, _pointwise,
                        _sinusoids)

CODEC_WINDOW = 8  # frames a codec that cannot stream decodes at each step


class DuplexSession:
    """`batch_size` independent conversations with a duplex model, all advanced by each `step`."""

    def __init__(self, model, batch_size: int = 1):
        check_streamable(model.perception)
        if model.training:
            raise ValueError("stream() needs the model in eval mode: call model.eval() first")
        self.model, self.batch_size = model, batch_size
        perception = model.perception
        self.frame_seconds = perception.token_equivalent_duration
        self.chunk_samples = round(perception.sample_rate * self.frame_seconds)
        self.lookahead = lookahead_frames(perception)
        decoder = getattr(model, "speech_decoder", None)
        self.max_frames = model.context_limit(getattr(decoder, "max_seq_len", None))
        self.reset()

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency: the frame itself plus the encoder's lookahead."""
        return 1000 * self.frame_seconds * (1 + self.lookahead)

    def reset(self) -> None:
        """Forget everything heard and said: the next step starts a new conversation."""
        model, B = self.model, self.batch_size
        self.perception = PerceptionStream(model.perception, B)
        self.codec = codec_stream(model.audio_codec, B)
        self.state = model.new_state(B)
        self.pending = None  # (B, n, H) perception frames the LLM has not read yet
        self.steps = self.frames = 0  # chunks heard, frames read by the LLM

    @torch.no_grad()
    def step(self, user_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """(B, chunk_samples) the next 80 ms of each user -> the agent's next text token (B,) and
        its next 80 ms of speech (B, codec samples per frame)."""
        model, B, codec = self.model, self.batch_size, self.model.audio_codec
        chunk = torch.as_tensor(user_chunk, device=model.device)
        chunk = chunk[None] if chunk.dim() == 1 and B == 1 else chunk
        if tuple(chunk.shape) != (B, self.chunk_samples):
            raise ValueError(f"session.step takes ({B}, {self.chunk_samples}) samples (one frame "
                             f"at {model.perception.sample_rate} Hz), got {tuple(chunk.shape)}")
        new = self.perception.push(chunk)  # (B, k, H)
        self.pending = new if self.pending is None else torch.cat([self.pending, new], 1)
        self.steps += 1
        if self.steps <= self.lookahead:  # the first frame's chunk is still incomplete
            text = torch.full((B,), model.text_pad_id, device=chunk.device)
            return text, torch.zeros(B, codec.samples_per_frame, device=chunk.device)
        if self.max_frames is not None and self.frames >= self.max_frames:
            seconds = self.max_frames * self.frame_seconds
            raise ValueError(f"the session reached the model's context of {self.max_frames} frames "
                             f"({seconds:.1f} s): call session.reset()")
        frame, self.pending = self.pending[:, :1], self.pending[:, 1:]
        text, codes = model.step(self.state, frame)
        self.frames += 1
        codes = torch.where(codes >= codec.codebook_size, codec.silence_codes, codes)  # no control
        return text, self.codec.push(codes)

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held per part: the perception's and codec's stay flat however long a session runs;
        the KV caches (llm, speech_decoder) grow by a frame per step up to the model's context."""
        parts = {"perception": self.perception, "codec": self.codec, "llm": self.state.llm_cache,
                 "speech_decoder": self.state.decoder_cache}
        return {name: sum(t.numel() * t.element_size() for t in _tensors(part))
                for name, part in parts.items()}


def check_streamable(perception: AudioPerceptionModule) -> None:
    """One line naming every key that keeps this perception from streaming, or nothing."""
    keys = []
    if perception.preprocessor.normalize not in ("NA", None, False):
        keys.append("preprocessor.normalize: NA (per_feature statistics need the whole recording)")
    for name in ("encoder", "modality_adapter"):
        encoder = getattr(perception, name)
        if not isinstance(encoder, ConformerEncoder):
            continue
        left, right = encoder.att_context_sizes[0]
        if encoder.subsampling_factor > 1 and encoder.pre_encode.left_pad != 2:
            keys.append(f"{name}.causal_downsampling: true")
        if left < 0 or right < 0 or (encoder.att_context_style != "chunked_limited" and right > 0):
            keys.append(f"{name}.att_context_style: chunked_limited with att_context_size [L, R], "
                        f"L and R >= 0 (now {encoder.att_context_style} {[left, right]})")
        if any(layer.conv.context[1] for layer in encoder.layers):
            keys.append(f"{name}.conv_context_size: causal")
        if not encoder.relative:
            keys.append(f"{name}.self_attention_model: rel_pos")
    if keys:
        raise ValueError("streaming needs a causal perception; set perception."
                         + ", perception.".join(keys))


def lookahead_frames(perception: AudioPerceptionModule) -> int:
    """Steps a frame waits after its own until it is final: R, or more if the adapter's chunks are
    longer than the encoder's."""
    n_enc = perception.encoder.att_context_sizes[0][1] + 1
    adapter = perception.modality_adapter
    n_ada = adapter.att_context_sizes[0][1] + 1 if isinstance(adapter, ConformerEncoder) else 1
    # encoder frame i is final after step (i // n_enc + 1) * n_enc; adapter frame j when the last
    # encoder frame of its chunk is
    last_input = [-(-(j + 1) // n_ada) * n_ada - 1 for j in range(n_enc * n_ada)]
    return max((i // n_enc + 1) * n_enc - (j + 1) for j, i in enumerate(last_input))


class PerceptionStream:
    """AudioPerceptionModule run incrementally: raw audio in, the frames that became final out."""

    def __init__(self, perception: AudioPerceptionModule, batch_size: int):
        self.proj = perception.proj
        self.mel = MelStream(perception.preprocessor, batch_size, self.proj.weight.device)
        self.stages = [ConformerStream(perception.encoder, batch_size)]
        if isinstance(perception.modality_adapter, ConformerEncoder):
            self.stages.append(ConformerStream(perception.modality_adapter, batch_size))

    def push(self, audio: Tensor) -> Tensor:
        x = self.mel.push(audio).transpose(1, 2).to(self.proj.weight.dtype)  # (B, T_mel, n_mels)
        for stage in self.stages:
            x = stage.push(x)  # (B, T_enc, d)
        return self.proj(x)  # (B, T_enc, output_dim)


class MelStream:
    """MelSpectrogram (eval mode, no normalisation) of audio that arrives in pieces."""

    def __init__(self, mel: MelSpectrogram, batch_size: int, device: torch.device):
        self.mel, self.hop, self.n_fft = mel, mel.hop_length, mel.n_fft
        half = self.n_fft // 2
        # a frame's window weighs samples up to this many past its centre (exclusive)
        self.window_end = (self.n_fft - mel.win_length) // 2 + mel.win_length - half
        self.signal = torch.zeros(batch_size, half, device=device)  # pre-emphasised, centre padding
        self.start = 0  # index of signal[:, 0] in the centre-padded signal
        self.last = torch.zeros(batch_size, 1, device=device)  # previous raw sample (pre-emphasis)
        self.received = self.frames = 0

    def push(self, audio: Tensor) -> Tensor:
        """(B, n) samples -> (B, n_mels, k) the log-mel frames whose windows are now complete."""
        mel, x = self.mel, audio.float()
        if mel.preemph:
            x, self.last = x - mel.preemph * torch.cat([self.last, x[:, :-1]], 1), x[:, -1:]
        self.signal = torch.cat([self.signal, x], 1)
        self.received += x.size(1)
        ready = max(0, (self.received - self.window_end) // self.hop + 1)
        if ready == self.frames:
            return x.new_zeros(x.size(0), mel.featurizer.fb.size(1), 0)
        begin = self.frames * self.hop - self.start
        end = (ready - 1) * self.hop + self.n_fft - self.start
        frames = F.pad(self.signal, (0, max(0, end - self.signal.size(1))))[:, begin:end]
        spec = torch.stft(frames, self.n_fft, self.hop, mel.win_length, center=False,
                          window=mel.featurizer.window.float(), return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, n_fft // 2 + 1, k)
        power = power if mel.mag_power == 2.0 else power.pow(mel.mag_power / 2)
        x = torch.matmul(mel.featurizer.fb.float(), power)  # (B, n_mels, k)
        if mel.log:
            guard = mel._log_guard(x.dtype)
            add = mel.log_zero_guard_type == "add"
            x = torch.log(x + guard) if add else torch.log(x.clamp(min=guard))
        self.signal = self.signal[:, ready * self.hop - self.start :]
        self.start, self.frames = ready * self.hop, ready
        return x


class ConformerStream:
    """A ConformerEncoder run one attention chunk at a time with NeMo's streaming caches: each
    layer's keys and values of the last L frames (cache_last_channel) and the inputs its causal
    depthwise convolution still needs (cache_last_time)."""

    def __init__(self, encoder: ConformerEncoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.left, right = encoder.att_context_sizes[0]
        self.chunk, self.factor = right + 1, encoder.subsampling_factor
        # each causal stride-2 stage reads 2 inputs before its own, so an output reads 2 factor - 2
        # inputs before its own: that many leading outputs of a window saw its zero padding
        self.drop = -(-(2 * self.factor - 2) // self.factor)
        weight, d = encoder.layers[0].norm_out.weight, encoder.d_model
        self.keys, self.values = [None] * len(encoder.layers), [None] * len(encoder.layers)
        self.conv_inputs = [weight.new_zeros(batch_size, d, layer.conv.context[0])
                            for layer in encoder.layers]
        self.inputs, self.start, self.done = None, 0, 0  # inputs to come, index of the 1st, outputs

    def push(self, x: Tensor) -> Tensor:
        """(B, T, feat_in) more inputs -> (B, T', output_dim) the outputs of completed chunks."""
        self.inputs = x if self.inputs is None else torch.cat([self.inputs, x], 1)
        outputs = []
        while (chunk := self._next_chunk()) is not None:
            outputs.append(self._layers(chunk))
        if not outputs:
            return x.new_zeros(self.batch_size, 0, self.encoder.output_dim)
        return torch.cat(outputs, 1)

    def _next_chunk(self) -> Tensor | None:
        """The next chunk after subsampling (B, chunk, d_model), or None until its inputs are in."""
        first, n, factor = self.done, self.chunk, self.factor
        end = (first + n - 1) * factor + 1  # the inputs up to the chunk's last output frame
        if self.start + self.inputs.size(1) < end:
            return None
        drop = min(self.drop, first)
        window = self.inputs[:, (first - drop) * factor - self.start : end - self.start]
        if factor > 1:
            lengths = torch.full((window.size(0),), window.size(1), device=window.device)
            x = self.encoder.pre_encode(window, lengths)[0][:, drop : drop + n]
        else:
            x = self.encoder.pre_encode(window)
        start = (first + n - min(self.drop, first + n)) * factor  # the next window's
        self.inputs, self.start, self.done = self.inputs[:, start - self.start :], start, first + n
        return x

    def _layers(self, x: Tensor) -> Tensor:
        """ConformerLayer.forward in eval mode, the caches standing in for the past frames."""
        encoder = self.encoder
        x = x * encoder.xscale
        for i, layer in enumerate(encoder.layers):
            x = x + 0.5 * layer.feed_forward1(layer.norm_feed_forward1(x))
            x = x + self._attend(i, layer.self_attn, layer.norm_self_att(x))
            x = x + self._convolve(i, layer.conv, layer.norm_conv(x))
            x = x + 0.5 * layer.feed_forward2(layer.norm_feed_forward2(x))
            x = layer.norm_out(x)
        return encoder.out_proj(x) if encoder.out_proj is not None else x

    def _attend(self, i: int, attention: nn.Module, x: Tensor) -> Tensor:
        """Relative-position attention of the chunk's frames to the cached frames and the chunk."""
        B, T, d = x.shape
        h, d_k = attention.n_heads, attention.d_k
        q, k, v = (linear(x).view(B, T, h, d_k).transpose(1, 2)  # (B, h, T, d_k)
                   for linear in (attention.linear_q, attention.linear_k, attention.linear_v))
        if self.keys[i] is not None:
            k, v = torch.cat([self.keys[i], k], 2), torch.cat([self.values[i], v], 2)  # C + T keys
        keep = max(0, k.size(2) - self.left)
        self.keys[i], self.values[i] = k[:, :, keep:], v[:, :, keep:]
        C = k.size(2) - T
        distances = torch.arange(C + T - 1, -T, -1, device=x.device)  # query - key: C+T-1 .. 1-T
        p = attention.linear_pos(_sinusoids(distances, d).to(x.dtype))
        p = p.view(1, -1, h, d_k).transpose(1, 2)  # (1, h, C + 2T - 1, d_k)
        scores = (q + attention.pos_bias_v.unsqueeze(1)) @ p.transpose(-2, -1)  # (B, h, T, C+2T-1)
        frames = torch.arange(T, device=x.device)
        column = (T - 1 - frames).unsqueeze(1) + torch.arange(C + T, device=x.device)  # C + i - j
        scale = d_k**-0.5
        bias = scores.gather(-1, column.expand(B, h, T, C + T)) * scale
        out = F.scaled_dot_product_attention(q + attention.pos_bias_u.unsqueeze(1), k, v,
                                             attn_mask=bias, scale=scale)  # (B, h, T, d_k)
        return attention.linear_out(out.transpose(1, 2).reshape(B, T, d))

    def _convolve(self, i: int, conv: nn.Module, x: Tensor) -> Tensor:
        """ConformerConvolution, the cached inputs in front of the depthwise convolution's."""
        x = F.glu(_pointwise(conv.pointwise_conv1, x), dim=-1).transpose(1, 2)  # (B, d, T)
        x = torch.cat([self.conv_inputs[i], x], -1)  # (B, d, K - 1 + T)
        self.conv_inputs[i] = x[..., x.size(-1) - self.conv_inputs[i].size(-1) :]
        x = conv.depthwise_conv(x)  # (B, d, T)
        if isinstance(conv.batch_norm, nn.LayerNorm):
            x = conv.batch_norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = conv.batch_norm(x)
        return _pointwise(conv.pointwise_conv2, F.silu(x).transpose(1, 2))  # (B, T, d)


def codec_stream(codec, batch_size: int) -> "MimiDecodeStream | WindowDecodeStream":
    """The exact frame-by-frame decoder for a causal Mimi, overlapping windows for other codecs."""
    config = codec.model.config
    if codec.kind == "mimi" and config.use_causal_conv and config.trim_right_ratio == 1.0:
        return MimiDecodeStream(codec)
    return WindowDecodeStream(codec)


class MimiDecodeStream:
    """Mimi's decoder one frame at a time, equal to decoding the whole sequence."""

    def __init__(self, codec):
        self.model = codec.model
        codec._forget_codebook_caches()
        self.cache = DynamicCache(config=self.model.decoder.decoder_transformer.config)
        self.tails = {}  # per convolution: its last inputs, or (transposed) the overlap to add

    def push(self, codes: Tensor) -> Tensor:
        """(B, K) one frame of codes -> (B, samples_per_frame) audio."""
        decoder = self.model.decoder
        with torch.autocast(codes.device.type, enabled=False):
            x = self.model.quantizer.decode(codes[..., None])  # (B, D, 1)
            if decoder.upsample is not None:
                x = self._transposed(decoder.upsample, x)
            x = decoder.decoder_transformer(x.transpose(1, 2), cache=self.cache, use_cache=True)
            x = x.last_hidden_state.transpose(1, 2)
            for layer in decoder.decoder_seanet.layers:
                x = self._layer(layer, x)
        return x[:, 0]  # (B, samples_per_frame)

    def _layer(self, layer: nn.Module, x: Tensor) -> Tensor:
        if isinstance(layer, MimiConv1d):  # causal, stride 1 in the decoder
            pad = int(layer.padding_total)
            tail = self.tails.get(layer)
            if tail is None and layer.pad_mode == "replicate":
                tail = x[..., :1].expand(-1, -1, pad)
            elif tail is None:
                tail = x.new_zeros(x.size(0), x.size(1), pad)
            x = torch.cat([tail, x], -1)
            self.tails[layer] = x[..., x.size(-1) - pad :]
            return layer.conv(x)
        if isinstance(layer, MimiConvTranspose1d):
            return self._transposed(layer, x)
        if isinstance(layer, MimiResnetBlock):
            h = x
            for sublayer in layer.block:
                h = self._layer(sublayer, h)
            return self._layer(layer.shortcut, x) + h
        return layer(x)

    def _transposed(self, layer: MimiConvTranspose1d, x: Tensor) -> Tensor:
        """A causal transposed convolution: what overlaps the next frame waits to be added to it."""
        y = layer.conv(x)  # (B, C, T * stride + kernel - stride)
        n = y.size(-1) - layer.padding_right  # T * stride
        tail = self.tails.get(layer)
        if tail is not None:
            y = torch.cat([y[..., : tail.size(-1)] + tail, y[..., tail.size(-1) :]], -1)
        bias = layer.conv.bias  # added once: kept out of the overlap
        self.tails[layer] = y[..., n:] - bias[:, None] if bias is not None else y[..., n:]
        return y[..., :n]


class WindowDecodeStream:
    """Any codec: each step decodes the last `window` frames and keeps the newest frame's audio."""

    def __init__(self, codec, window: int = CODEC_WINDOW):
        self.codec, self.window, self.codes = codec, window, None

    def push(self, codes: Tensor) -> Tensor:
        codes = codes[:, None]  # (B, 1, K)
        codes = codes if self.codes is None else torch.cat([self.codes, codes], 1)
        self.codes = codes[:, -self.window :]
        lens = torch.full((codes.size(0),), self.codes.size(1), device=codes.device)
        audio, _ = self.codec.decode(self.codes, lens)  # (B, n * samples_per_frame)
        return audio[:, -self.codec.samples_per_frame :]


def _tensors(state, depth: int = 0) -> list[Tensor]:
    """Every tensor a state object holds in its attributes, lists and dicts (modules aside)."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    elif not isinstance(state, (list, tuple)):
        state = [v for v in getattr(state, "__dict__", {}).values() if not isinstance(v, nn.Module)]
    return [t for item in state for t in _tensors(item, depth + 1)] if depth < 6 else []
