"""Data: NeMo's `input_cfg` readers on lhotse, SALM batches, and rank-aware dataloaders.

Readers (the `type` of an `input_cfg` entry, or a loader section's own `shar_path` / `cuts_path` /
`manifest_filepath`):
  lhotse_shar               `shar_path`: a lhotse Shar directory (cuts + audio tars; path-independent)
  lhotse                    `cuts_path`: a lhotse cut manifest (jsonl.gz)
  nemo                      `manifest_filepath`: NeMo ASR JSON lines {"audio_filepath", "duration", "text"}
  lhotse_as_conversation    any of the above, each cut read as [system?] [user context?] [user audio]
                            [assistant transcript]; `tags` (e.g. `context`, `system_prompt`) are attached to cuts
  multimodal_conversation   `manifest_filepath`: NeMo's multimodal conversation JSON lines
  group                     a nested `input_cfg`; entries are mixed by `weight` when training
Every item the readers yield has a `.duration`, so lhotse's samplers batch cuts and conversations alike.

Sampling runs in the main process (workers only load audio), so a run can be resumed exactly: the stream is a
deterministic function of `seed`, the epoch and the rank, and `TrainBatches(skip=N)` replays the first N batches'
sampling without loading their audio. For the same reason every rank sees the same shard order and takes every
world_size-th batch of it; `shard_seed` "trng"/"randomized" therefore derive the shard order from `seed`.
"""
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import Cut, MonoCut
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler

SUPPORTED_TYPES = ("lhotse_shar", "lhotse", "nemo", "lhotse_as_conversation", "multimodal_conversation", "group")
MAX_WARNINGS = 5  # unreadable-audio warnings printed per process; after that they are only counted


@dataclass
class Turn:
    role: str                 # "user", "assistant" or "system"
    text: str | None = None   # a text turn ...
    audio: Cut | None = None  # ... or an audio turn, rendered as the audio locator tag


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    custom: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return sum(turn.audio.duration for turn in self.turns if turn.audio is not None)

    @property
    def audio_cuts(self) -> list[Cut]:
        return [turn.audio for turn in self.turns if turn.audio is not None]

    def prompt_turns(self, audio_locator_tag: str) -> list[dict]:
        """Turns as {"role", "content"} dicts with audio replaced by the tag and same-role turns merged."""
        merged = []
        for turn in self.turns:
            content = audio_locator_tag if turn.audio is not None else turn.text
            if merged and merged[-1]["role"] == turn.role:
                merged[-1]["content"] += " " + content
            else:
                merged.append({"role": turn.role, "content": content})
        return merged


def cut_to_conversation(cut: Cut) -> Conversation:
    """An ASR cut as a conversation: [system?] [user context?] [user audio] [assistant transcript]."""
    custom = cut.custom or {}
    turns = []
    if custom.get("system_prompt"):
        turns.append(Turn("system", text=custom["system_prompt"]))
    if custom.get("context"):
        turns.append(Turn("user", text=custom["context"]))
    turns.append(Turn("user", audio=cut))
    turns.append(Turn("assistant", text=" ".join(s.text for s in cut.supervisions if s.text).strip()))
    return Conversation(cut.id, turns, custom)


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and what is wrong."""


def load_audio(cut: Cut, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of a cut at `sample_rate`, or AudioError with a one-line reason."""
    where = _audio_source(cut)
    try:
        if cut.sampling_rate != sample_rate:
            cut = cut.resample(sample_rate)
        samples = cut.load_audio()
    except Exception as e:  # lhotse/soundfile raise many types for missing, truncated or corrupt files
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise AudioError(f"cannot read audio of {cut.id} ({where}): {reason}") from None
    samples = np.asarray(samples, dtype=np.float32)
    samples = samples.mean(axis=0) if samples.ndim == 2 else samples
    if samples.size == 0:
        raise AudioError(f"audio of {cut.id} ({where}) is empty")
    if not np.isfinite(samples).all():
        raise AudioError(f"audio of {cut.id} ({where}) holds NaN or inf samples")
    return samples


