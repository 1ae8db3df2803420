"""Data: the items manifests.py reads become SALM and duplex batches, drawn by rank-aware,
resumable lhotse samplers; audio is loaded here, in the batch.

Duplex data (DuplexS2SModel, DuplexS2SSpeechDecoderModel) is one cut per conversation: the cut's
recording is the user channel, the custom field `target_audio` (a Recording as long as the cut) the
agent channel, and supervisions whose `speaker` is in input_roles or output_roles give the turns
(start, duration, text); from Shar (fields recording + target_audio), cut manifests, or
`duplex_demo`.

Sampling runs in the main process (workers only load audio), so a run can be resumed exactly: the
stream is a deterministic function of `seed`, the epoch and the rank, and `TrainBatches(skip=N)`
replays the first N batches' sampling without loading their audio. For the same reason every rank
sees the same shard order and takes every world_size-th batch of it; `shard_seed`
"trng"/"randomized" therefore derive the shard order from `seed`.
"""
import math
import re
from itertools import count
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Recording
from lhotse.cut import Cut, MixedCut
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler
from lhotse.utils import compute_num_frames
from torch.nn.utils.rnn import pad_sequence

from config import loader_defaults, read_input_cfg
from manifests import (DATA_KEYS, NOT_AUGMENTED, UNREADABLE, AudioError, Conversation, Skipped,
                       audio_file_cut, cut_to_conversation, read_inputs)

MAX_EMPTY_BATCHES = 100  # training batches in a row with nothing usable: the data is broken
TIMESTAMP_TOKEN = re.compile(r"<\|\d+\|>")  # "<|12|>" frame timestamps some duplex corpora have


