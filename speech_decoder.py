"""Autoregressive speech decoder: a small causal transformer that turns the LLM's hidden state of each frame,
together with the previous frame's codec codes, into logits for all K codebooks of that frame.

The K codebooks of a frame are predicted in parallel by one head; the recursion runs over frames. Training runs
the whole sequence at once (forward without a cache); inference feeds frames one at a time through a KV cache so a
frame costs O(T) instead of O(T^2):

    cache = decoder.new_cache()
    for t in range(num_frames):
        logits = decoder(hidden[:, t:t+1], prev_codes, cache=cache)    # (B, 1, K, V)
        prev_codes = sample_codes(logits)                              # (B, 1, K)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The `speech_decoder` section of the model config; `target` names NeMo's class and is ignored here.
DEFAULT_CONFIG = {
    "target": None,
    "d_model": 1024,
    "n_layers": 12,
    "n_heads": 16,
    "d_kv": None,  # per-head size of queries/keys/values; None means d_model // n_heads
    "d_ff": 4096,
    "max_seq_len": 2048,
    "dropout": 0.1,
    "layernorm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "init_method_std": 0.02,
    "use_cache": True,
}

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class SpeechDecoder(nn.Module):
    """Pre-norm causal transformer over frames, conditioned on the LLM hidden state and the previous frame's codes.

    prev_codes[:, t] are the codes of frame t-1 (the caller shifts them and fills frame 0 with a start code), so
    the logits at frame t never see the codes they predict.
    """

    def __init__(self, cfg: dict, llm_hidden_size: int, num_codebooks: int, codebook_vocab_size: int):
        super().__init__()
        cfg = _resolve_config(cfg)
        d_model = cfg["d_model"]
        self.max_seq_len = cfg["max_seq_len"]
        self.use_cache = cfg["use_cache"]
        self.num_codebooks = num_codebooks
        self.codebook_vocab_size = codebook_vocab_size

        self.input_proj = nn.Linear(llm_hidden_size, d_model) if llm_hidden_size != d_model else None
        self.code_embeddings = nn.ModuleList(nn.Embedding(codebook_vocab_size, d_model) for _ in range(num_codebooks))
        self.position_embeddings = nn.Embedding(cfg["max_seq_len"], d_model)
        self.dropout = nn.Dropout(cfg["dropout"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.norm_out = nn.LayerNorm(d_model, eps=cfg["layernorm_epsilon"])
        self.head = nn.Linear(d_model, num_codebooks * codebook_vocab_size)

        std = cfg["init_method_std"]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: scale the projections that write into the residual stream so its variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp.fc_out):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * cfg["n_layers"]))

    def new_cache(self) -> "DecoderCache":
        """An empty cache for step-by-step decoding of one batch of sessions."""
        return DecoderCache()

    def forward(self, hidden: Tensor, prev_codes: Tensor, cache: "DecoderCache | None" = None) -> Tensor:
        """Logits (B, T, K, V) for hidden (B, T, H) and prev_codes (B, T, K).

        Without a cache the T frames are the whole sequence (training). With one they are appended to the frames
        already in it and only their logits are returned.
        """
        if cache is not None and not self.use_cache:
            # use_cache: false -- keep the inputs and recompute the whole sequence on every call
            if cache.hidden is None:
                cache.hidden, cache.prev_codes = hidden, prev_codes
            else:
                cache.hidden = torch.cat([cache.hidden, hidden], dim=1)
                cache.prev_codes = torch.cat([cache.prev_codes, prev_codes], dim=1)
            cache.num_frames = cache.hidden.size(1)
            return self(cache.hidden, cache.prev_codes)[:, -hidden.size(1):]

        B, T, _ = hidden.shape
        past = 0 if cache is None else cache.num_frames
        if past + T > self.max_seq_len:
            raise ValueError(
                f"speech decoder got {past + T} frames but max_seq_len is {self.max_seq_len}; "
                "raise speech_decoder.max_seq_len or decode shorter sessions"
            )

        x = self.input_proj(hidden) if self.input_proj is not None else hidden  # (B, T, D)
        x = x + sum(emb(prev_codes[..., k]) for k, emb in enumerate(self.code_embeddings)) / self.num_codebooks
        x = x + self.position_embeddings(torch.arange(past, past + T, device=hidden.device))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.num_frames += T
        logits = self.head(self.norm_out(x))  # (B, T, K * V)
        return logits.view(B, T, self.num_codebooks, self.codebook_vocab_size)


class DecoderCache:
    """State kept between step-by-step calls. With use_cache it holds each layer's keys and values, so a new frame
    attends to the past without recomputing it; without, it holds the inputs seen so far."""

    def __init__(self):
        self.num_frames = 0
        self.keys: list[Tensor] = []  # per layer, (B, nh, T, d_kv)
        self.values: list[Tensor] = []
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


def sample_codes(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Codes from logits (..., V): argmax when temperature is 0 (the default), otherwise a sample from
    softmax(logits / temperature) restricted to the top_k most likely codes when top_k is given."""
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


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg["d_model"], eps=cfg["layernorm_epsilon"])
        self.attn = CausalSelfAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg["d_model"], eps=cfg["layernorm_epsilon"])
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.norm_attn(x), cache, layer)
        return x + self.mlp(self.norm_mlp(x))


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with n_heads heads of size d_kv; n_heads * d_kv need not equal d_model."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_heads, self.d_kv = cfg["n_heads"], cfg["d_kv"]
        inner = self.n_heads * self.d_kv
        self.qkv = nn.Linear(cfg["d_model"], 3 * inner)
        self.out = nn.Linear(inner, cfg["d_model"])
        self.dropout_p = cfg["dropout"]
        self.resid_dropout = nn.Dropout(cfg["dropout"])

    def forward(self, x: Tensor, cache: DecoderCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d_kv)
        past = 0
        if cache is not None:
            past = cache.num_frames
            k, v = cache.append(layer, k, v)  # (B, nh, past + T, d_kv)
        # query i sits at position past + i and may see keys 0 .. past + i; a single new frame sees
        # everything; without a past that is is_causal (no mask: flash attention on a GPU)
        mask = None
        if T > 1 and past:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and not past,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv)  # (B, T, nh * d_kv)
        return self.resid_dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.fc_in = nn.Linear(cfg["d_model"], cfg["d_ff"])
        self.activation = ACTIVATIONS[cfg["activation_function"]]
        self.fc_out = nn.Linear(cfg["d_ff"], cfg["d_model"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc_out(self.activation(self.fc_in(x))))


def _resolve_config(cfg: dict) -> dict:
    """The speech_decoder section merged over the defaults, with the mistakes a user can make caught early."""
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown speech_decoder key {unknown[0]!r}; valid keys: {', '.join(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **cfg}
    if cfg["d_kv"] is None:
        if cfg["d_model"] % cfg["n_heads"]:
            raise ValueError(
                f"speech_decoder.d_model={cfg['d_model']} is not divisible by n_heads={cfg['n_heads']}; set d_kv"
            )
        cfg["d_kv"] = cfg["d_model"] // cfg["n_heads"]
    if cfg["activation_function"] not in ACTIVATIONS:
        raise ValueError(
            f"unknown speech_decoder.activation_function {cfg['activation_function']!r}; "
            f"choose one of {', '.join(ACTIVATIONS)}"
        )
    for key in ("d_model", "n_layers", "n_heads", "d_kv", "d_ff", "max_seq_len"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"speech_decoder.{key} must be a positive integer, got {cfg[key]!r}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ValueError(f"speech_decoder.dropout must be in [0, 1), got {cfg['dropout']}")
    return cfg
