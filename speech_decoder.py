"""Autoregressive speech decoders: a small causal transformer that turns the LLM's hidden state
of each frame, together with the previous frame's codec codes, into logits for all K codebooks of
that frame.

The K codebooks of a frame are predicted in parallel by one head; the recursion runs over frames.
Training runs the whole sequence at once (forward without a cache); inference feeds frames one at a
time through a cache so a frame costs O(T) instead of O(T^2):

    decoder = build_speech_decoder(cfg["speech_decoder"], llm_hidden_size, num_codebooks, vocab)
    cache = decoder.new_cache()
    for t in range(num_frames):
        logits = decoder(hidden[:, t:t+1], prev_codes, cache=cache)    # (B, 1, K, V)
        prev_codes = sample_codes(logits)                              # (B, 1, K)

The keys of the `speech_decoder` section choose the architecture (`decoder_class`):
* NeMo's keys (d_ffn, sa_n_heads, kernel_size, p_dropout, ..., as in NeMo's example config
  s2s_duplex_speech_decoder.yaml) build NeMo's TransformerARSpeechDecoder: pre-norm layers
  without biases whose feed-forward is a causal convolution over frames, with NeMo's parameter
  names, so NeMo's weights load as they are.
* The configuration document's keys (n_heads, d_kv, d_ff, dropout, activation_function, ...) build a
  GPT-style decoder (SpeechDecoder): linear feed-forward, biases, learned positions, a final norm.
`target: speech_decoder.TransformerARSpeechDecoder` or `speech_decoder.SpeechDecoder` picks one
outright; NeMo's class name is ignored (the document pairs it with its own keys).

AudioCodec wraps the frozen transformers codec (Mimi, Encodec or DAC) whose codes the decoders
predict: audio <-> codes, in fp32.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SpeechDecoderConfig:
    """The configuration document's keys and defaults (the GPT-style decoder)."""
    target: str | None = None  # names NeMo's class in the document; ignored
    d_model: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    d_kv: int | None = None  # per-head size of queries/keys/values; None means d_model // n_heads
    d_ff: int = 4096
    max_seq_len: int = 2048
    dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    init_method_std: float = 0.02
    use_cache: bool = True

    def __post_init__(self):
        _check_sizes(self, ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"), ("dropout",))
        if self.d_kv is None and self.d_model % self.n_heads:
            raise ValueError(f"speech_decoder.d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}; set d_kv")
        if self.d_kv is not None:
            _check_sizes(self, ("d_kv",), ())
        if self.activation_function not in ACTIVATIONS:
            raise ValueError("unknown speech_decoder.activation_function "
                             f"{self.activation_function!r}; choose one of "
                             f"{', '.join(ACTIVATIONS)}")

    @property
    def head_size(self) -> int:
        return self.d_kv or self.d_model // self.n_heads


@dataclass(frozen=True)
class TransformerARConfig:
    """NeMo's keys (TransformerARSpeechDecoder and the transformer it builds), NeMo's defaults."""
    n_layers: int
    d_model: int
    d_ffn: int
    sa_n_heads: int
    kernel_size: int  # frames a feed-forward convolution sees: this one and kernel_size - 1 before
    p_dropout: float = 0.0
    p_dropout_out: float = 0.0
    is_causal: bool = True
    apply_norm_out: bool = False
    max_length_causal_mask: int = 4096  # the most frames a session may have
    use_learnable_pos_emb: bool = False
    cond_on_prev_audio_tokens: bool = True
    detach_input: bool = False  # no gradient from the audio loss into the LLM
    has_xattn: bool = False  # cross-attention: the duplex models give it nothing to attend to
    xa_d_memory: int | None = None  # xa_*, apply_norm_to_cond: only with has_xattn; unused
    xa_n_heads: int | None = None
    xa_d_head: int | None = None
    apply_norm_to_cond: bool = True
    cfg_unconditional_prob: float | None = None  # classifier-free guidance: refused
    cfg_scale: float = 2.5  # the guidance scale: unused without guidance
    target: str | None = None

    def __post_init__(self):
        _check_sizes(self, ("n_layers", "d_model", "d_ffn", "sa_n_heads", "kernel_size",
                            "max_length_causal_mask"), ("p_dropout", "p_dropout_out"))
        if self.d_model % self.sa_n_heads:
            raise ValueError(f"speech_decoder.d_model={self.d_model} is not divisible by "
                             f"sa_n_heads={self.sa_n_heads}")
        refused = {
            "is_causal": (not self.is_causal, "the duplex models decode frame by frame, which "
                          "needs a causal decoder; set is_causal: true"),
            "has_xattn": (self.has_xattn, "the duplex models give the speech decoder no memory "
                          "to cross-attend to (NeMo's neither); set has_xattn: false"),
            "cfg_unconditional_prob": (self.cfg_unconditional_prob, "classifier-free guidance is "
                                       "not implemented (no NeMo config uses it); remove the key"),
        }
        for key, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"speech_decoder.{key}={getattr(self, key)}: {why}")


