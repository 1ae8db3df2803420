"""Full-duplex speech-to-speech: NeMo's DuplexS2SModel and DuplexS2SSpeechDecoderModel in PyTorch.

Every 80 ms frame the model hears the user and emits the agent's next text token and next codec
frame. The user channel is continuous (perception embeddings, one per frame); the agent has a text
channel (pad, BOS at a turn start, its tokens one per frame, pads, EOS where its speech ends;
data.py) and a codec channel (K codes per frame from a frozen codec) that runs one frame behind
the text. At frame t the LLM reads (codes[-1] = delay)

    user_emb[t] * duplex_user_channel_weight + E_text(text[t]) + sum_k E_k(codes[t-1, k])

and predicts text[t+1] and codes[t]. The speech vocabulary is the codebook plus three control
codes: speech BOS / EOS replace the codes of the frames where the text channel has BOS / EOS, and
the delay code starts a session. DuplexS2SSpeechDecoderModel feeds the LLM text + user only and
predicts the codes with a separate causal transformer (speech_decoder.py) that reads the LLM's last
hidden state of each frame and the previous frame's codes.

    model = DuplexS2SModel(cfg["model"])
    out = model.offline_inference(audio_16k, audio_lens)  # greedy, frame by frame, KV caches
    out["text"], out["audio"]                  # agent text per session, speech at the codec rate

    session = model.stream(batch_size=1)      # live use (streaming.py): a step per 80 ms of audio
    text_id, audio = session.step(user_chunk)  # (1, 1280) at 16 kHz -> (1,), (1, 1920) at 24 kHz

    model.save_pretrained("exports/s2s_duplex")  # or: python infer.py export --model RUN --out DIR
    model = DuplexS2SModel.from_pretrained("exports/s2s_duplex")  # or a train.py checkpoint

    python infer.py duplex --model runs/s2s_duplex --audio question.wav --out answer/
    python infer.py stream --model runs/s2s_duplex --audio question.wav --out answer/ --realtime

Parameter names (for `freeze_params`): llm.model.* and llm.lm_head.* (the Hugging Face LLM, as in
SALM; with `lora`, llm.model.base_model.model.*), perception.*, embed_audio_tokens.{k}.*,
audio_head.* (speech_decoder.* instead of those two in the speech-decoder model) and
audio_codec.model.* (the codec: always frozen, fp32, in eval mode). NeMo's names (llm.layers.*,
embed_tokens.*, lm_head.*, speech_generation.*) load with checkpoint.load_nemo_duplex_weights.

As in NeMo: LoRA wraps only the LLM's decoder stack (the embedding and output head stay trainable);
a tokenizer without pad and unk tokens pads the text channel with id 0; validation answers every
validation conversation (`offline_inference`) and logs txt_bleu and, with a `scoring_asr`, asr_bleu.

Where this differs from NeMo, on purpose:
* The loss covers each session's frames only; NeMo also sums the cross-entropy over the padding of
  shorter sessions (and divides by the true frame count), so its loss depends on the batching.
* The codec must run at the model's frame rate and the data's target sample rate; NeMo truncates
  mismatched streams silently. The check runs at start-up and names the key to change.
* Control codes are replaced by the codec's codes of silence before decoding (NeMo: frame 0 of the
  batch).
* The speech-decoder model has no unused `embed_audio_tokens` / `audio_head`.
* Generated text is decoded turn by turn (split at BOS) and the turns joined with spaces.
* Validation also logs the teacher-forced losses (val_loss, val_text_loss, val_audio_loss); NeMo
  logs none.
* The scoring ASR is a SALM of this project or a transformers ASR model, not a NeMo transducer.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, DynamicCache

from checkpoint import CONFIG_NAME, find_checkpoint, read_checkpoint
from data import DuplexS2SDataset
from metrics import bleu
from salm import (DEFAULT_ASR_PROMPT, IGNORE_INDEX, SALM, SpeechLLM, answer, causal_mask,
                  frozen_modules_to_eval)
from speech_decoder import AudioCodec, DecoderCache, build_speech_decoder, sample_codes
from streaming import DuplexSession

NUM_CONTROL_CODES = 3  # speech BOS, EOS and delay ids follow the codebook ids
SUPPORTED_CODECS = ("mimi", "encodec", "dac")
CODEC_SEED = 1234  # a codec directory without weights is built from its config with this seed
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class DuplexS2SModel(SpeechLLM):
    """LLM + streaming perception + frozen audio codec. `cfg` is the config's `model` section."""

    pad_fallback_id = 0  # NeMo's get_pad_id: the pad token, else unk, else id 0
    lora_on_decoder_stack = True  # NeMo's duplex LoRA: the embedding and output head stay trainable

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        self.audio_codec = load_audio_codec(cfg["pretrained_audio_codec"])
        self.text_loss_weight = cfg["text_loss_weight"]
        self.audio_loss_weight = cfg["audio_loss_weight"]
        self.user_channel_weight = cfg["duplex_user_channel_weight"]
        if self.text_pad_id in (self.text_bos_id, self.text_eos_id):
            raise ValueError(f"the tokenizer of {cfg['pretrained_llm']} pads with id "
                             f"{self.text_pad_id}, its BOS or EOS; the text channel needs a "
                             "distinct id for silent frames")
        codec_frame = 1 / self.audio_codec.frame_rate
        if not math.isclose(codec_frame, self.perception.token_equivalent_duration, rel_tol=1e-3):
            raise ValueError(
                f"pretrained_audio_codec {cfg['pretrained_audio_codec']} makes a frame every "
                f"{codec_frame:.4f} s but the perception encoder every "
                f"{self.perception.token_equivalent_duration:.4f} s; the two streams must run at "
                "the same rate (change the codec or perception's subsampling)")
        self._build_audio_output(self.embed_tokens.embedding_dim)
        self.freeze()
        self._scorer = None  # the scoring ASR, loaded on first use and kept out of the state dict

    def _build_audio_output(self, hidden_size: int) -> None:
        """Channel fusion input (an embedding table per codebook) and the K-codebook output head."""
        K, V = self.num_codebooks, self.speech_vocab_size
        self.embed_audio_tokens = nn.ModuleList(nn.Embedding(V, hidden_size) for _ in range(K))
        self.audio_head = nn.Linear(hidden_size, K * V)

    # ---- vocabulary ------------------------------------------------------------------------------

    @property
    def lm_head(self) -> nn.Linear:
        return self.llm.get_output_embeddings()

    @property
    def num_codebooks(self) -> int:
        return self.audio_codec.num_codebooks

    @property
    def speech_vocab_size(self) -> int:
        return self.audio_codec.codebook_size + NUM_CONTROL_CODES

    @property
    def speech_bos_id(self) -> int:
        return self.audio_codec.codebook_size

    @property
    def speech_eos_id(self) -> int:
        return self.audio_codec.codebook_size + 1

    @property
    def speech_delay_id(self) -> int:
        return self.audio_codec.codebook_size + 2

    # ---- data ------------------------------------------------------------------------------------

    def make_dataset(self, data_cfg: dict) -> DuplexS2SDataset:
        """The duplex dataset for the `data` section, after checking that it fits the codec and
        perception. Conversations with more frames than the LLM's context (or the speech decoder's
        max_seq_len) are skipped."""
        check_data_config(data_cfg, self.audio_codec, self.perception,
                          self.cfg["pretrained_audio_codec"])
        decoder_limit = getattr(getattr(self, "speech_decoder", None), "max_seq_len", None)
        return DuplexS2SDataset(self.tokenizer, self.text_pad_id, data_cfg["frame_length"],
                                data_cfg["source_sample_rate"], data_cfg["target_sample_rate"],
                                data_cfg["input_roles"], data_cfg["output_roles"],
                                max_frames=self.context_limit(decoder_limit))

    def prepare_inputs(self, batch: dict) -> dict:
        """Batch -> per-frame inputs and labels, one frame apart: text[t] and codes[t-1] in,
        text[t+1] and codes[t] out."""
        user_embeds, user_lens = self.perception(batch["source_audio"],
                                                 batch["source_audio_lens"])  # (B, T, H)
        codes, code_lens = self.audio_codec.encode(batch["target_audio"],
                                                   batch["target_audio_lens"])  # (B, Tc, K)
        text = batch["target_tokens"]
        T = min(user_embeds.size(1), codes.size(1))  # equal rates: a rounding frame apart at most
        text = F.pad(text, (0, max(0, T - text.size(1))), value=self.text_pad_id)[:, :T]  # (B, T)
        user_embeds, codes = user_embeds[:, :T], codes[:, :T]
        lens = torch.minimum(torch.minimum(user_lens, code_lens), batch["target_token_lens"])
        lens = lens.clamp(max=T)
        codes = torch.where(text[..., None] == self.text_bos_id, self.speech_bos_id, codes)
        codes = torch.where(text[..., None] == self.text_eos_id, self.speech_eos_id, codes)
        delay = torch.full_like(codes[:, :1], self.speech_delay_id)
        codes = torch.cat([delay, codes[:, :-1]], dim=1)  # audio one frame behind text; (B, T, K)
        return {
            "user_embeds": user_embeds[:, :-1],  # (B, T-1, H)
            "text_inputs": text[:, :-1],  # (B, T-1)
            "audio_inputs": codes[:, :-1],  # (B, T-1, K)
            "text_labels": text[:, 1:],
            "audio_labels": codes[:, 1:],
            "frame_lens": (lens - 1).clamp(min=0),  # (B,) supervised frames per session
        }

    # ---- model -----------------------------------------------------------------------------------

    def forward(self, user_embeds: Tensor, text_ids: Tensor, audio_ids: Tensor,
                state: "DuplexState | None" = None):
        """user_embeds (B, T, H), text_ids (B, T), audio_ids (B, T, K) -> {"text_logits": (B, T,
        V_text), "audio_logits": (B, T, K, V_speech)}. With a state, the T frames continue its
        session."""
        embeds = self._fuse(user_embeds, text_ids) + sum(
            emb(audio_ids[..., k]) for k, emb in enumerate(self.embed_audio_tokens))
        hidden = self._llm_hidden(embeds, state)  # (B, T, H)
        shape = (*hidden.shape[:2], self.num_codebooks, self.speech_vocab_size)
        audio_logits = self.audio_head(hidden).view(shape)  # (B, T, K, V_speech)
        return {"text_logits": self.lm_head(hidden), "audio_logits": audio_logits}

    def _fuse(self, user_embeds: Tensor, text_ids: Tensor) -> Tensor:
        return user_embeds * self.user_channel_weight + self.embed_tokens(text_ids)

    def _llm_hidden(self, embeds: Tensor, state: "DuplexState | None") -> Tensor:
        """The LLM's last hidden states (B, T, H); right padding only: a plain causal mask does."""
        cache = state.llm_cache if state is not None else None
        mask = causal_mask(embeds.size(1), embeds.device) if cache is None else None
        out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                     use_cache=cache is not None)
        return out.last_hidden_state

    # ---- training and validation -----------------------------------------------------------------

    def training_step(self, batch: dict) -> dict:
        frozen_modules_to_eval([self.llm, *self.perception.children()])
        inputs = self.prepare_inputs(batch)
        out = self(inputs["user_embeds"], inputs["text_inputs"], inputs["audio_inputs"])
        text_sum, audio_sum, num_frames = self.loss_sums(out["text_logits"], out["audio_logits"],
                                                         inputs)
        K = self.num_codebooks
        loss_sum = self.text_loss_weight * text_sum + self.audio_loss_weight * audio_sum / K
        n = num_frames.clamp(min=1)
        return {
            "loss": loss_sum / n,
            "loss_sum": loss_sum,  # / count: NeMo's weighted loss, exact over micro-batches, ranks
            "count": num_frames,
            "num_tokens": num_frames,
            "log": {"text_loss": text_sum.detach() / n, "audio_loss": audio_sum.detach() / (n * K)},
        }

    def loss_sums(self, text_logits: Tensor, audio_logits: Tensor, inputs: dict) -> tuple:
        """Summed text CE, summed audio CE (over frames and codebooks) and the number of frames, in
        fp32; frames past a session's length are ignored labels (no boolean indexing, no sync)."""
        frames = torch.arange(text_logits.size(1), device=text_logits.device)
        padding = frames >= inputs["frame_lens"][:, None]  # (B, T-1)
        text_labels = inputs["text_labels"].masked_fill(padding, IGNORE_INDEX)
        audio_labels = inputs["audio_labels"].masked_fill(padding[..., None], IGNORE_INDEX)
        text_sum = F.cross_entropy(text_logits.flatten(0, 1).float(), text_labels.flatten(),
                                   reduction="sum")
        audio_sum = F.cross_entropy(audio_logits.flatten(0, 2).float(), audio_labels.flatten(),
                                    reduction="sum")
        return text_sum, audio_sum, (~padding).sum()

    @torch.no_grad()
    def validation_step(self, batch: dict, generate: bool = True) -> dict:
        """NeMo's validation, whatever `generate` says (it is SALM's choice): the sessions answered
        by `offline_inference`, as "pairs" (reference agent text, generated text) and, with a
        scoring ASR, "asr_pairs" (reference, transcript of the generated speech). Also the summed
        teacher-forced losses, which NeMo does not compute."""
        inputs = self.prepare_inputs(batch)
        logits = self(inputs["user_embeds"], inputs["text_inputs"], inputs["audio_inputs"])
        text_sum, audio_sum, num_frames = self.loss_sums(logits["text_logits"],
                                                         logits["audio_logits"], inputs)
        out = {"text_loss_sum": float(text_sum),
               "audio_loss_sum": float(audio_sum) / self.num_codebooks,
               "num_frames": int(num_frames)}
        scorer = self._scoring_asr()
        results = self.offline_inference(batch["source_audio"], batch["source_audio_lens"],
                                         decode_audio=scorer is not None)
        out["pairs"] = list(zip(batch["target_texts"], results["text"]))
        if scorer is not None:
            clips = [a[:n] for a, n in zip(results["audio"], results["audio_len"])]
            transcripts = scorer.transcribe(clips, self.audio_codec.sample_rate)
            out["asr_pairs"] = list(zip(batch["target_texts"], transcripts))
        return out

    def validation_metrics(self) -> dict:
        """The metrics validation logs (per set and their mean), each None or why it is not logged.
        Loads the scoring ASR: train.py asks before the first step, so a bad one fails at once."""
        asr = None if self._scoring_asr() else (
            "ASR-BLEU needs a scoring ASR: set model.scoring_asr to a SALM checkpoint or export of "
            "this project or a transformers ASR model, or monitor val_txt_bleu or val_loss")
        metrics = dict.fromkeys(("loss", "text_loss", "audio_loss", "txt_bleu"))
        return {**metrics, "asr_bleu": asr}

    def validation_summary(self, totals: dict) -> dict:
        """Summed `validation_step` outputs of one validation set -> losses and BLEU scores."""
        n = max(totals["num_frames"], 1)
        text_loss, audio_loss = totals["text_loss_sum"] / n, totals["audio_loss_sum"] / n
        summary = {"text_loss": text_loss, "audio_loss": audio_loss,
                   "loss": self.text_loss_weight * text_loss + self.audio_loss_weight * audio_loss}
        for key, pairs in (("txt_bleu", totals.get("pairs")),
                           ("asr_bleu", totals.get("asr_pairs"))):
            if pairs:
                summary[key] = bleu([ref for ref, _ in pairs], [hyp for _, hyp in pairs])
        return summary

    def _scoring_asr(self) -> "Transcriber | None":
        if self._scorer is None:
            name = self.cfg["scoring_asr"]
            if not name:
                print("validation: model.scoring_asr is not set, so ASR-BLEU is skipped "
                      "(text BLEU only)")
                self._scorer = False
            else:
                self._scorer = Transcriber(name, self.device)
        return self._scorer or None

    # ---- inference -------------------------------------------------------------------------------

    def new_state(self, batch_size: int) -> "DuplexState":
        """The state of `batch_size` fresh sessions: empty caches, and the inputs of the first frame
        (text pad, the delay code)."""
        long = dict(dtype=torch.long, device=self.device)
        return DuplexState(
            llm_cache=DynamicCache(config=self.llm.config),
            text=torch.full((batch_size,), self.text_pad_id, **long),
            codes=torch.full((batch_size, self.num_codebooks), self.speech_delay_id, **long),
        )

    @torch.no_grad()
    def step(self, state: "DuplexState", user_frame: Tensor, temperature: float = 0.0,
             top_k: int | None = None):
        """Feed one frame of user embeddings (B, 1, H); returns the agent's next text token (B,) and
        codec frame (B, K) and advances `state`. Codes are greedy unless a temperature is given
        (then sampled, top-k)."""
        out = self(user_frame, state.text[:, None], state.codes[:, None], state)
        state.text = out["text_logits"][:, -1].argmax(-1)
        state.codes = sample_codes(out["audio_logits"][:, -1], temperature, top_k)
        return state.text, state.codes

    def stream(self, batch_size: int = 1) -> DuplexSession:
        """A live session of `batch_size` conversations, equal to `offline_inference`:
        `text_ids, audio = session.step(user_chunk)` per 80 ms of each user (streaming.py). Needs a
        causal encoder."""
        return DuplexSession(self, batch_size)

    @torch.no_grad()
    def offline_inference(self, audio: Tensor, audio_lens: Tensor, decode_audio: bool = True,
                          temperature: float = 0.0, top_k: int | None = None) -> dict:
        """Answer whole recordings frame by frame, as a live session would (the perception runs
        once over the whole input; with a causal encoder each frame still sees only the past and
        its chunk).

        audio: (B, T_samples) at the perception's sample rate, audio_lens (B,). Returns "text" (list
        of str), "tokens_text" (B, T), "tokens_audio" (B, T, K), "tokens_len" (B,), and with
        decode_audio "audio" (B, T_out) float32 at the codec's rate and "audio_len" (B,).
        """
        user_embeds, lens = self.perception(audio.to(self.device),
                                            torch.as_tensor(audio_lens, device=self.device))
        B, T, _ = user_embeds.shape
        state = self.new_state(B)
        tokens_text = torch.full((B, T), self.text_pad_id, dtype=torch.long, device=self.device)
        tokens_audio = torch.zeros(B, T, self.num_codebooks, dtype=torch.long, device=self.device)
        for t in range(T):
            tokens_text[:, t], tokens_audio[:, t] = self.step(state, user_embeds[:, t : t + 1],
                                                              temperature, top_k)
        out = {"text": [self.decode_text(ids[:n]) for ids, n in zip(tokens_text, lens)],
               "tokens_text": tokens_text, "tokens_audio": tokens_audio, "tokens_len": lens}
        if decode_audio:
            codec = self.audio_codec
            codes = torch.where(tokens_audio >= codec.codebook_size, codec.silence_codes,
                                tokens_audio)
            out["audio"], out["audio_len"] = self.audio_codec.decode(codes, lens)
        return out

    def decode_text(self, ids: Tensor) -> str:
        """Text channel -> the agent's words: each turn (from a BOS) decoded on its own, turns
        joined by spaces."""
        ids = [t for t in ids.tolist() if t != self.text_pad_id]  # as NeMo: pad may be a text token
        starts = [0] + [i for i, t in enumerate(ids) if t == self.text_bos_id] + [len(ids)]
        turns = [self.tokenizer.decode(ids[a:b], skip_special_tokens=True).strip()
                 for a, b in zip(starts, starts[1:])]
        return " ".join(t for t in turns if t)