def load_audio(cut: Cut, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of a cut at `sample_rate`, or AudioError with a one-line reason."""
    return _load_mono(cut, sample_rate, f"audio of {cut.id} ({_audio_source(cut)})")


def load_audio_files(paths: list[str | Path],
                     sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio files -> (audios (B, T) float32 zero-padded, audio_lens (B,)), mono, at sample_rate."""
    clips = [load_audio(audio_file_cut(path), sample_rate) for path in paths]
    return right_pad([torch.from_numpy(clip) for clip in clips], 0.0)


class SALMDataset(torch.utils.data.Dataset):
    """Turns a sampled mini-batch (a CutSet of conversations or ASR cuts) into SALM's tensors.

    `encode_dialog(turns) -> {"input_ids", "mask"}` is the model's prompt formatter. Conversations
    whose audio cannot be read, whose answer is empty or whose length is outside
    `min_tokens`..`max_tokens` (tokens, each audio tag counted as its clip's frames, as NeMo counts)
    are skipped and listed in batch["skipped"] as (reason, id, warning or None); a batch with
    nothing left is {"skipped", "empty": True}.
    """

    def __init__(self, encode_dialog, pad_id: int, sample_rate: int, audio_locator_tag: str,
                 token_equivalent_duration: float = 0.08, max_tokens: int | None = None,
                 min_tokens: int | None = None, layout=None):
        self.encode_dialog = encode_dialog
        self.pad_id = pad_id
        self.sample_rate = sample_rate
        self.audio_locator_tag = audio_locator_tag
        self.token_equivalent_duration = token_equivalent_duration
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.layout = layout  # (token rows, loss masks, audio lengths) -> layout keys (SALM.layout)

    def __getitem__(self, items: CutSet) -> dict:
        audios, conversations, token_ids, masks, skipped = [], [], [], [], []
        for item in items:
            conversation = item if isinstance(item, Conversation) else cut_to_conversation(item)
            turns = conversation.prompt_turns(self.audio_locator_tag)
            if turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
                skipped.append(("empty transcript", conversation.id, None))
                continue
            try:
                clip_audios = [load_audio(cut, self.sample_rate) for cut in conversation.audio_cuts]
            except AudioError as e:
                skipped.append((UNREADABLE, conversation.id, str(e)))
                continue
            encoded = self.encode_dialog(turns)
            seconds_per_frame = self.token_equivalent_duration
            frames = [math.ceil(len(a) / self.sample_rate / seconds_per_frame) for a in clip_audios]
            length = len(encoded["input_ids"]) + sum(frames) - len(frames)  # frames replace tags
            if self.max_tokens and length > self.max_tokens:
                skipped.append(("longer than max_tokens", conversation.id, None))
                continue
            if self.min_tokens and length < self.min_tokens:
                skipped.append(("shorter than min_tokens", conversation.id, None))
                continue
            audios.extend(clip_audios)
            conversations.append(conversation)
            token_ids.append(encoded["input_ids"])
            masks.append(encoded["mask"])
        if not conversations:
            return {"skipped": skipped, "empty": True}
        audio, audio_lens = right_pad([torch.from_numpy(a) for a in audios], 0.0)  # (B_audio, T)
        return {
            "audios": audio,
            "audio_lens": audio_lens,
            "input_ids": left_pad(token_ids, self.pad_id),                   # (B, L)
            "loss_mask": left_pad([m.long() for m in masks], 0).bool(),      # (B, L)
            "ids": [c.id for c in conversations],
            "audio_seconds": float(audio_lens.sum()) / self.sample_rate,
            "skipped": skipped,
            **(self.layout(token_ids, masks, audio_lens) if self.layout else {}),
        }


class TrainBatches:
    """An endless, resumable stream of training batches for one rank.

    Epochs of a rank-aware lhotse sampler over `read_inputs(ds_cfg)`; `skip` replays that many
    batches of sampling (no audio is loaded) so a resumed run continues with the batch it would have
    seen next. `skipped` (a Skipped) records what was dropped (duration filter, unreadable audio,
    ...), continuing from the record a resumed run saved (`Skipped.state()`); `num_batches` counts
    what was drawn. A batch left empty is skipped and the next one drawn; MAX_EMPTY_BATCHES of them
    in a row are an error.
    """

    def __init__(self, ds_cfg: dict, dataset, rank: int = 0, world_size: int = 1, skip: int = 0,
                 skipped: dict | None = None):
        self.ds_cfg, self.dataset = loader_defaults(ds_cfg), dataset
        self.rank, self.world_size = rank, world_size
        self.skipped = Skipped(skipped)
        self.num_batches = skip
        self._skip = skip

    def __iter__(self):
        cuts = read_inputs(self.ds_cfg, True, self.skipped)
        cuts = _duration_filter(cuts, self.ds_cfg, self.skipped)
        sampler = make_sampler(cuts, self.ds_cfg, True, rank=self.rank, world_size=self.world_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, sampler=_Epochs(sampler, self._skip), batch_size=None,
            collate_fn=_as_built,
            num_workers=self.ds_cfg["num_workers"], pin_memory=_pin_memory(self.ds_cfg),
            persistent_workers=self.ds_cfg["num_workers"] > 0,
            generator=torch.Generator().manual_seed(0),  # worker seeds: not the global RNG (resume)
        )
        empty_in_a_row = 0
        for batch in loader:
            self.num_batches += 1
            self.skipped.merge(batch.pop("skipped"))
            if not batch.get("empty"):
                empty_in_a_row = 0
                yield batch
                continue
            self.skipped.add("batches with nothing readable")
            empty_in_a_row += 1
            if empty_in_a_row == MAX_EMPTY_BATCHES:
                counts = ", ".join(f"{reason} {n}" for reason, n in self.skipped.counts().items())
                raise ValueError(f"{empty_in_a_row} training batches in a row had no usable item "
                                 f"(skipped so far: {counts}); fix or remove the data the warnings "
                                 "above name")


def make_val_loaders(val_cfg: dict, dataset, rank: int = 0, world_size: int = 1) -> dict:
    """One finite, ordered loader per named validation set (each rank gets every world_size-th
    batch); each set inherits the section's shared keys. What a set drops is recorded in its
    loader's `skipped`."""
    shared = {k: v for k, v in val_cfg.items() if k != "datasets"}
    loaders = {}
    for name, overrides in (val_cfg.get("datasets") or {"val": {}}).items():
        ds_cfg = loader_defaults({**shared, **(overrides or {})})
        skipped = Skipped()
        cuts = read_inputs(ds_cfg, train=False, skipped=skipped, what=f"validation set '{name}'")
        sampler = make_sampler(cuts, ds_cfg, train=False, rank=rank, world_size=world_size)
        loader = torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=None, collate_fn=_as_built,
            num_workers=ds_cfg["num_workers"], pin_memory=_pin_memory(ds_cfg),
            generator=torch.Generator().manual_seed(0))
        loaders[name] = _Recorded(loader, skipped)
    return loaders