PROJECT_TARGETS = {"speech_decoder.SpeechDecoder": SpeechDecoderConfig,
                   "speech_decoder.TransformerARSpeechDecoder": TransformerARConfig}


def decoder_class(section: dict) -> type:
    """The decoder a `speech_decoder` section builds: the one a project `target` names, else NeMo's
    when a key only NeMo's decoder has is present, else the document's."""
    nemo, doc = _field_names(TransformerARConfig), _field_names(SpeechDecoderConfig)
    nemo_keys, doc_keys = set(section) & (nemo - doc), set(section) & (doc - nemo)
    config = PROJECT_TARGETS.get(section.get("target"))
    if config is None and nemo_keys and doc_keys:
        raise ValueError(f"speech_decoder mixes NeMo's keys ({', '.join(sorted(nemo_keys))}) "
                         f"with the configuration document's ({', '.join(sorted(doc_keys))}); "
                         "use one set")
    config = config or (TransformerARConfig if nemo_keys else SpeechDecoderConfig)
    return TransformerARSpeechDecoder if config is TransformerARConfig else SpeechDecoder


def build_speech_decoder(section: dict, llm_hidden_size: int, num_codebooks: int,
                         codebook_vocab_size: int) -> nn.Module:
    return decoder_class(section)(section, llm_hidden_size, num_codebooks, codebook_vocab_size)


def read_config(config: type, section: dict):
    """A `speech_decoder` section as `config` (a copy: the section is left as it is)."""
    names = _field_names(config)
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"unknown speech_decoder key {unknown[0]!r} for {config.__name__}; valid "
                         f"keys: {', '.join(f.name for f in dataclasses.fields(config))}")
    missing = [f.name for f in dataclasses.fields(config)
               if f.default is dataclasses.MISSING and f.name not in section]
    if missing:
        raise ValueError(f"speech_decoder.{missing[0]} is required (NeMo's decoder needs n_layers, "
                         "d_model, d_ffn, sa_n_heads and kernel_size)")
    return config(**section)


class FrameDecoder(nn.Module):
    """What both decoders share: logits (B, T, K, V) for hidden (B, T, H) and prev_codes (B, T, K),
    from the subclass's `decode(hidden, prev_codes, cache)`.

    prev_codes[:, t] are the codes of frame t-1 (the caller shifts them and fills frame 0 with a
    start code), so the logits at frame t never see the codes they predict. Without a cache the T
    frames are the whole sequence (training). With one they are appended to the frames already in it
    and only their logits are returned.
    """

    use_cache = True  # False: keep the inputs and recompute every frame seen so far on each call

    def new_cache(self) -> "DecoderCache":
        """An empty cache for step-by-step decoding of one batch of sessions."""
        return DecoderCache()

    def forward(self, hidden: Tensor, prev_codes: Tensor,
                cache: "DecoderCache | None" = None) -> Tensor:
        if cache is None or self.use_cache:
            return self.decode(hidden, prev_codes, cache)
        if cache.hidden is None:
            cache.hidden, cache.prev_codes = hidden, prev_codes
        else:
            cache.hidden = torch.cat([cache.hidden, hidden], dim=1)
            cache.prev_codes = torch.cat([cache.prev_codes, prev_codes], dim=1)
        cache.num_frames = cache.hidden.size(1)
        return self.decode(cache.hidden, cache.prev_codes, None)[:, -hidden.size(1):]