class DuplexS2SSpeechDecoderModel(DuplexS2SModel):
    """DuplexS2SModel whose codec frames come from an autoregressive speech decoder
    (`speech_decoder` section): the LLM reads text + user only; the decoder reads the LLM's last
    hidden state and the previous frame's codes."""

    def _build_audio_output(self, hidden_size: int) -> None:
        self.speech_decoder = build_speech_decoder(self.cfg["speech_decoder"], hidden_size,
                                                   self.num_codebooks, self.speech_vocab_size)

    def forward(self, user_embeds: Tensor, text_ids: Tensor, audio_ids: Tensor,
                state: "DuplexState | None" = None):
        hidden = self._llm_hidden(self._fuse(user_embeds, text_ids), state)
        cache = state.decoder_cache if state is not None else None
        return {"text_logits": self.lm_head(hidden),
                "audio_logits": self.speech_decoder(hidden, audio_ids, cache)}

    def new_state(self, batch_size: int) -> "DuplexState":
        state = super().new_state(batch_size)
        state.decoder_cache = self.speech_decoder.new_cache()
        return state


@dataclass
class DuplexState:
    """What a session carries from frame to frame: the KV caches and the last frame's outputs."""
    llm_cache: DynamicCache
    text: Tensor  # (B,)
    codes: Tensor  # (B, K)
    decoder_cache: DecoderCache | None = None