def has_data(ds_cfg: dict) -> bool:
    """Whether a loader section names any data (validation sets under `datasets` included)."""
    return any(ds_cfg.get(k) for k in (*DATA_KEYS, "datasets"))


def loader_values(ds_cfg: dict, key: str) -> list:
    """Every value a loader section sets for `key`: its own and its input_cfg entries'."""
    entries = ds_cfg.get("input_cfg") or []
    entries = read_input_cfg(entries) if isinstance(entries, (str, Path)) else entries
    values = [ds_cfg.get(key)] + [v for entry in entries for v in loader_values(entry, key)]
    return [v for v in values if v is not None]


def check_data_paths(data_cfg: dict) -> None:
    """Every shar_path, cuts_path and manifest_filepath of the training and validation data exists
    (a one-line FileNotFoundError naming the key otherwise), so that a typo ends a run before the
    model is built; so is augmentation asked of conversation JSONL."""
    for name in ("train_ds", "validation_ds"):
        _check_paths(data_cfg.get(name) or {}, f"data.{name}")
    train = data_cfg.get("train_ds") or {}
    if ((train.get("perturb_speed") or train.get("noise_path"))
            and "multimodal_conversation" in loader_values(train, "type")):
        raise ValueError(NOT_AUGMENTED)


def make_sampler(cuts, ds_cfg: dict, train: bool, rank: int = 0, world_size: int = 1):
    """lhotse's dynamic sampler from NeMo's keys (`batch_size`: most items, `batch_duration`:
    most seconds)."""
    if ds_cfg["batch_size"] is None and ds_cfg["batch_duration"] is None:
        raise ValueError("set batch_size or batch_duration in the data section")
    if ds_cfg["use_multimodal_sampling"]:
        raise ValueError("use_multimodal_sampling (token-based batches) is not supported: use "
                         "batch_duration")
    common = dict(max_cuts=ds_cfg["batch_size"], max_duration=ds_cfg["batch_duration"],
                  shuffle=train and ds_cfg["shuffle"], drop_last=train and ds_cfg["drop_last"],
                  seed=ds_cfg["seed"], rank=rank, world_size=world_size,
                  quadratic_duration=ds_cfg["quadratic_duration"],
                  shuffle_buffer_size=ds_cfg["shuffle_buffer_size"])
    if train and ds_cfg["use_bucketing"]:
        return DynamicBucketingSampler(
            cuts, num_buckets=ds_cfg["num_buckets"], duration_bins=ds_cfg["bucket_duration_bins"],
            num_cuts_for_bins_estimate=ds_cfg["num_cuts_for_bins_estimate"],
            buffer_size=ds_cfg["bucket_buffer_size"], **common)
    return DynamicCutSampler(cuts, **common)


class DuplexS2SDataset(torch.utils.data.Dataset):
    """Conversation cuts -> the duplex batch: both audio channels and per-frame text channels.

    A text channel has one token per `frame_length` frame (see `build_token_channel`). Conversations
    whose audio cannot be read or that last more than `max_frames` frames are skipped and listed in
    batch["skipped"].
    """

    def __init__(self, tokenizer, pad_id: int, frame_length: float, source_sample_rate: int,
                 target_sample_rate: int, input_roles: list[str], output_roles: list[str],
                 max_frames: int | None = None):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("duplex data needs a tokenizer with BOS and EOS tokens: they mark the "
                             "agent's turns")
        self.tokenizer, self.pad_id, self.frame_length = tokenizer, pad_id, frame_length
        self.source_sample_rate, self.target_sample_rate = source_sample_rate, target_sample_rate
        self.input_roles, self.output_roles = list(input_roles), list(output_roles)
        self.max_frames = max_frames

    def __getitem__(self, cuts: CutSet) -> dict:
        sources, targets, kept, skipped = [], [], [], []
        for cut in cuts:
            frames = math.ceil(cut.duration / self.frame_length) + 1
            if self.max_frames and frames > self.max_frames:
                skipped.append(("longer than the model's context", cut.id, None))
                continue
            try:
                source = load_audio(cut, self.source_sample_rate)
                target = load_target_audio(cut, self.target_sample_rate)
            except AudioError as e:
                skipped.append((UNREADABLE, cut.id, str(e)))
                continue
            sources.append(torch.from_numpy(source))
            targets.append(torch.from_numpy(target))
            kept.append(cut)
        if not kept:
            return {"skipped": skipped, "empty": True}
        source_audio, source_audio_lens = right_pad(sources, 0.0)
        target_audio, target_audio_lens = right_pad(targets, 0.0)
        (target_tokens, target_token_lens), (source_tokens, source_token_lens) = (
            right_pad(self._channels(kept, self.output_roles), self.pad_id),
            right_pad(self._channels(kept, self.input_roles), self.pad_id))
        return {
            "source_audio": source_audio,  # (B, T_source)
            "source_audio_lens": source_audio_lens,
            "target_audio": target_audio,  # (B, T_target)
            "target_audio_lens": target_audio_lens,
            "target_tokens": target_tokens,  # (B, T_frames)
            "target_token_lens": target_token_lens,
            "source_tokens": source_tokens,  # (B, T_frames)
            "source_token_lens": source_token_lens,
            "target_texts": [turn_texts(c, self.output_roles) for c in kept],
            "ids": [c.id for c in kept],
            "audio_seconds": float(source_audio_lens.sum()) / self.source_sample_rate,
            "skipped": skipped,
        }

    def _channels(self, cuts: list[Cut], roles: list[str]) -> list[torch.Tensor]:
        return [build_token_channel(c, self.tokenizer, self.pad_id, self.frame_length, roles)
                for c in cuts]