class SpeechDecoder(FrameDecoder):
    """The document's decoder: a pre-norm causal GPT over frames, conditioned on the LLM hidden
    state and the previous frame's codes."""

    def __init__(self, section: dict, llm_hidden_size: int, num_codebooks: int,
                 codebook_vocab_size: int):
        super().__init__()
        cfg = read_config(SpeechDecoderConfig, section)
        d_model = cfg.d_model
        self.max_seq_len = cfg.max_seq_len
        self.use_cache = cfg.use_cache
        self.num_codebooks = num_codebooks
        self.codebook_vocab_size = codebook_vocab_size

        self.input_proj = (nn.Linear(llm_hidden_size, d_model) if llm_hidden_size != d_model
                           else None)
        self.code_embeddings = nn.ModuleList(nn.Embedding(codebook_vocab_size, d_model)
                                             for _ in range(num_codebooks))
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d_model, eps=cfg.layernorm_epsilon)
        self.head = nn.Linear(d_model, num_codebooks * codebook_vocab_size)

        residual = [p for b in self.blocks for p in (b.attn.out.weight, b.mlp.fc_out.weight)]
        _init_gpt2(self.modules(), cfg.init_method_std, cfg.n_layers, residual)

    def decode(self, hidden: Tensor, prev_codes: Tensor, cache: "DecoderCache | None") -> Tensor:
        B, T, _ = hidden.shape
        past = 0 if cache is None else cache.num_frames
        _check_length(past + T, self.max_seq_len, "max_seq_len")
        x = self.input_proj(hidden) if self.input_proj is not None else hidden  # (B, T, D)
        x = x + _mean_code_embedding(self.code_embeddings, prev_codes)
        x = x + self.position_embeddings(torch.arange(past, past + T, device=hidden.device))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.num_frames += T
        logits = self.head(self.norm_out(x))  # (B, T, K * V)
        return logits.view(B, T, self.num_codebooks, self.codebook_vocab_size)


class TransformerARSpeechDecoder(FrameDecoder):
    """NeMo's speech decoder (speechlm2 TransformerARSpeechDecoder over the TTS transformer), with
    NeMo's parameter names: input_proj, t5_decoder.{layers, norm_out, position_embeddings},
    final_proj, audio_embeddings. Only what the duplex models use: causal, no cross-attention, no
    guidance, no padding mask (NeMo's duplex model passes an all-true one).

    The cache keeps each layer's keys and values and the last kernel_size - 1 inputs of each
    feed-forward convolution, so a frame costs one query against the past (NeMo reruns the whole
    prefix every frame, as use_cache = False does).
    """

    def __init__(self, section: dict, llm_hidden_size: int, num_codebooks: int,
                 codebook_vocab_size: int):
        super().__init__()
        cfg = read_config(TransformerARConfig, section)
        d_model = cfg.d_model
        self.max_seq_len = cfg.max_length_causal_mask
        self.detach_input = cfg.detach_input
        self.num_codebooks = num_codebooks
        self.codebook_vocab_size = codebook_vocab_size
        # PyTorch's default init outside t5_decoder, as in NeMo
        self.input_proj = (nn.Linear(llm_hidden_size, d_model) if llm_hidden_size != d_model
                           else None)
        self.t5_decoder = ConvTransformer(cfg)  # NeMo's name for it (the TTS model's T5 decoder)
        self.final_proj = nn.Linear(d_model, num_codebooks * codebook_vocab_size)
        self.audio_embeddings = None
        if cfg.cond_on_prev_audio_tokens:
            self.audio_embeddings = nn.ModuleList(nn.Embedding(codebook_vocab_size, d_model)
                                                  for _ in range(num_codebooks))

    def decode(self, hidden: Tensor, prev_codes: Tensor, cache: "DecoderCache | None") -> Tensor:
        B, T, _ = hidden.shape
        if self.detach_input:
            hidden = hidden.detach()
        x = self.input_proj(hidden) if self.input_proj is not None else hidden  # (B, T, D)
        if self.audio_embeddings is not None:
            x = x + _mean_code_embedding(self.audio_embeddings, prev_codes)
        logits = self.final_proj(self.t5_decoder(x, cache))  # (B, T, K * V)
        return logits.view(B, T, self.num_codebooks, self.codebook_vocab_size)