# --------------------------------------------------------------------------------------------------
# audio codec: what loads (the AudioCodec wrapper is in speech_decoder.py)

def load_audio_codec(name_or_path: str) -> AudioCodec:
    """A local directory or hub name of a codec transformers loads. A local directory without
    weights (the offline default, assets/tiny-mimi) must hold a Mimi config: it is built with a
    fixed seed and seeded codebooks (a fresh Mimi's are all zero, which would make every code 0)."""
    supported = ("a transformers MimiModel (24 kHz, 12.5 frames/s: the 80 ms frame), or an "
                 "EncodecModel / DacModel whose frame rate is 1 / data.frame_length")
    if str(name_or_path).endswith(".nemo"):
        raise ValueError(f"pretrained_audio_codec {name_or_path}: NeMo codec checkpoints (.nemo) "
                         f"are not supported; use a local directory or hub name of {supported}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"cannot load pretrained_audio_codec '{name_or_path}': "
                                f"{reason}") from None
    if config.model_type not in SUPPORTED_CODECS:
        raise ValueError(f"pretrained_audio_codec {name_or_path} is a '{config.model_type}' model; "
                         f"use {supported}")
    path = Path(name_or_path)
    if path.is_dir() and not any((path / f).exists() for f in WEIGHT_FILES):
        if config.model_type != "mimi":
            raise ValueError(f"pretrained_audio_codec {path} holds no weights; only a Mimi config "
                             "can be used without them (scripts/make_tiny_codec.py)")
        with torch.random.fork_rng(), torch.device("cpu"):  # its seeding draws from a CPU generator
            torch.manual_seed(CODEC_SEED)
            model = AutoModel.from_config(config, dtype=torch.float32).eval()
            seed_mimi_codebooks(model, torch.Generator().manual_seed(CODEC_SEED))
    else:
        model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
    return AudioCodec(model)