class SALMDataset(torch.utils.data.Dataset):
    """Turns a sampled mini-batch (a CutSet of conversations or ASR cuts) into SALM's tensors.

    `encode_dialog(turns) -> {"input_ids", "mask"}` is the model's prompt formatter. Conversations whose audio
    cannot be read, whose answer is empty or whose length exceeds `max_tokens` are skipped and counted in
    batch["skipped"]; a batch with nothing left is None.
    """

    def __init__(self, encode_dialog, pad_id: int, sample_rate: int, audio_locator_tag: str,
                 token_equivalent_duration: float = 0.08, max_tokens: int | None = None):
        self.encode_dialog = encode_dialog
        self.pad_id = pad_id
        self.sample_rate = sample_rate
        self.audio_locator_tag = audio_locator_tag
        self.token_equivalent_duration = token_equivalent_duration
        self.max_tokens = max_tokens

    def __getitem__(self, items: CutSet) -> dict | None:
        audios, conversations, token_ids, masks, skipped = [], [], [], [], Counter()
        for item in items:
            conversation = item if isinstance(item, Conversation) else cut_to_conversation(item)
            turns = conversation.prompt_turns(self.audio_locator_tag)
            if turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
                skipped["empty transcript"] += 1
                continue
            try:
                clip_audios = [load_audio(cut, self.sample_rate) for cut in conversation.audio_cuts]
            except AudioError as e:
                _skip(skipped, e)
                continue
            encoded = self.encode_dialog(turns)
            num_audio_frames = sum(math.ceil(len(a) / self.sample_rate / self.token_equivalent_duration)
                                   for a in clip_audios)
            if self.max_tokens and len(encoded["input_ids"]) + num_audio_frames > self.max_tokens:
                skipped["longer than max_tokens"] += 1
                continue
            audios.extend(clip_audios)
            conversations.append(conversation)
            token_ids.append(encoded["input_ids"])
            masks.append(encoded["mask"])
        if not conversations:
            return {"skipped": skipped, "empty": True}
        audio_lens = torch.tensor([len(a) for a in audios], dtype=torch.long)
        audio = torch.zeros(len(audios), int(audio_lens.max()) if audios else 0)  # (B_audio, T)
        for i, samples in enumerate(audios):
            audio[i, : len(samples)] = torch.from_numpy(samples)
        return {
            "audios": audio,
            "audio_lens": audio_lens,
            "input_ids": left_pad(token_ids, self.pad_id),                   # (B, L)
            "loss_mask": left_pad([m.long() for m in masks], 0).bool(),      # (B, L)
            "ids": [c.id for c in conversations],
            "audio_seconds": float(audio_lens.sum()) / self.sample_rate,
            "skipped": skipped,
        }


class TrainBatches:
    """An endless, resumable stream of training batches for one rank.

    Epochs of a rank-aware lhotse sampler over `read_inputs(ds_cfg)`; `skip` replays that many batches of
    sampling (no audio is loaded) so a resumed run continues with the batch it would have seen next.
    `skipped` counts what was dropped (duration filter, unreadable audio, ...) and `num_batches` what was drawn.
    """

    def __init__(self, ds_cfg: dict, dataset, rank: int = 0, world_size: int = 1, skip: int = 0):
        self.ds_cfg, self.dataset = ds_cfg, dataset
        self.rank, self.world_size = rank, world_size
        self.skipped = Counter()
        self.num_batches = skip
        self._skip = skip

    def __iter__(self):
        cuts = _duration_filter(read_inputs(self.ds_cfg, True, self.skipped), self.ds_cfg, self.skipped)
        sampler = make_sampler(cuts, self.ds_cfg, train=True, rank=self.rank, world_size=self.world_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, sampler=_Epochs(sampler, self._skip), batch_size=None,
            num_workers=self.ds_cfg.get("num_workers") or 0, pin_memory=bool(self.ds_cfg.get("pin_memory")),
            persistent_workers=bool(self.ds_cfg.get("num_workers")),
        )
        for batch in loader:
            self.num_batches += 1
            self.skipped.update(batch.pop("skipped"))
            if not batch.get("empty"):
                yield batch
            else:
                self.skipped["batches with nothing readable"] += 1


def make_val_loaders(val_cfg: dict, dataset, rank: int = 0, world_size: int = 1) -> dict:
    """One finite, ordered loader per named validation set (each rank gets every world_size-th batch);
    each set inherits the section's shared keys."""
    shared = {k: v for k, v in val_cfg.items() if k != "datasets"}
    named = val_cfg.get("datasets") or {"val": {}}
    loaders = {}
    for name, overrides in named.items():
        ds_cfg = {**shared, **(overrides or {})}
        if not any(ds_cfg.get(k) for k in ("input_cfg", "shar_path", "cuts_path", "manifest_filepath")):
            raise ValueError(f"validation set '{name}' names no data: give it input_cfg, shar_path, cuts_path "
                             "or manifest_filepath")
        cuts = read_inputs(ds_cfg, train=False)
        sampler = make_sampler(cuts, ds_cfg, train=False, rank=rank, world_size=world_size)
        loaders[name] = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None,
                                                    num_workers=ds_cfg.get("num_workers") or 0)
    return loaders