class DecoderCache:
    """State kept between step-by-step calls: each layer's keys and values (and, for NeMo's decoder,
    the last inputs of its feed-forward convolutions), so a new frame attends to the past without
    recomputing it; with the document's use_cache: false, the inputs seen so far instead."""

    def __init__(self):
        self.num_frames = 0
        self.keys: list[Tensor] = []  # per layer, (B, nh, T, d_kv)
        self.values: list[Tensor] = []
        self.conv_inputs: dict[int, tuple[Tensor, Tensor]] = {}  # per layer, (B, kernel - 1, C)
        self.hidden: Tensor | None = None  # (B, T, H), only when use_cache is false
        self.prev_codes: Tensor | None = None  # (B, T, K)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add one layer's new keys/values and return all of that layer's keys/values so far."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


def sample_codes(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Codes from logits (..., V): argmax when temperature is 0 (the default), otherwise a sample
    from softmax(logits / temperature), restricted to the top_k likeliest codes if top_k is set."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1).reshape(-1, logits.size(-1))
    codes = torch.multinomial(probs, num_samples=1, generator=generator)
    return codes.view(logits.shape[:-1])


# -------------------------------------------------------------------------------------------------
# the audio codec: the codes the decoders predict, and the audio they stand for

class AudioCodec(nn.Module):
    """A frozen transformers codec (Mimi, Encodec or DAC): audio (B, T) <-> codes (B, T_frames, K),
    in fp32."""

    keep_fp32 = True  # train.py keeps this module in fp32 under bf16-true

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().float()
        for p in self.model.parameters():
            p.requires_grad = False
        config = model.config
        self.kind = config.model_type
        self.sample_rate = int(config.sampling_rate)
        self.codebook_size = int(config.codebook_size)
        if self.kind == "mimi":
            self.samples_per_frame = round(config.sampling_rate / config.frame_rate)
        elif self.kind == "encodec":
            self.samples_per_frame = int(math.prod(config.upsampling_ratios))
        else:
            self.samples_per_frame = int(config.hop_length)
        self.frame_rate = self.sample_rate / self.samples_per_frame
        self.register_buffer("silence_codes", torch.zeros(0, dtype=torch.long), persistent=False)
        self._refresh()
        self.num_codebooks = len(self.silence_codes)
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._refresh())

    def train(self, mode: bool = True) -> "AudioCodec":
        return super().train(False)  # always frozen

    def _apply(self, fn, recurse=True):
        """Moves and casts the codec, but its 0-dim integer buffers (Mimi's and Encodec's conv
        strides and padding, which every encode reads on the host to pad its input) stay on the
        CPU: read there, they sync no GPU."""
        host = [(module, name, buffer.cpu()) for module in self.modules()
                for name, buffer in module._buffers.items()
                if buffer is not None and buffer.dim() == 0 and not buffer.is_floating_point()]
        super()._apply(fn, recurse)
        for module, name, buffer in host:
            module._buffers[name] = buffer
        return self

    @torch.no_grad()
    def encode(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        """audio (B, T) at `sample_rate` -> codes (B, T_frames, K) int64 and their lengths (B,)."""
        with torch.autocast(audio.device.type, enabled=False):
            self._forget_codebook_caches()
            x = audio.float()[:, None]  # (B, 1, T)
            if self.kind == "encodec":
                bandwidth = max(self.model.config.target_bandwidths)
                codes = self.model.encode(x, bandwidth=bandwidth).audio_codes[0]
            else:
                codes = self.model.encode(x).audio_codes  # (B, K, T_frames)
        lens = torch.div(audio_lens + self.samples_per_frame - 1, self.samples_per_frame,
                         rounding_mode="floor")
        return codes.transpose(1, 2).long(), lens.clamp(max=codes.size(-1))

    @torch.no_grad()
    def decode(self, codes: Tensor, code_lens: Tensor) -> tuple[Tensor, Tensor]:
        """codes (B, T_frames, K) -> fp32 audio (B, T_frames * samples_per_frame), lengths (B,)."""
        with torch.autocast(codes.device.type, enabled=False):
            self._forget_codebook_caches()
            codes = codes.transpose(1, 2)  # (B, K, T_frames)
            if self.kind == "encodec":
                audio = self.model.decode(codes[None], [None]).audio_values
            elif self.kind == "dac":
                audio = self.model.decode(audio_codes=codes).audio_values
            else:
                audio = self.model.decode(codes).audio_values
        audio = audio.reshape(codes.size(0), -1)[:, : codes.size(-1) * self.samples_per_frame]
        audio = audio.float()
        return audio, (code_lens * self.samples_per_frame).clamp(max=audio.size(1))

    def _refresh(self) -> None:
        """(Re)compute what derives from the weights: the codes of a silent frame (steady state)."""
        silence = torch.zeros(1, self.sample_rate, device=self.silence_codes.device)
        codes, _ = self.encode(silence, torch.tensor([self.sample_rate], device=silence.device))
        self.silence_codes = codes[0, -1]

    def _forget_codebook_caches(self) -> None:
        # Mimi/Encodec codebooks cache `embed_sum / cluster_usage` on first use; recompute it after
        # any load or move
        for module in self.model.modules():
            if hasattr(module, "_embed") and hasattr(module, "embed_sum"):
                module._embed = None


# -------------------------------------------------------------------------------------------------
# the document's decoder

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class Block(nn.Module):
    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.norm_attn(x), cache, layer)
        return x + self.mlp(self.norm_mlp(x))