@torch.no_grad()
def seed_mimi_codebooks(model: nn.Module, generator: torch.Generator,
                        seconds: float = 20.0) -> None:
    """Give a randomly initialised Mimi codebooks that spread over what its encoder outputs.

    A seeded probe signal (noise bursts of random loudness between silences) is encoded; each
    residual quantizer's codebook is drawn from the residuals that reach it, plus a little noise.
    Random codebooks alone sit far from the encoder's outputs and map nearly every frame to the
    same few codes.
    """
    frame = round(model.config.sampling_rate / model.config.frame_rate)
    num_frames = int(seconds * model.config.frame_rate)
    silent = torch.rand(num_frames, 1, generator=generator) < 0.3
    loudness = torch.rand(num_frames, 1, generator=generator) ** 3 * ~silent
    probe = (0.5 * loudness * torch.randn(num_frames, frame, generator=generator)).reshape(1, 1, -1)
    latents = model.encoder(probe).latents  # (1, D, T)
    q = model.quantizer
    for rvq in (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer):
        projected = rvq.input_proj(latents) if rvq.input_proj is not None else latents
        residual = projected[0].T  # (T, D_q)
        for layer in rvq.layers:
            codebook = layer.codebook
            picks = torch.randint(len(residual), (codebook.codebook_size,), generator=generator)
            noise = torch.randn(codebook.codebook_size, residual.size(1), generator=generator)
            embed = residual[picks] + 0.1 * residual.std(0) * noise
            codebook.embed_sum.copy_(embed * codebook.cluster_usage[:, None])
            codebook.initialized.fill_(1)
            codebook._embed = None
            residual = residual - embed[torch.cdist(residual, embed).argmin(-1)]