def build_token_channel(cut: Cut, tokenizer, pad_id: int, frame_length: float,
                        roles: list[str]) -> torch.Tensor:
    """One token per frame for the turns of `roles`: (num_frames,) int64.

    pad where nobody of `roles` speaks; BOS at a turn's start frame and its text tokens on the
    frames right after it, as fast as one per frame; EOS at the frame where the turn's speech ends
    (none when the cut ends first). As in NeMo, a turn whose text outlasts its speech gets that EOS
    over one of its text tokens: the channel keeps the speech timing exact, and the audio channel's
    speech EOS lands on the same frame. Frame indices round to the nearest frame (lhotse's
    compute_num_frames).
    """
    sr = cut.sampling_rate
    num_frames = compute_num_frames(cut.duration, frame_length, sr)
    tokens = torch.full((num_frames,), pad_id, dtype=torch.long)
    for sup in cut.supervisions:
        if sup.speaker not in roles:
            continue
        start = compute_num_frames(sup.start, frame_length, sr)
        if start >= num_frames:
            continue
        text_ids = tokenizer(_clean_text(sup.text), add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] + text_ids)[: num_frames - start]
        tokens[start : start + len(ids)] = torch.tensor(ids)
        end = compute_num_frames(sup.end, frame_length, sr)
        if end < num_frames:
            tokens[end] = tokenizer.eos_token_id
    return tokens


def turn_texts(cut: Cut, roles: list[str]) -> str:
    """The text of the turns of `roles`, in order, joined by spaces (the reference for BLEU)."""
    return " ".join(_clean_text(s.text) for s in sorted(cut.supervisions, key=lambda s: s.start)
                    if s.speaker in roles and s.text)


def load_target_audio(cut: Cut, sample_rate: int) -> np.ndarray:
    """The agent channel of a duplex cut (custom field `target_audio`) over the cut's span, mono
    float32."""
    if not (cut.custom or {}).get("target_audio"):
        raise AudioError(f"cut {cut.id} has no 'target_audio' field: duplex data needs the agent "
                         "channel as a Recording in cut.custom['target_audio'] (Shar field "
                         "target_audio)")
    start = cut.tracks[0].cut.start if isinstance(cut, MixedCut) else cut.start  # noise mixed in: 0
    return _load_mono(cut.custom["target_audio"], sample_rate, f"target_audio of {cut.id}",
                      offset=start, duration=cut.duration)


# --------------------------------------------------------------------------------------------------
# helpers


def left_pad(rows: list[torch.Tensor], value) -> torch.Tensor:
    """Stack (L_i, ...) tensors into (B, L, ...), padding on the left (decoder-only LLMs continue
    from the right edge)."""
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left")