class CausalSelfAttention(nn.Module):
    """Causal attention with n_heads heads of size d_kv; n_heads * d_kv need not equal d_model."""

    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.n_heads, self.d_kv = cfg.n_heads, cfg.head_size
        inner = self.n_heads * self.d_kv
        self.qkv = nn.Linear(cfg.d_model, 3 * inner)
        self.out = nn.Linear(inner, cfg.d_model)
        self.dropout_p = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        p = self.dropout_p if self.training else 0.0
        y = causal_attention(self.qkv(x), self.n_heads, cache, layer, p)
        return self.resid_dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: SpeechDecoderConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.activation = ACTIVATIONS[cfg.activation_function]
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc_out(self.activation(self.fc_in(x))))


# -------------------------------------------------------------------------------------------------
# NeMo's decoder (names as in NeMo's tts transformer_2501)

class ConvTransformer(nn.Module):
    """Positions (optional), dropout, the layers, the final norm (optional) and its dropout."""

    def __init__(self, cfg: TransformerARConfig):
        super().__init__()
        self.max_seq_len = cfg.max_length_causal_mask
        self.dropout = nn.Dropout(cfg.p_dropout)
        self.dropout_out = nn.Dropout(cfg.p_dropout_out)
        self.norm_out = nn.LayerNorm(cfg.d_model, bias=False) if cfg.apply_norm_out else None
        self.layers = nn.ModuleList(ConvTransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.position_embeddings = None
        if cfg.use_learnable_pos_emb:
            self.position_embeddings = nn.Embedding(cfg.max_length_causal_mask, cfg.d_model)
        residual = [p for n, p in self.named_parameters() if "o_net" in n and n.endswith("weight")]
        _init_gpt2(self.modules(), 0.02, cfg.n_layers, residual)

    def forward(self, x: Tensor, cache: DecoderCache | None) -> Tensor:
        past, T = (0 if cache is None else cache.num_frames), x.size(1)
        _check_length(past + T, self.max_seq_len, "max_length_causal_mask")
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(past, past + T, device=x.device))
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        if cache is not None:
            cache.num_frames += T
        return self.dropout_out(self.norm_out(x) if self.norm_out is not None else x)


class ConvTransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerARConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.d_model, bias=False)
        self.self_attention = SelfAttention(cfg)
        self.norm_pos_ff = nn.LayerNorm(cfg.d_model, bias=False)
        self.pos_ff = ConvFeedForward(cfg)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        x = x + self.self_attention(self.norm_self(x), cache, layer)
        return x + self.pos_ff(self.norm_pos_ff(x), cache, layer)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerARConfig):
        super().__init__()
        self.n_heads, self.dropout_p = cfg.sa_n_heads, cfg.p_dropout
        self.qkv_net = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_net = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.p_dropout)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        p = self.dropout_p if self.training else 0.0
        y = causal_attention(self.qkv_net(x), self.n_heads, cache, layer, p)
        return self.dropout(self.o_net(y))