def make_sampler(cuts, ds_cfg: dict, train: bool, rank: int = 0, world_size: int = 1):
    """lhotse's dynamic sampler from NeMo's keys: `batch_size` caps items, `batch_duration` caps seconds."""
    batch_size, batch_duration = ds_cfg.get("batch_size"), ds_cfg.get("batch_duration")
    if batch_size is None and batch_duration is None:
        raise ValueError("set batch_size or batch_duration in the data section")
    if ds_cfg.get("use_multimodal_sampling"):
        raise ValueError("use_multimodal_sampling (token-based batches) is not supported: use batch_duration")
    common = dict(max_cuts=batch_size, max_duration=batch_duration, shuffle=bool(train and ds_cfg.get("shuffle")),
                  drop_last=bool(train and ds_cfg.get("drop_last")), seed=int(ds_cfg.get("seed") or 0),
                  rank=rank, world_size=world_size, quadratic_duration=ds_cfg.get("quadratic_duration"))
    if train and ds_cfg.get("use_bucketing"):
        return DynamicBucketingSampler(
            cuts, num_buckets=ds_cfg.get("num_buckets") or 30, duration_bins=ds_cfg.get("bucket_duration_bins"),
            num_cuts_for_bins_estimate=ds_cfg.get("num_cuts_for_bins_estimate") or 10000,
            buffer_size=ds_cfg.get("bucket_buffer_size") or 10000,
            shuffle_buffer_size=ds_cfg.get("shuffle_buffer_size") or 10000, **common)
    return DynamicCutSampler(cuts, shuffle_buffer_size=ds_cfg.get("shuffle_buffer_size") or 10000, **common)


def read_inputs(ds_cfg: dict, train: bool, skipped: Counter | None = None) -> CutSet:
    """The items of a loader section: its `input_cfg` entries, or its own shar/cuts/manifest keys.
    Manifest lines whose audio file is missing or unreadable are skipped and counted in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    entries = ds_cfg.get("input_cfg")
    if not entries:
        entry = {k: ds_cfg[k] for k in ("shar_path", "cuts_path", "manifest_filepath") if ds_cfg.get(k)}
        if not entry:
            raise ValueError("the data section names no data: set input_cfg, shar_path, cuts_path or "
                             "manifest_filepath")
        entries = [entry]
    defaults = {"seed": int(ds_cfg.get("seed") or 0), "shard_seed": ds_cfg.get("shard_seed"),
                "shuffle": bool(train and ds_cfg.get("shuffle")), "audio_locator_tag": ds_cfg.get("audio_locator_tag")}
    return _read_group(entries, defaults, train, skipped)


# ----------------------------------------------------------------------------------------------------------
# helpers

def left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors into (B, L), padding on the left (decoder-only LLMs continue from the right edge)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, out.shape[1] - len(row):] = row
    return out


class _Epochs:
    """Iterates a sampler epoch after epoch, forever, first skipping `skip` batches (sampling only)."""

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
                raise ValueError("the training data yields no batch (empty data, or everything filtered out)")


class _DurationFilter:
    def __init__(self, low, high, counter):
        self.low, self.high, self.counter = low, high, counter

    def __call__(self, item) -> bool:
        if self.low is not None and item.duration < self.low:
            self.counter["shorter than min_duration"] += 1
            return False
        if self.high is not None and item.duration > self.high:
            self.counter["longer than max_duration"] += 1
            return False
        return True


def _duration_filter(cuts, ds_cfg, counter):
    low, high = ds_cfg.get("min_duration"), ds_cfg.get("max_duration")
    low = None if low is None or low < 0 else low
    return cuts if low is None and high is None else cuts.filter(_DurationFilter(low, high, counter))


def _read_group(entries, defaults, train, skipped):
    parts, weights = [], []
    for entry in entries:
        kind = entry.get("type") or _guess_type(entry)
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"input_cfg type '{kind}' is not supported; use one of {', '.join(SUPPORTED_TYPES)}")
        options = {**defaults, **{k: v for k, v in entry.items() if v is not None}}
        if kind == "group":
            items = _read_group(entry.get("input_cfg") or [], options, train, skipped)
        elif kind == "multimodal_conversation":
            items = CutSet(_MultimodalJsonl(entry["manifest_filepath"], skipped))
        else:
            items = _read_cuts(entry, options, kind, skipped)
        if entry.get("tags"):
            items = items.map(_AttachTags(entry["tags"]), apply_fn=None)
        if kind == "lhotse_as_conversation":
            items = items.map(cut_to_conversation, apply_fn=None)
        parts.append(items)
        weights.append(float(entry.get("weight", 1.0)))
    if len(parts) == 1:
        return parts[0]
    if train:
        return CutSet.mux(*parts, weights=weights, seed=defaults["seed"])
    return CutSet(_Chain(parts))


def _guess_type(entry):
    if entry.get("shar_path"):
        return "lhotse_shar"
    if entry.get("cuts_path"):
        return "lhotse"
    if entry.get("manifest_filepath"):
        return "nemo"
    if entry.get("input_cfg"):
        return "group"
    raise ValueError(f"input_cfg entry {entry} has no type and no shar_path/cuts_path/manifest_filepath")


def _read_cuts(entry, options, kind, skipped):
    for key in ("shar_path", "cuts_path", "manifest_filepath"):
        path = entry.get(key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key} {path} does not exist")
    if entry.get("shar_path"):
        shard_seed = options.get("shard_seed")
        seed = shard_seed if isinstance(shard_seed, int) else options["seed"]
        return CutSet.from_shar(in_dir=entry["shar_path"], shuffle_shards=options["shuffle"], seed=seed)
    if entry.get("cuts_path"):
        return CutSet.from_file(entry["cuts_path"])
    if entry.get("manifest_filepath"):
        return CutSet(_NeMoAsrManifest(entry["manifest_filepath"], skipped))
    raise ValueError(f"input_cfg entry of type '{kind}' needs shar_path, cuts_path or manifest_filepath")


class _AttachTags:
    def __init__(self, tags):
        self.tags = dict(tags)

    def __call__(self, item):
        if isinstance(item, Conversation):
            item.custom.update(self.tags)
        else:
            item.custom = {**(item.custom or {}), **self.tags}
        return item


class _Chain:
    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        for part in self.parts:
            yield from part


class _NeMoAsrManifest:
    """NeMo's ASR manifest: JSON lines with audio_filepath, duration, text (offset optional)."""

    def __init__(self, path, skipped):
        self.path, self.skipped = Path(path), skipped

    def __iter__(self):
        for i, row in _json_lines(self.path):
            try:
                cut = _audio_cut(f"{self.path.stem}-{i}", _resolve_path(row["audio_filepath"], self.path),
                                 row.get("duration"), row.get("offset", 0.0))
            except AudioError as e:
                _skip(self.skipped, e)
                continue
            cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=cut.recording_id, start=0.0,
                                                   duration=cut.duration, text=row.get("text", ""))]
            yield cut


