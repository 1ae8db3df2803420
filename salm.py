"""SALM: a speech-augmented language model, NeMo speechlm2's SALM in plain PyTorch.

A Hugging Face causal LLM reads a chat prompt in which each audio locator tag (one special token
per clip) is replaced by all encoder frames of that clip (perception: mel -> FastConformer ->
adapter -> projection). The loss is the cross-entropy summed over supervised tokens (every
assistant turn with its closing EOS) divided by their count.

    model = SALM(cfg["model"])
    model.training_step(batch)["loss"].backward()     # batch from data.py
    model.eval()
    turn = {"role": "user", "content": f"Transcribe: {model.audio_locator_tag}", "audio": "a.wav"}
    answer_ids = model.generate([[turn]], max_new_tokens=64)  # (B, new tokens)
    print(model.tokenizer.batch_decode(answer_ids, skip_special_tokens=True))
    model.save_pretrained("exports/salm")             # config.json + model.safetensors + llm/
    model = SALM.from_pretrained("exports/salm")      # offline, weights loaded strictly

The parameter names `freeze_params` / `prevent_freeze_params` regexes see (`re.match`) are NeMo's
(checkpoint.nemo_named_parameters), so NeMo's patterns act on the same tensors as in NeMo:
    embed_tokens.weight                  the token embedding (outside the LLM in NeMo; here its
                                         tensor is llm.model.embed_tokens.weight). Tied to the
                                         output head, it is listed once, as llm.lm_head.weight:
                                         `^llm\\.` covers it, `^embed_tokens\\.` matches nothing.
    llm.model.layers.0.self_attn.q_proj.weight, llm.model.norm.weight, llm.lm_head.weight
    llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight   (`lora:`, peft's)
    perception.preprocessor.*, perception.encoder.*, perception.modality_adapter.*,
    perception.proj.*
State dicts and exports keep our names; checkpoint.py maps NeMo's checkpoints onto them.

Where this differs from NeMo, on purpose:
* Position ids come from the attention mask, in training and in generation alike. NeMo's training
  forward passes none, so a left-padded row starts at position n_pad there while HF `generate()`
  starts it at 0; RoPE cancels the offset, absolute position embeddings do not.
* Padding is the leading run of pad ids of a left-padded row, not every token equal to the pad id,
  so an LLM whose pad token doubles as EOS (or as a text token) still sees, and learns, that token
  inside a sequence.
* `generate()` returns only the new tokens for every kind of prompt (NeMo returns prompt + answer
  for text-only).
"""

import copy
import math
import re
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from checkpoint import PretrainedMixin, nemo_named_parameters
from config import model_defaults
from data import SALMDataset, left_pad, load_audio_files, loader_values, right_pad
from metrics import word_errors
from perception import setup_perception
from prompts import make_prompt_formatter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a tokenizer
HUB_NAME = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")  # what pretrained_llm may also be: a hub name
IGNORE_INDEX = -100  # cross_entropy's ignore_index: positions that are not supervised
DEFAULT_ASR_PROMPT = "Repeat after me, typing in lowercase."  # NeMo salm_eval's, configs/salm.yaml