def check_data_config(data_cfg: dict, codec: AudioCodec, perception, codec_name: str) -> None:
    """The data must match the codec's frame and sample rates and the perception's sample rate."""
    frame_length = float(data_cfg["frame_length"])
    if not math.isclose(codec.frame_rate * frame_length, 1.0, rel_tol=1e-3):
        raise ValueError(
            f"pretrained_audio_codec {codec_name} runs at {codec.frame_rate:g} frames/s but "
            f"data.frame_length is {frame_length:g} s ({1 / frame_length:g} frames/s): set "
            f"data.frame_length to {1 / codec.frame_rate:g} or use a codec with that frame rate")
    if int(data_cfg["target_sample_rate"]) != codec.sample_rate:
        raise ValueError(f"pretrained_audio_codec {codec_name} works at {codec.sample_rate} Hz but "
                         f"data.target_sample_rate is {data_cfg['target_sample_rate']}: set "
                         f"data.target_sample_rate to {codec.sample_rate}")
    if int(data_cfg["source_sample_rate"]) != perception.sample_rate:
        raise ValueError(f"the perception's preprocessor works at {perception.sample_rate} Hz but "
                         f"data.source_sample_rate is {data_cfg['source_sample_rate']}: set "
                         f"data.source_sample_rate to {perception.sample_rate}")