class ConvFeedForward(nn.Module):
    """Causal convolution to d_ffn, GELU (tanh), causal convolution back, dropout."""

    def __init__(self, cfg: TransformerARConfig):
        super().__init__()
        self.proj = CausalConv(cfg.d_model, cfg.d_ffn, cfg.kernel_size)
        self.o_net = CausalConv(cfg.d_ffn, cfg.d_model, cfg.kernel_size)
        self.dropout = nn.Dropout(cfg.p_dropout)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        past_x, past_h = cache.conv_inputs.get(layer, (None, None)) if cache else (None, None)
        h, past_x = self.proj(x, past_x)
        y, past_h = self.o_net(F.gelu(h, approximate="tanh"), past_h)
        if cache is not None:
            cache.conv_inputs[layer] = past_x, past_h
        return self.dropout(y)


class CausalConv(nn.Module):
    """Conv1d over frames that sees the current frame and the kernel_size - 1 before it (zeros
    before the first frame)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, bias=False)

    def forward(self, x: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, C_in) and the kernel_size - 1 frames before it -> (B, T, C_out) and the last
        kernel_size - 1 frames of the input (the next call's `past`)."""
        context = self.conv.kernel_size[0] - 1
        if past is None:
            past = x.new_zeros(x.size(0), context, x.size(2))
        x = torch.cat([past, x], dim=1)  # (B, context + T, C_in)
        return self.conv(x.transpose(1, 2)).transpose(1, 2), x[:, x.size(1) - context:]


# -------------------------------------------------------------------------------------------------
# helpers

def causal_attention(qkv: Tensor, n_heads: int, cache: DecoderCache | None, layer: int,
                     dropout_p: float) -> Tensor:
    """qkv (B, T, 3 * n_heads * d_head), rows [q; k; v] each split into heads -> (B, T, n_heads *
    d_head). With a cache the T frames follow the cached ones: their keys/values are appended."""
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d_head)
    past = 0
    if cache is not None:
        past = cache.num_frames
        k, v = cache.append(layer, k, v)  # (B, nh, past + T, d_head)
    # query i sits at position past + i and may see keys 0 .. past + i; a single new frame sees all;
    # without a past that is is_causal (no mask tensor: flash attention on a GPU)
    mask = None
    if T > 1 and past:
        mask = torch.ones(T, past + T, dtype=torch.bool, device=qkv.device).tril(diagonal=past)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and not past,
                                       dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(B, T, -1)


def _mean_code_embedding(embeddings: nn.ModuleList, codes: Tensor) -> Tensor:
    """codes (B, T, K) -> the mean of the K codebooks' embeddings (B, T, D)."""
    return sum(emb(codes[..., k]) for k, emb in enumerate(embeddings)) / len(embeddings)


def _init_gpt2(modules, std: float, n_layers: int, residual_weights: list) -> None:
    """GPT-2's init: N(0, std) weights, zero biases; the projections that write into the residual
    stream get std / sqrt(2 n_layers), so its variance does not grow with depth."""
    for module in modules:
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for weight in residual_weights:
        nn.init.normal_(weight, mean=0.0, std=std / math.sqrt(2 * n_layers))


def _check_length(num_frames: int, limit: int, key: str) -> None:
    if num_frames > limit:
        raise ValueError(f"speech decoder got {num_frames} frames but {key} is {limit}; raise "
                         f"speech_decoder.{key} or decode shorter sessions")


def _check_sizes(cfg, positive: tuple[str, ...], probabilities: tuple[str, ...]) -> None:
    for key in positive:
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"speech_decoder.{key} must be a positive integer, got {value!r}")
    for key in probabilities:
        if not isinstance(getattr(cfg, key), (int, float)) or not 0.0 <= getattr(cfg, key) < 1.0:
            raise ValueError(f"speech_decoder.{key} must be in [0, 1), got {getattr(cfg, key)!r}")


def _field_names(config: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}