def right_pad(rows: list[torch.Tensor], value) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into (B, L), padding on the right; also their lengths (B,). No rows: (0, 0)
    and (0,)."""
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if not rows:
        return torch.zeros(0, 0), lens
    return pad_sequence(rows, batch_first=True, padding_value=value), lens


def _pin_memory(ds_cfg: dict) -> bool:
    """`pin_memory` (null: on when there is a GPU): pinned batches copy to it while it computes."""
    return torch.cuda.is_available() if ds_cfg["pin_memory"] is None else ds_cfg["pin_memory"]


def _as_built(batch: dict) -> dict:
    """The dataset's batch unchanged (torch's default conversion would rebuild its containers)."""
    return batch


class _Epochs:
    """A sampler epoch after epoch, forever, first skipping `skip` batches (sampling only)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        to_skip = self.skip
        for epoch in count():
            self.sampler.set_epoch(epoch)
            drawn = 0
            for batch in self.sampler:
                drawn += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield batch
            if drawn == 0:
                raise ValueError("the training data yields no batch (empty data, or everything "
                                 "filtered out)")


class _Recorded:
    """A validation loader whose batches' skips are recorded (warnings printed) in `skipped`."""

    def __init__(self, loader, skipped: Skipped):
        self.loader, self.skipped = loader, skipped

    def __iter__(self):
        for batch in self.loader:
            self.skipped.merge(batch["skipped"])
            yield batch


class _DurationFilter:
    def __init__(self, low, high, counter):
        self.low, self.high, self.counter = low, high, counter

    def __call__(self, item) -> bool:
        if self.low is not None and item.duration < self.low:
            self.counter.add("shorter than min_duration", item.id)
            return False
        if self.high is not None and item.duration > self.high:
            self.counter.add("longer than max_duration", item.id)
            return False
        return True


def _duration_filter(cuts, ds_cfg, counter):
    low, high = ds_cfg.get("min_duration"), ds_cfg.get("max_duration")
    low = None if low is None or low < 0 else low
    unbounded = low is None and high is None
    return cuts if unbounded else cuts.filter(_DurationFilter(low, high, counter))


def _check_paths(node: dict | list, key: str) -> None:
    for name, value in node.items() if isinstance(node, dict) else enumerate(node):
        if name not in DATA_KEYS[1:] or not value:
            if isinstance(value, (dict, list)):  # input_cfg entries, validation datasets
                _check_paths(value, f"{key}.{name}")
            continue
        listed = isinstance(value, list) and name == "manifest_filepath"
        for i, item in enumerate(value if listed else [value]):
            where = f"{key}.{name}" + (f".{i}" if listed else "")
            path = item[0] if listed and isinstance(item, list) and item else item
            if not isinstance(path, str) or listed and isinstance(item, list) and len(item) > 2:
                raise ValueError(f"{where} must be a path, got {item!r} (a list is read only for "
                                 "manifest_filepath: paths or [path, weight] pairs)")
            if not Path(path).exists() and not re.search(r"\{|_OP_", path):  # a pattern of files
                raise FileNotFoundError(f"{where}: {path} does not exist")


def _load_mono(audio: Cut | Recording, sample_rate: int, what: str, **span) -> np.ndarray:
    """Mono float32 samples of a cut or recording at `sample_rate` (`span`: offset= and duration= of
    a recording); AudioError naming `what` when they cannot be read, are empty or are not finite."""
    recording = audio if isinstance(audio, Recording) else getattr(audio, "recording", None)
    missing = [s.source for s in getattr(recording, "sources", [])
               if s.type == "file" and not Path(s.source).is_file()]
    if missing:
        raise AudioError(f"cannot read {what}: file not found: {missing[0]}")
    try:
        if audio.sampling_rate != sample_rate:
            audio = audio.resample(sample_rate)
        samples = np.asarray(audio.load_audio(**span), dtype=np.float32)
    except Exception as e:  # lhotse/soundfile raise many types for missing or corrupt files
        raise AudioError.unreadable(what, e) from None
    samples = samples.mean(axis=0) if samples.ndim == 2 else samples
    if samples.size == 0:
        raise AudioError(f"{what} is empty")
    if not np.isfinite(samples).all():
        raise AudioError(f"{what} holds NaN or inf samples")
    return samples


def _audio_source(cut):
    try:
        source = cut.recording.sources[0]
        return source.source if source.type == "file" else f"{source.type} audio"
    except (AttributeError, IndexError):
        return "no recording"


def _clean_text(text: str) -> str:
    return " ".join(TIMESTAMP_TOKEN.sub(" ", text or "").split())