# --------------------------------------------------------------------------------------------------
# ASR-BLEU: how well generated speech says the reference text

class Transcriber:
    """Speech -> text with a scoring ASR, in fp32: a SALM of this project (export directory, .ckpt
    file or run directory; prompted with `prompt`, by default the `context` its training data
    carried) or a transformers speech-recognition model (directory or hub name)."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu",
                 prompt: str | None = None, batch_size: int = 16):
        self.salm = self.pipeline = None
        self.prompt = scoring_asr_prompt(name_or_path) if prompt is None else prompt
        self.batch_size = batch_size
        path = Path(name_or_path)
        if path.suffix == ".nemo" or path.name.startswith("stt_"):
            raise ValueError(f"scoring_asr '{name_or_path}': NeMo ASR models (.nemo files, "
                             "names such as stt_en_fastconformer_transducer_large) are not "
                             "supported, their transducer decoding is out of scope; use a SALM "
                             "checkpoint or export of this project or a transformers "
                             "speech-recognition model (e.g. openai/whisper-small)")
        if _is_project_model(path):
            self.salm = SALM.from_pretrained(path, torch.float32).to(device)
            self.sample_rate = self.salm.sampling_rate
            return
        from transformers import pipeline

        try:
            self.pipeline = pipeline("automatic-speech-recognition", model=str(name_or_path),
                                     device=device, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ValueError(f"scoring_asr '{name_or_path}' is neither a SALM of this project "
                             "(export directory or checkpoint) nor a transformers "
                             f"speech-recognition model: {str(e).splitlines()[0]}") from None
        self.sample_rate = self.pipeline.feature_extractor.sampling_rate

    def transcribe(self, audios: list[Tensor | np.ndarray], sample_rate: int) -> list[str]:
        """Mono clips (1-D, each its own length) at `sample_rate` -> one transcript per clip."""
        clips = [resample(torch.as_tensor(a).float().cpu().numpy(), sample_rate, self.sample_rate)
                 for a in audios]
        if self.pipeline is not None:
            inputs = [{"raw": c, "sampling_rate": self.sample_rate} for c in clips]
            outputs = self.pipeline(inputs, batch_size=self.batch_size)
            return [out["text"].strip() for out in outputs]
        texts, tag = [], self.salm.audio_locator_tag
        prompt = [{"role": "user", "content": f"{self.prompt} {tag}".strip()}]
        for i in range(0, len(clips), self.batch_size):
            batch = clips[i : i + self.batch_size]
            texts += answer(self.salm, [prompt] * len(batch), batch, 128)[0]
        return texts


def asr_bleu(references: list[str], audios: list[Tensor | np.ndarray], sample_rate: int,
             scoring_asr: "str | Path | Transcriber",
             device: str | torch.device = "cpu") -> tuple[float, list[str]]:
    """Corpus BLEU of the scoring ASR's transcripts of `audios` (generated speech, 1-D clips at
    `sample_rate`) against `references`; also the transcripts. `scoring_asr`: a Transcriber, or
    what Transcriber accepts."""
    if len(references) != len(audios):
        raise ValueError(f"asr_bleu: {len(references)} references but {len(audios)} audios")
    transcriber = (scoring_asr if isinstance(scoring_asr, Transcriber)
                   else Transcriber(scoring_asr, device))
    transcripts = transcriber.transcribe(audios, sample_rate)
    return bleu(references, transcripts), transcripts


def scoring_asr_prompt(name_or_path: str | Path) -> str:
    """What a SALM checkpoint as scoring ASR is asked: the `context` its training data carried (''
    for none, the audio alone). Export directories and transformers models get SALM's default ASR
    prompt."""
    export = (Path(name_or_path) / CONFIG_NAME).is_file()
    checkpoint = None if export else find_checkpoint(name_or_path)
    if checkpoint is None:
        return DEFAULT_ASR_PROMPT
    config = read_checkpoint(checkpoint)["config"]
    return _find_value(config.get("data", {}).get("train_ds", {}), "context") or ""


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """1-D samples at `rate` -> float32 at `new_rate` (polyphase filtering: generated speech of any
    rate)."""
    from scipy.signal import resample_poly  # half a second to import, and only ASR-BLEU needs it

    if rate == new_rate:
        return samples.astype(np.float32)
    g = math.gcd(rate, new_rate)
    return resample_poly(samples, new_rate // g, rate // g).astype(np.float32)


def _is_project_model(path: Path) -> bool:
    """An export directory or train.py checkpoint of this project (a transformers model has no
    pretrained_llm)."""
    if (path / CONFIG_NAME).is_file():
        return "pretrained_llm" in json.loads((path / CONFIG_NAME).read_text())
    return find_checkpoint(path) is not None


def _find_value(node, key: str):
    """The first value of `key` anywhere in a nested dict/list (e.g. SALM data's `context`)."""
    if isinstance(node, dict):
        if isinstance(node.get(key), str):
            return node[key]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = _find_value(item, key)
            if found:
                return found
    return None