class _MultimodalJsonl:
    """NeMo's multimodal conversation JSON lines: {"id", "conversations": [{"from", "type", "value"}, ...]}."""

    def __init__(self, path, skipped):
        self.path, self.skipped = Path(path), skipped

    def __iter__(self):
        for i, row in _json_lines(self.path):
            if (row.get("custom") or {}).get("_skipme"):
                continue
            example_id = str(row.get("id", f"{self.path.stem}-{i}"))
            try:
                turns = [self._turn(turn, f"{example_id}-{j}") for j, turn in enumerate(row["conversations"])]
            except AudioError as e:
                _skip(self.skipped, e)
                continue
            yield Conversation(example_id, turns, dict(row.get("custom") or {}))

    def _turn(self, turn, cut_id):
        role = turn["from"].lower()
        if turn.get("type", "text") != "audio":
            return Turn(role, text=turn["value"])
        path = _resolve_path(turn["value"], self.path)
        return Turn(role, audio=_audio_cut(cut_id, path, turn.get("duration"), turn.get("offset", 0.0)))


def _json_lines(path):
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i + 1} is not valid JSON: {e.msg}") from None


_warnings_printed = Counter()


def _skip(counter, error):
    """Count an item dropped for unreadable audio, and say so for the first few."""
    counter["unreadable audio"] += 1
    _warnings_printed["audio"] += 1
    if _warnings_printed["audio"] <= MAX_WARNINGS:
        print(f"warning: skipped {error}" + ("" if _warnings_printed["audio"] < MAX_WARNINGS else
              " (further unreadable files are only counted)"), file=sys.stderr)


def _audio_cut(cut_id, path, duration, offset):
    """A cut over (part of) an audio file; the file header gives its true sampling rate and length."""
    try:
        recording = Recording.from_file(path, recording_id=cut_id)
    except Exception as e:
        raise AudioError(f"cannot read audio file {path}: {' '.join(str(e).split())[:200]}") from None
    duration = recording.duration - offset if duration is None else min(duration, recording.duration - offset)
    return MonoCut(cut_id, start=offset, duration=duration, channel=0, recording=recording)


def _resolve_path(value, manifest_path):
    path = Path(value)
    if not path.is_absolute() and (manifest_path.parent / path).exists():
        return manifest_path.parent / path
    return path


def _audio_source(cut):
    try:
        source = cut.recording.sources[0]
        return source.source if source.type == "file" else f"{source.type} audio"
    except (AttributeError, IndexError):
        return "no recording"