class SpeechLLM(PretrainedMixin, nn.Module):
    """What SALM and the duplex models share: the config with its defaults (`self.cfg`), a
    tokenizer, a Hugging Face LLM (`self.llm`, LoRA-wrapped with a `lora` section) and the audio
    perception in the LLM's space."""

    pad_fallback_id: int | None = None  # no pad and no unk token: pad with EOS (load_tokenizer)
    lora_on_decoder_stack = False  # LoRA wraps the whole causal LM (see load_llm)

    def __init__(self, cfg: dict, audio_locator_tag: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg = model_defaults(cfg)
        tokenizer_path = cfg["tokenizer_path"] or cfg["pretrained_llm"]  # NeMo's key, as in NeMo
        self.tokenizer = load_tokenizer(tokenizer_path, audio_locator_tag, self.pad_fallback_id)
        self.llm = load_llm(cfg["pretrained_llm"], cfg["pretrained_weights"], cfg["lora"],
                            self.lora_on_decoder_stack)
        self.perception, cfg["perception"] = setup_perception(
            cfg, output_dim=self.embed_tokens.embedding_dim)

    def freeze(self, named_parameters: list | None = None) -> None:
        """Apply `freeze_params` / `prevent_freeze_params` (call once every module exists) to the
        parameters under the names `named_parameters` gives (default: ours)."""
        cfg = self.cfg
        apply_freezing(self, cfg["freeze_params"], cfg["prevent_freeze_params"], named_parameters)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    @property
    def text_pad_id(self) -> int:
        return self.tokenizer.pad_token_id  # load_tokenizer falls back to unk, then eos

    @property
    def text_bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def text_eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def context_limit(self, *limits: int | None) -> int | None:
        """The smallest of the LLM's context (max_position_embeddings) and `limits`, or None."""
        limits = (getattr(self.llm.config, "max_position_embeddings", None), *limits)
        return min((n for n in limits if n), default=None)


class SALM(SpeechLLM):
    """LLM + audio perception. `cfg` is the `model` section of the config as a plain dict."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg, cfg["audio_locator_tag"])
        self.audio_locator_tag = cfg["audio_locator_tag"]
        self.formatter = make_prompt_formatter(self.cfg["prompt_format"], self.tokenizer)
        self.freeze(nemo_named_parameters(self))  # the patterns mean what they mean in NeMo

    @property
    def text_vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    @property
    def audio_locator_tag_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_locator_tag)

    @property
    def token_equivalent_duration(self) -> float:
        return self.perception.token_equivalent_duration

    @property
    def sampling_rate(self) -> int:
        return self.perception.sample_rate

    def encode_dialog(self, turns: list[dict]) -> dict[str, Tensor]:
        """Turns -> {"input_ids": (L,), "mask": (L,) True on assistant tokens}, prompt-formatted."""
        return self.formatter.encode_dialog(turns)

    def prepare_inputs(self, batch: dict) -> dict[str, Tensor]:
        """Training batch -> LLM inputs and next-token targets, already shifted by one. Rows are
        right-padded: a plain causal mask does (no row of it is empty), positions count from 0."""
        batch = self.with_layout(batch)
        ids, index, frames = batch["input_ids"], batch["splice"], batch["splice_frames"]
        input_embeds, audio_embeds = self._embed(ids, batch["audios"], batch["audio_lens"], index,
                                                 frames)
        targets = ids.masked_fill(~batch["loss_mask"].bool(), IGNORE_INDEX)
        clip_targets = targets.new_full((len(audio_embeds), frames), IGNORE_INDEX)
        target_ids = splice(targets, clip_targets, index, IGNORE_INDEX)
        padding = ids.numel() + len(audio_embeds) * frames  # the index of the padding entry
        return {
            "input_embeds": input_embeds[:, :-1],  # (B, T, H)
            "attention_mask": causal_mask(input_embeds.size(1) - 1, index.device),
            "target_ids": target_ids[:, 1:],  # (B, T)
            "audio_embeds": audio_embeds,  # (N, T_enc, H)
            "num_tokens": (index[:, 1:] != padding).sum(),  # LLM input positions incl. audio frames
        }

    def with_layout(self, batch: dict) -> dict:
        """The batch with its layout keys: SALMDataset's, or made here on the host for a batch built
        by hand."""
        if "splice" in batch:
            return batch
        ids, masks = batch["input_ids"].cpu(), batch["loss_mask"].cpu()
        starts = [_num_leading(row, self.text_pad_id) for row in ids]
        rows, masks = [r[n:] for r, n in zip(ids, starts)], [m[n:] for m, n in zip(masks, starts)]
        return {**batch, **self.layout(rows, masks, batch["audio_lens"].cpu())}

    def layout(self, rows: list[Tensor], masks: list[Tensor], audio_lens: Tensor) -> dict:
        """The layout keys of a batch (splice_layout) from its unpadded token rows, loss masks
        and audio lengths in samples; SALMDataset calls it on the host."""
        return splice_layout(rows, masks, self.perception.output_lengths(audio_lens).tolist(),
                             self.audio_locator_tag_id, self.text_eos_id)

    def forward(self, input_embeds: Tensor, attention_mask: Tensor | None = None,
                cache=None) -> dict:
        """input_embeds (B, T, H) -> {"logits": (B, T, V)} (+ "cache" when a KV cache is given)."""
        position_ids = None
        if attention_mask is not None and attention_mask.dim() == 2:  # with a cache: past + current
            position_ids = position_ids_from_mask(attention_mask)[:, -input_embeds.shape[1] :]
        out = self.llm(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        if cache is None:
            return {"logits": out.logits}
        return {"logits": out.logits, "cache": out.cache}

    def training_step(self, batch: dict) -> dict:
        """loss = loss_sum / count; train.py sums both over micro-batches and ranks (exact mean)."""
        frozen_modules_to_eval([self.llm, *self.perception.children()])
        batch = self.with_layout(batch)
        inputs = self.prepare_inputs(batch)
        logits = self(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]
        loss_sum, count = _masked_cross_entropy_sum(logits, inputs["target_ids"])
        out = {"loss_sum": loss_sum, "count": count,  # supervised tokens
               "num_tokens": inputs["num_tokens"]}
        ctc_weight = self.cfg["ctc_loss_weight"]
        if ctc_weight:
            ctc_sum, num_targets = self._ctc_loss_sum(inputs["audio_embeds"], batch)
            out["loss_sum"] = loss_sum + ctc_weight * ctc_sum  # a sum: micro-batches, ranks add up
            out["log"] = {"ctc_loss": ctc_sum.detach() / max(num_targets, 1)}
        out["loss"] = out["loss_sum"] / count.clamp(min=1)
        return out

    def _ctc_loss_sum(self, audio_embeds: Tensor, batch: dict) -> tuple[Tensor, int]:
        """CTC of the LLM's own output head over each clip's embeddings against its transcript
        (blank = pad id).

        Not in NeMo: with `ctc_loss_weight` > 0 it trains a from-scratch encoder to put token-like
        embeddings in the LLM's space. Without it a random-init SALM learns the text of its data and
        never starts to listen (the encoder output collapses to one vector). Only conversations with
        exactly one clip take part: the supervised tokens (EOS dropped) are that clip's transcript.
        """
        if not batch["ctc_lens"]:  # host lists (splice_layout): no sync
            return torch.zeros((), device=self.device), 0
        clips = audio_embeds[batch["ctc_clips"], : max(batch["ctc_frames"])]  # (n, T, H)
        log_probs = self.llm.get_output_embeddings()(clips).float().log_softmax(-1)  # (n, T, V)
        ctc_sum = F.ctc_loss(log_probs.transpose(0, 1), batch["ctc_targets"], batch["ctc_frames"],
                             batch["ctc_lens"], blank=self.text_pad_id, reduction="sum",
                             zero_infinity=True)
        return ctc_sum, sum(batch["ctc_lens"])

    def make_dataset(self, data_cfg: dict) -> SALMDataset:
        """The dataset that turns sampled conversations into this model's batches (see data.py).
        Conversations shorter than `min_tokens`, or longer than `max_tokens` or the LLM's context
        (max_position_embeddings), are skipped and counted. NeMo's data keys for what the model
        defines (token_equivalent_duration, audio_locator_tag, prompt_format) must agree with it."""
        for section in ("train_ds", "validation_ds"):  # NeMo's data keys for what the model defines
            for key, ours in (("token_equivalent_duration", self.token_equivalent_duration),
                              ("audio_locator_tag", self.audio_locator_tag),
                              ("prompt_format", self.cfg["prompt_format"])):
                for value in loader_values(data_cfg.get(section) or {}, key):
                    if value == ours or isinstance(value, float) and math.isclose(value, ours):
                        continue
                    raise ValueError(f"data.{section}: {key} {value!r} is not the model's "
                                     f"{ours!r}; remove it (the model's value is used)")
        return SALMDataset(self.encode_dialog, self.text_pad_id, self.sampling_rate,
                           self.audio_locator_tag,
                           token_equivalent_duration=self.token_equivalent_duration,
                           max_tokens=self.context_limit(data_cfg["train_ds"].get("max_tokens")),
                           min_tokens=data_cfg["train_ds"].get("min_tokens"), layout=self.layout)

    @torch.no_grad()
    def validation_step(self, batch: dict, generate: bool = False) -> dict:
        """Loss and teacher-forced token accuracy, summed and as this batch's token means, to be
        summed over batches and ranks (see `validation_summary`).

        With generate=True the last assistant turn of each conversation is also answered greedily
        from the conversation before it: "pairs" (reference, hypothesis) and word error counts.
        """
        inputs = self.prepare_inputs(batch)
        logits = self(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]
        loss_sum, count = _masked_cross_entropy_sum(logits, inputs["target_ids"])
        supervised = inputs["target_ids"] != IGNORE_INDEX
        correct = (logits.argmax(-1) == inputs["target_ids"])[supervised].sum()
        n = max(int(count), 1)
        out = {"loss_sum": float(loss_sum), "correct": int(correct), "count": int(count),
               "batches": int(count > 0), "batch_loss": float(loss_sum) / n,
               "batch_acc": int(correct) / n}
        if generate:
            out.update(self._answer_last_turns(batch))
        return out

    @staticmethod
    def validation_summary(totals: dict) -> dict:
        """Summed `validation_step` outputs of a validation set -> loss, acc (and wer if generated).

        loss and acc are NeMo's: the mean over batches of each batch's token mean (so curves compare
        with NeMo's val_loss / val_acc), not the token-weighted mean over the set.
        """
        batches = max(totals["batches"], 1)
        summary = {"loss": totals["batch_loss"] / batches, "acc": totals["batch_acc"] / batches}
        if "ref_words" in totals:
            summary["wer"] = totals["word_errors"] / max(totals["ref_words"], 1)
        return summary

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[dict]] | Tensor,
        audios: Tensor | None = None,
        audio_lens: Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generation_kwargs,
    ) -> Tensor:
        """Answer a batch of prompts; returns the new tokens only, (B, T_new), padded after EOS.

        prompts: conversations as lists of turns ({"role", "content"} or NeMo's {"role", "slots":
            {"message"}}), whose audio comes either from an "audio" key on a turn (a path or list of
            paths, loaded and resampled to the model rate) or from `audios` (B_audio, T) zero-padded
            float32 + `audio_lens` (B_audio,); or token ids (B, L) already in the prompt format,
            padded with `text_pad_id`.
        Audios match the audio locator tags in reading order (prompt by prompt, left to right).
        Greedy by default; any Hugging Face generation argument (max_new_tokens, do_sample,
        num_beams, ...) passes through. Call `model.eval()` first, as for any inference.
        """
        if isinstance(prompts, Tensor):
            rows = [_strip_padding(row, self.text_pad_id) for row in prompts]
        else:
            paths = [path for prompt in prompts for turn in prompt for path in _audio_paths(turn)]
            if paths and audios is not None:
                raise ValueError("give the audio either as 'audio' paths in the prompts or as "
                                 "audios=, not both")
            if paths:
                audios, audio_lens = load_audio_files(paths, self.sampling_rate)
            rows = [self.encode_dialog(prompt)["input_ids"] for prompt in prompts]
        input_ids = left_pad(rows, self.text_pad_id).to(self.device)  # (B, L)

        num_tags = int((input_ids == self.audio_locator_tag_id).sum())
        num_audios = 0 if audios is None else len(audios)
        if num_tags != num_audios:
            raise ValueError(f"the prompts hold {num_tags} audio locator tags but {num_audios} "
                             "audios were given")
        clip_frames = []
        if audios is not None:
            audios = audios.to(self.device)
            audio_lens = torch.as_tensor(audio_lens, device=self.device)
            clip_frames = self.perception.output_lengths(audio_lens).tolist()
        index, frames = splice_index(rows, clip_frames, self.audio_locator_tag_id, left=True)
        index = index.to(self.device)
        input_embeds, _ = self._embed(input_ids, audios, audio_lens, index, frames)
        attention_mask = index != input_ids.numel() + len(clip_frames) * frames  # not padding

        if generation_config is None:
            generation_config = GenerationConfig(bos_token_id=self.text_bos_id,
                                                 eos_token_id=self.text_eos_id)
        generation_config = copy.deepcopy(generation_config)
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = self.text_pad_id
        other_kwargs = generation_config.update(**generation_kwargs)  # settings go into the config
        return self.llm.generate(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            generation_config=generation_config,
            **other_kwargs,
        )

    def _answer_last_turns(self, batch: dict) -> dict:
        """Greedy answers to each conversation up to its last assistant turn, scored against it."""
        prompts, references = [], []
        for ids, mask in zip(batch["input_ids"], batch["loss_mask"].tolist()):
            start = len(mask) - 1 - mask[::-1].index(True)  # last supervised, back to turn start
            while start > 0 and mask[start - 1]:
                start -= 1
            prompts.append(ids[:start])
            references.append(self.tokenizer.decode(ids[start:], skip_special_tokens=True).strip())
        max_new_tokens = 2 * int(batch["loss_mask"].sum(1).max()) + 8
        answer_ids = self.generate(left_pad(prompts, self.text_pad_id), batch["audios"],
                                   batch["audio_lens"], max_new_tokens=max_new_tokens)
        texts = self.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
        hypotheses = [h.strip() for h in texts]
        counts = word_errors(references, hypotheses)
        return {"pairs": list(zip(references, hypotheses)), "ref_words": counts["ref_words"],
                "word_errors": counts["substitutions"] + counts["deletions"] + counts["insertions"]}

    def _embed(self, input_ids: Tensor, audios: Tensor | None, audio_lens: Tensor | None,
               index: Tensor, frames: int) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) + audios (N, samples) -> the LLM's input (B, T, H) laid out by `index`
        and `frames` (splice_index), and the clips' embeddings (N, T_enc, H)."""
        tag_id = self.audio_locator_tag_id
        # The embedding is not resized for the tag (as in NeMo): its id is never looked up, its slot
        # is replaced.
        text_embeds = self.embed_tokens(input_ids.masked_fill(input_ids == tag_id, 0))  # (B, L, H)
        if audios is not None and len(audios) > 0:
            audio_embeds = self.perception(audios, audio_lens)[0]  # (N, T_enc, H)
        else:
            audio_embeds = text_embeds.new_zeros(0, frames, text_embeds.size(-1))
            if torch.is_grad_enabled():  # a zero gradient for every perception weight: under DDP,
                # ranks with and without audio in their batch then reduce the same parameters
                weights = [p for p in self.perception.parameters() if p.requires_grad]
                text_embeds = text_embeds + 0 * sum(p.sum() for p in weights)
        return splice(text_embeds, audio_embeds[:, :frames], index), audio_embeds


@torch.no_grad()
def answer(model: SALM, prompts: list[list[dict]], audios: list[np.ndarray], max_new_tokens: int):
    """Greedy answers of a SALM to prompts whose audio tags take `audios` in order, and the number
    of tokens generated (each answer up to and including its EOS)."""
    padded, audio_lens = (right_pad([torch.from_numpy(a) for a in audios], 0.0) if audios
                          else (None, None))
    config = GenerationConfig(max_new_tokens=max_new_tokens, bos_token_id=model.text_bos_id,
                              eos_token_id=model.text_eos_id, pad_token_id=model.text_pad_id,
                              do_sample=False)
    ids = model.generate(prompts, audios=padded, audio_lens=audio_lens,
                         generation_config=config).cpu()
    is_eos = ids == model.text_eos_id  # ids: (B, T_new)
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    texts = [model.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
             for row, n in zip(ids, lengths)]
    return texts, int(lengths.sum())


def splice_index(rows: list[Tensor], clip_frames: list[int], tag_id: int, left: bool = False):
    """Where each position of SALM's LLM input comes from: a (B, T) index into the table [the
    token ids of the left-padded (B, L) `rows`, row by row | the clips' frames (N, F), clip by
    clip | one padding entry], and F. Each audio tag gives way to its clip's frames (clips in
    reading order); rows are padded with the padding entry on the right (training: a plain causal
    mask does) or the left (generation)."""
    num_tags = sum(int((r == tag_id).sum()) for r in rows)
    if num_tags != len(clip_frames):
        raise ValueError(f"{num_tags} audio locator tags but {len(clip_frames)} audios")
    B, L, F = len(rows), max(len(r) for r in rows), max(clip_frames, default=0)
    clips, out = iter(range(len(clip_frames))), []
    for b, ids in enumerate(rows):
        index = torch.arange((b + 1) * L - len(ids), (b + 1) * L)  # where its tokens are in (B, L)
        pieces, prev = [], 0
        for pos in (ids == tag_id).nonzero().flatten().tolist():
            clip = next(clips)
            pieces += [index[prev:pos], torch.arange(clip_frames[clip]) + B * L + clip * F]
            prev = pos + 1
        out.append(torch.cat(pieces + [index[prev:]]))
    padding = B * L + len(clip_frames) * F
    return pad_sequence(out, True, padding, "left" if left else "right"), F


def splice_layout(rows: list[Tensor], masks: list[Tensor], clip_frames: list[int],
                  tag_id: int, eos_id: int) -> dict:
    """SALM's training layout of a batch, made on the host so that the training step needs no host
    sync: `splice_index` (right-padded), and the CTC targets (supervised tokens but EOS) of each
    conversation with exactly one clip, with that clip's index; lengths are plain lists (they stay
    on the host)."""
    index, frames = splice_index(rows, clip_frames, tag_id)
    clips, targets, first_clip = [], [], 0
    for ids, mask in zip(rows, masks):
        num_clips = int((ids == tag_id).sum())
        if num_clips == 1:
            clips.append(first_clip)
            targets.append(ids[mask.bool() & (ids != eos_id)])
        first_clip += num_clips
    return {"splice": index, "splice_frames": frames,
            "ctc_clips": torch.tensor(clips, dtype=torch.long),
            "ctc_targets": torch.cat(targets + [torch.zeros(0, dtype=torch.long)]),
            "ctc_lens": [len(t) for t in targets], "ctc_frames": [clip_frames[c] for c in clips]}


def splice(text: Tensor, clips: Tensor, index: Tensor, fill=0) -> Tensor:
    """text (B, L, ...) and clips (N, F, ...) -> (B, T, ...): position t of row b is entry
    index[b, t] of the table [text, row by row | clips, clip by clip | `fill`] (see
    splice_index). A gather: no host sync."""
    padding = text.new_full((1, *text.shape[2:]), fill)
    table = torch.cat([text.flatten(0, 1), clips.flatten(0, 1).to(text.dtype), padding])
    return table.index_select(0, index.flatten()).view(*index.shape, *text.shape[2:])


def causal_mask(length: int, device) -> Tensor:
    """(1, 1, T, T) boolean causal mask for right-padded rows. Prebuilt, so that Hugging Face models
    use it as it is: building one themselves, they read the mask or the position ids on the host (a
    GPU sync every step). An LLM with sliding-window layers then attends its whole context."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions count attended tokens only, so a padded row gets the positions it would have
    unpadded (the formula HF `generate()` uses; padding positions get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask.bool(), 0)


def frozen_modules_to_eval(modules: list[nn.Module]) -> None:
    """A module without trainable parameters runs in eval mode: no dropout, no BatchNorm updates,
    and no dither in the parameter-free mel preprocessor (as NeMo does for preprocessor, encoder
    and LLM every step)."""
    for module in modules:
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def load_tokenizer(pretrained_llm: str, audio_locator_tag: str | None,
                   pad_fallback_id: int | None = None):
    """HF tokenizer with the audio locator tag as a special token. A missing pad token falls back to
    unk, then to eos, or with `pad_fallback_id` to that id (NeMo's duplex models: 0, and a warning).
    """
    _check_llm_dir(pretrained_llm, "tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained_llm)
    except (OSError, ValueError) as e:  # ValueError: a directory without usable tokenizer files
        raise _not_found(pretrained_llm, e) from None
    if audio_locator_tag is not None:
        tokenizer.add_special_tokens({"extra_special_tokens": [audio_locator_tag]},
                                     replace_extra_special_tokens=False)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None and pad_fallback_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_fallback_id)
        warnings.warn(f"the tokenizer of {pretrained_llm} has no pad or unk token: padding with id "
                      f"{pad_fallback_id} ({tokenizer.pad_token!r}), as NeMo does")
    return tokenizer


def load_llm(pretrained_llm: str, pretrained_weights: bool, lora_cfg: dict | None = None,
             lora_on_decoder_stack: bool = False) -> nn.Module:
    """A local directory or hub name, in fp32; pretrained_weights=False builds the same
    architecture, random init. With `lora_cfg` (the config's `lora` section) it is wrapped with peft
    LoRA adapters (`LoraConfig(**lora_cfg)`), which freeze its base weights. With
    `lora_on_decoder_stack` (the duplex models, as NeMo's) only the decoder stack is wrapped,
    without a task type: the embedding and output head stay trainable.
    """
    _check_llm_dir(pretrained_llm, "config.json")
    try:
        if pretrained_weights:
            llm = AutoModelForCausalLM.from_pretrained(pretrained_llm, dtype=torch.float32)
        else:
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained_llm),
                                                   dtype=torch.float32)
    except OSError as e:
        raise _not_found(pretrained_llm, e) from None
    if lora_cfg is None:
        return llm
    from peft import LoraConfig, get_peft_model

    if lora_on_decoder_stack:
        lora_cfg = {k: v for k, v in lora_cfg.items() if k != "task_type"}
    try:
        config = LoraConfig(**lora_cfg)
    except TypeError as e:
        raise ValueError(f"model.lora: {e}") from None
    if not lora_on_decoder_stack:
        return get_peft_model(llm, config)
    setattr(llm, llm.base_model_prefix, get_peft_model(llm.get_decoder(), config))
    for layer in (llm.get_input_embeddings(), llm.get_output_embeddings()):
        layer.weight.requires_grad = True
    return llm


def apply_freezing(model: nn.Module, freeze_params: list[str], prevent_freeze_params: list[str],
                   named_parameters: list | None = None) -> None:
    """Freeze parameters whose name `re.match`es a freeze pattern unless a prevent pattern (or
    `.lora_`) matches too, as NeMo's freeze_and_subset does: nothing is unfrozen, so peft's frozen
    base weights stay frozen. `named_parameters`: the (name, parameter) list the patterns see
    (default: the model's own). Prints the counts; warns for a pattern that matched nothing.
    """
    def compile_all(key, patterns):
        try:
            return [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"{key}: invalid regex: {e}") from None

    freeze = compile_all("freeze_params", freeze_params)
    prevent = compile_all("prevent_freeze_params", prevent_freeze_params)
    lora = re.compile(r"^.+\.lora_.+$")
    used = set()
    for name, param in model.named_parameters() if named_parameters is None else named_parameters:
        freeze_hits = [p for p in freeze if p.match(name)]
        prevent_hits = [p for p in prevent if p.match(name)]
        used.update(freeze_hits + prevent_hits)
        if freeze_hits and not prevent_hits and not lora.match(name):
            param.requires_grad = False
    # a pattern naming only buffers (NeMo's `^perception\.preprocessor\.` hits the mel filterbank)
    # is no typo
    used.update(p for name, _ in model.named_buffers() for p in freeze + prevent if p.match(name))
    for pattern in freeze + prevent:
        if pattern not in used:
            warnings.warn(f"freeze pattern {pattern.pattern!r} matches no parameter or buffer")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"Parameters | trainable={trainable:,} ({100 * trainable / max(total, 1):.2f}%) | "
          f"total={total:,}")


def _masked_cross_entropy_sum(logits: Tensor, target_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of CE over supervised positions (in fp32 whatever the LLM dtype) and their count."""
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), target_ids.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (target_ids != IGNORE_INDEX).sum()


def _audio_paths(turn: dict) -> list:
    audio = turn.get("audio", [])
    return [audio] if isinstance(audio, (str, Path)) else list(audio)


def _num_leading(row: Tensor, value: int) -> int:
    """Length of the run of `value` that starts a 1-D tensor."""
    others = (row != value).nonzero()
    return int(others[0]) if len(others) else len(row)


def _strip_padding(row: Tensor, pad_id: int) -> Tensor:
    kept = (row != pad_id).nonzero().flatten()
    return row[int(kept[0]) : int(kept[-1]) + 1] if len(kept) else row[:0]


def _check_llm_dir(name: str, needs: str) -> None:
    """A local pretrained_llm (or tokenizer_path) directory has what loading it `needs`
    ("config.json" or "tokenizer files"): if not, say everything it lacks."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return
    lacks = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        lacks.append(f"tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    if any(item.startswith(needs) for item in lacks):
        raise FileNotFoundError(f"cannot load pretrained_llm '{name}': the directory has no "
                                f"{' and no '.join(lacks)}")


def _not_found(name: str, error: Exception) -> FileNotFoundError:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    if not Path(name).expanduser().is_dir():
        if not HUB_NAME.fullmatch(name):
            reason = "no such directory"
        elif huggingface_hub.constants.HF_HUB_OFFLINE:
            reason = ("no such directory, and as a hub name it is not in the local Hugging Face "
                      "cache (offline, HF_HUB_OFFLINE=1: hub names need the cache)")
        else:
            reason = f"no such directory, and as a hub name: {reason}"
    return FileNotFoundError(
        f"cannot load pretrained_llm '{name}': {reason}. Pass a local directory with the model's "
        "files, or set pretrained_weights: false to need only its config.json and tokenizer (e.g. "
        "already in the HF cache).")
