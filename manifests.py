"""Reading the data a config names: NeMo's and lhotse's manifest formats (input_cfg entries) as
lhotse cuts and Conversations, which data.py samples into batches."""
import io
import json
import math
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import Cut, MonoCut
from lhotse.utils import fastcopy
from tqdm import tqdm

from config import read_input_cfg
from prompts import merge_turns

DATA_KEYS = ("input_cfg", "shar_path", "cuts_path", "manifest_filepath")  # name a loader's data
# input_cfg types: the README's "Data: input_cfg types and keys" says what each reads. Every item
# they yield has a `.duration`, so lhotse's samplers batch cuts and Conversations alike.
SUPPORTED_TYPES = ("lhotse_shar", "lhotse", "nemo", "nemo_tarred", "lhotse_as_conversation",
                   "multimodal_conversation", "duplex_demo", "group")
# input_cfg keys NeMo accepts but does not act on: refused, with what to use instead
NO_EFFECT_KEYS = {
    "system_prompt": "NeMo ignores it there: put it under tags ({system_prompt: ...}) or on lines",
    "context": "NeMo ignores it there: put it under tags ({context: ...}) or on each line",
    "shuffle_shards": "not a NeMo option: shards are shuffled when the loader's shuffle is true",
}
NOT_AUGMENTED = ("perturb_speed and noise_path apply to audio cuts; a multimodal_conversation "
                 "entry cannot be augmented (set data.train_ds.perturb_speed=false and "
                 "noise_path=null)")
UNREADABLE = "unreadable audio"  # the skip reason of an item whose audio cannot be used
MAX_WARNINGS = 5  # unreadable items named in a warning per process; the rest are only counted
DEMO_PAIRS_PER_CONVERSATION = (1, 2, 3)  # question/answer exchanges in one demo conversation
DEMO_LEAD_IN = (0.1, 0.5)  # seconds of silence before the first question
DEMO_ANSWER_DELAY = (0.3, 0.7)  # from the end of a question to the start of its answer
DEMO_NEXT_DELAY = (0.4, 0.9)  # from the end of an answer to the next question (or the end)


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

    def prompt_turns(self, audio_tag: str) -> list[dict]:
        """Turns as {"role", "content"} dicts, audio replaced by the tag, same-role turns merged."""
        return merge_turns([{"role": t.role, "content": t.text if t.audio is None else audio_tag}
                            for t in self.turns])


def cut_to_conversation(cut: Cut) -> Conversation:
    """An ASR cut as a conversation: [system?] [user context?] [user audio] [assistant text]."""
    custom = cut.custom or {}
    turns = []
    if custom.get("system_prompt"):
        turns.append(Turn("system", text=custom["system_prompt"]))
    if custom.get("context"):
        turns.append(Turn("user", text=custom["context"]))
    turns.append(Turn("user", audio=cut))
    text = " ".join(s.text for s in cut.supervisions if s.text).strip()
    turns.append(Turn("assistant", text=text))
    return Conversation(cut.id, turns, custom)


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and what is wrong."""

    @classmethod
    def unreadable(cls, what: str, error: Exception) -> "AudioError":
        """`what` cannot be read, and the gist of the audio backend's `error` (lhotse wraps each
        backend's message in a report of several lines)."""
        text = str(error)
        first_backend = re.search(r"Exception #0 \(.*?\): <class '.*?'>: (.+)", text)
        gist = " ".join((first_backend.group(1) if first_backend else text).split())[:200]
        return cls(f"cannot read {what}: {gist or type(error).__name__}")


class Skipped:
    """What a data stream dropped, by reason. Items are counted once, by id, however many epochs
    bring them back; events (a batch with nothing readable) each time. `state()` is what a
    checkpoint saves: reason -> item ids, or reason -> count. The first MAX_WARNINGS unreadable
    items of a process are named in a warning printed above any progress bar."""

    def __init__(self, state: dict | None = None):
        self.items = {}  # reason -> {item id: None}, in the order they came
        self.events = Counter()  # reason -> count
        for reason, value in (state or {}).items():
            if isinstance(value, list):
                self.items[reason] = dict.fromkeys(value)
            else:
                self.events[reason] += value

    def add(self, reason: str, item_id: str | None = None, warning: str | None = None) -> None:
        if item_id is None:
            self.events[reason] += 1
        elif item_id not in self.items.setdefault(reason, {}):
            self.items[reason][item_id] = None
            if warning:
                _warn(item_id, warning)

    def merge(self, entries: list[tuple]) -> None:
        """Record a dataset's (reason, item id, warning or None) entries."""
        for entry in entries:
            self.add(*entry)

    def counts(self) -> Counter:
        return Counter({reason: len(ids) for reason, ids in self.items.items()}) + self.events

    def state(self, events: dict | None = None) -> dict:
        """Plain lists and ints (they load with weights_only=True), `events` (the loop's) added."""
        return {**{reason: list(ids) for reason, ids in self.items.items() if ids},
                **(self.events + Counter(events or {}))}


def read_inputs(ds_cfg: dict, train: bool, skipped: Skipped | None = None,
                what="the data section") -> CutSet:
    """The items of a loader section: its `input_cfg` entries, or its own shar/cuts/manifest keys.
    Lines whose audio file is missing or unreadable are skipped and recorded in `skipped`."""
    skipped = Skipped() if skipped is None else skipped
    entries = ds_cfg.get("input_cfg")
    if not entries:
        entry = {k: ds_cfg[k] for k in (*DATA_KEYS[1:], "tarred_audio_filepaths") if ds_cfg.get(k)}
        if not entry:
            raise ValueError(f"{what} names no data: set one of {', '.join(DATA_KEYS)}")
        entries = [entry]
    augmented = train and (ds_cfg.get("perturb_speed") or ds_cfg.get("noise_path"))
    defaults = {"seed": ds_cfg.get("seed") or 0, "shard_seed": ds_cfg.get("shard_seed"),
                "shuffle": bool(train and ds_cfg.get("shuffle")),
                "slice_length": ds_cfg.get("slice_length"),
                "augment": ds_cfg if augmented else None}
    return _read_group(entries, defaults, train, skipped)


def augment(cuts: CutSet, ds_cfg: dict) -> CutSet:
    """NeMo's lhotse augmentation of training cuts, before sampling (batches see the new durations),
    applied when the audio loads: `noise_path` cuts mixed in with probability `noise_mix_prob` at an
    SNR drawn from `noise_snr`, then `perturb_speed`: each cut also at 0.9x and 1.1x speed
    (supervisions rescaled), the three interleaved. Both draw from `seed`: a resume replays them."""
    seed = ds_cfg["seed"]
    if ds_cfg.get("noise_path"):
        source = ds_cfg["noise_path"]
        if not isinstance(source, dict):
            path = Path(source)
            key = "cuts_path" if ".jsonl" in path.name else "manifest_filepath"
            source = {"shar_path" if path.is_dir() else key: str(path)}
        # eager: reshuffled whole each pass (lazy noise, lhotse rereads into a 2000-cut buffer)
        noise = read_inputs({**source, "seed": seed}, train=False, what="noise_path").to_eager()
        cuts = cuts.mix(cuts=noise.resample(ds_cfg["sample_rate"]), snr=tuple(ds_cfg["noise_snr"]),
                        mix_prob=ds_cfg["noise_mix_prob"], seed=seed, random_mix_offset=True,
                        preserve_id="left")  # NeMo: a random id, which a resume could not replay
    if ds_cfg.get("perturb_speed"):
        slow, fast = cuts.map(_PerturbSpeed(0.9)), cuts.map(_PerturbSpeed(1.1))
        cuts = CutSet.mux(cuts, slow, fast, seed=seed)
    return cuts


def audio_file_cut(path: str | Path) -> Cut:
    """A cut over a whole audio file (all its channels); FileNotFoundError or AudioError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    return _read_recording(path).to_cut()


def read_duplex_demo(shar_path: str | Path, seed: int = 0) -> CutSet:
    """Demo conversations from question/answer utterances (a Shar directory whose cuts carry
    custom["pair_id"] and custom["role"] in {"user", "agent"}).

    Pairs are shuffled with `seed` and grouped 1-3 to a conversation: the user asks, a pause, the
    agent answers, a pause, the next question. The user channel holds the questions on silence and
    the agent channel the answers, both at the utterances' rate (the dataset resamples). The same
    seed gives the same conversations; audio is rendered in memory when a conversation is read.
    """
    return CutSet(DemoConversations(shar_path, seed))


# --------------------------------------------------------------------------------------------------
# helpers

def _read_group(entries, defaults, train, skipped):
    parts, weights = [], []
    if isinstance(entries, (str, Path)):  # NeMo's input_cfg may be a YAML file's path
        entries = read_input_cfg(entries)
    for entry in entries:
        tarred = entry.get("tarred_audio_filepaths") or entry.get("type") == "nemo_tarred"
        if isinstance(entry.get("manifest_filepath"), list) and not tarred:  # tarred: one per shard
            entry = _manifest_list_group(entry)
        kind = entry.get("type") or _guess_type(entry)
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"input_cfg type '{kind}' is not supported; use one of "
                             f"{', '.join(SUPPORTED_TYPES)}")
        for key, use in NO_EFFECT_KEYS.items():
            if entry.get(key) is not None:
                raise ValueError(f"input_cfg entry key {key} is not supported: {use}")
        options = {**defaults, **{k: v for k, v in entry.items() if v is not None}}
        tarred = entry.get("tarred_audio_filepaths") or kind == "nemo_tarred"
        sliceable = tarred or entry.get("shar_path") or kind == "group"
        if options.get("slice_length") and not sliceable:
            raise ValueError(f"slice_length applies to tarred NeMo data and lhotse_shar only (as "
                             f"in NeMo); the input_cfg entry of type '{kind}' is neither")
        if kind == "group":
            items = _read_group(entry.get("input_cfg") or [], options, train, skipped)
        elif kind == "multimodal_conversation":
            if tarred:
                raise ValueError("multimodal_conversation with tarred_audio_filepaths is not "
                                 "supported: untar the audio beside the JSONL, or make Shar")
            if options["augment"]:
                raise ValueError(NOT_AUGMENTED)
            items = CutSet(_MultimodalJsonl(entry["manifest_filepath"], skipped, entry.get("tags")))
        else:
            items = _read_cuts(entry, options, kind, skipped)
            items = augment(items, options["augment"]) if options["augment"] else items
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


def _manifest_list_group(entry):
    """NeMo's list of manifests (`[path, ...]`, `[[path], ...]`, `[[path, weight], ...]`) as a
    group, each manifest weighted by its number of lines unless it has a weight (NeMo's mixing)."""
    members = []
    for item in entry["manifest_filepath"]:
        path, *weight = item if isinstance(item, list) else [item]
        if not weight:
            text = Path(path).read_text() if Path(path).is_file() else ""
            weight = [max(1, sum(1 for line in text.splitlines() if line.strip()))]
        members.append({**entry, "manifest_filepath": path, "weight": weight[0]})
    return {"type": "group", "input_cfg": members, "weight": entry.get("weight", 1.0)}


def _guess_type(entry):
    implied = {"shar_path": "lhotse_shar", "cuts_path": "lhotse", "manifest_filepath": "nemo",
               "input_cfg": "group"}  # the first key an entry sets gives its type
    for key, kind in implied.items():
        if entry.get(key):
            return kind
    raise ValueError(f"input_cfg entry {entry} has no type and no "
                     "shar_path/cuts_path/manifest_filepath")


def _read_cuts(entry, options, kind, skipped):
    seed = options["shard_seed"] if isinstance(options.get("shard_seed"), int) else options["seed"]
    if entry.get("tarred_audio_filepaths") or kind == "nemo_tarred":
        tarred = _NeMoTarred(entry.get("manifest_filepath"), entry.get("tarred_audio_filepaths"),
                             skipped, options["shuffle"], seed, options.get("slice_length"))
        return CutSet(tarred)
    for key in ("shar_path", "cuts_path", "manifest_filepath"):
        path = entry.get(key)
        if path and not isinstance(path, str):
            raise ValueError(f"{key} must be one path, got {path!r} (a list: manifest_filepath)")
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key} {path} does not exist")
    if kind == "duplex_demo":
        return read_duplex_demo(entry["shar_path"], seed=options["seed"])
    if entry.get("shar_path"):
        return CutSet.from_shar(in_dir=entry["shar_path"], shuffle_shards=options["shuffle"],
                                seed=seed, slice_length=options.get("slice_length"))
    if entry.get("cuts_path"):  # relative audio paths are relative to the manifest, as in NeMo
        cuts = CutSet.from_file(entry["cuts_path"])
        return cuts.map(_ResolvePaths(entry["cuts_path"]), apply_fn=None)
    if entry.get("manifest_filepath"):
        return CutSet(_NeMoAsrManifest(entry["manifest_filepath"], skipped))
    raise ValueError(f"input_cfg entry of type '{kind}' needs shar_path, cuts_path or "
                     "manifest_filepath")


class _ResolvePaths:
    """Relative audio paths of a cut manifest's recordings (custom ones too) from its folder."""

    def __init__(self, manifest):
        self.manifest = Path(manifest)

    def __call__(self, cut):
        for recording in [getattr(cut, "recording", None), *(cut.custom or {}).values()]:
            for source in getattr(recording, "sources", None) or []:
                if source.type == "file" and isinstance(source.source, str):
                    source.source = str(_resolve_path(source.source, self.manifest))
        return cut


class _AttachTags:
    def __init__(self, tags):
        self.tags = dict(tags)

    def __call__(self, item):
        if isinstance(item, Conversation):
            item.custom.update(self.tags)
        else:
            item.custom = {**(item.custom or {}), **self.tags}
        return item


class _PerturbSpeed:
    """A cut at `factor` times its speed (lhotse resamples it when loaded). Duplex cuts are refused:
    the agent channel (custom target_audio) would keep its speed and drift out of step."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, cut):
        if (cut.custom or {}).get("target_audio") is not None:
            raise ValueError(f"perturb_speed: {cut.id} is a duplex conversation, whose agent "
                             "channel (target_audio) would fall out of step: set it to false")
        return cut.perturb_speed(self.factor, affix_id=True)


class _Chain:
    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        for part in self.parts:
            yield from part


class _NeMoAsrManifest:
    """NeMo's ASR manifest: JSON lines with audio_filepath, duration, text (offset, lang optional).
    As in NeMo, a line's other keys (text, lang too) go to cut.custom; `_skipme` lines are skipped.
    """

    def __init__(self, path, skipped):
        self.path, self.skipped = Path(path), skipped

    def __iter__(self):
        for i, row in _json_lines(self.path):
            if row.get("_skipme"):
                continue
            cut_id = f"{self.path.stem}-{i}"
            try:
                cut = _audio_cut(cut_id, _resolve_path(row["audio_filepath"], self.path),
                                 row.get("duration"), row.get("offset", 0.0))
            except AudioError as e:
                self.skipped.add(UNREADABLE, cut_id, str(e))
                continue
            yield _with_manifest_fields(cut, row)


class _NeMoTarred:
    """NeMo's tarred ASR data: each tar audio_N.tar with its manifest manifest_N.json (shard N
    from the file names), or one manifest whose lines carry shard_id. Members are read in tar
    order, their audio kept in memory; a line's audio_filepath is the member's name (plus -subN for
    more segments of one file). With `shuffle` the shard order is drawn from `seed` and the pass;
    `slice_length` reads that many members from a random start in each shard (NeMo's)."""

    def __init__(self, manifests, tars, skipped, shuffle=False, seed=0, slice_length=None):
        if not manifests or not tars:
            raise ValueError("nemo_tarred data needs manifest_filepath and tarred_audio_filepaths")
        manifests, tars = expand_sharded_paths(manifests), expand_sharded_paths(tars)
        for path in manifests + tars:
            if not Path(path).is_file():
                hint = " (brackets are not expanded: write _OP_0..N_CL_ or {0..N})" * ("[" in path)
                raise FileNotFoundError(f"tarred data: no such file {path}{hint}")
        self.tars = {_shard_number(t, r"audio[^/]*_(\d+)[^/]*\.tar"): t for t in tars}
        self.one_manifest = len(manifests) == 1  # then its lines say their shard_id
        if self.one_manifest:
            self.manifests = {shard: manifests[0] for shard in self.tars}
        else:
            pattern = r"manifest[^/]*_(\d+)[^/]*\.json"
            self.manifests = {_shard_number(m, pattern): m for m in manifests}
        if set(self.manifests) != set(self.tars):
            raise ValueError(f"tarred data: the shard numbers of the manifests "
                             f"{sorted(self.manifests)} and of the tars {sorted(self.tars)} differ")
        self.skipped, self.shuffle, self.seed = skipped, shuffle, seed
        self.slice_length = slice_length
        self.epoch = 0

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        shards = sorted(self.tars)
        if self.shuffle:
            rng.shuffle(shards)
        for shard in shards:
            rows = {}  # member name -> its lines
            for _, row in _json_lines(Path(self.manifests[shard])):
                if not self.one_manifest or row.get("shard_id", shard) == shard:
                    member = re.sub(r"-sub\d+(?=\.\w+$|$)", "", row["audio_filepath"])
                    rows.setdefault(member, []).append(row)
            first = 0
            if self.slice_length and self.slice_length < len(rows):
                first = rng.randint(0, len(rows) - self.slice_length)
            yield from self._shard(self.tars[shard], rows, first)

    def _shard(self, tar_path, rows, first):
        with tarfile.open(tar_path, mode="r|*") as tar:
            for i, member in enumerate(tar):
                if i < first or not member.isfile():
                    continue
                if self.slice_length and i >= first + self.slice_length:
                    break
                if member.name not in rows:
                    raise ValueError(f"{tar_path}: member {member.name} has no manifest line")
                data = tar.extractfile(member).read()
                try:
                    recording = Recording.from_bytes(data, recording_id=member.name)
                except Exception as e:  # lhotse/soundfile raise many types for corrupt audio
                    error = AudioError.unreadable(f"{member.name} in {tar_path}", e)
                    self.skipped.add(UNREADABLE, member.name, str(error))
                    continue
                for row in sorted(rows[member.name], key=lambda r: r["audio_filepath"]):
                    if row.get("_skipme"):
                        continue
                    offset = row.get("offset") or 0.0
                    duration = min(row.get("duration") or math.inf, recording.duration - offset)
                    cut = recording.to_cut().truncate(offset=offset, duration=duration)
                    yield _with_manifest_fields(cut.with_id(row["audio_filepath"]), row)


def expand_sharded_paths(spec) -> list[str]:
    """NeMo's sharded paths: `_OP_0..9_CL_` or `{0..9}` (zero padding kept), `{a,b}`; lists as is.
    Unlike NeMo, (), [] and <> stay what they are, so such paths need no escaping."""
    if isinstance(spec, (list, tuple)):
        return [str(p) for p in spec]
    text = str(spec).replace("_OP_", "{").replace("_CL_", "}")
    brace = re.search(r"\{([^{}]*)\}", text)
    if not brace:
        return [text]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", brace[1])
    choices = ([str(i).zfill(len(span[1])) for i in range(int(span[1]), int(span[2]) + 1)] if span
               else brace[1].split(","))
    head, tail = text[:brace.start()], text[brace.end():]
    return [path for choice in choices for path in expand_sharded_paths(head + choice + tail)]


def _shard_number(path: str, pattern: str) -> int:
    found = re.search(pattern, path)
    if not found:
        raise ValueError(f"tarred data: cannot tell the shard number of {path} (NeMo's names: "
                         "audio_N.tar, manifest_N.json)")
    return int(found[1])


def _with_manifest_fields(cut: Cut, row: dict) -> Cut:
    """A cut with the transcript of a NeMo manifest line and the line's other keys in cut.custom."""
    cut.supervisions = [SupervisionSegment(id=cut.id, recording_id=cut.recording_id, start=0.0,
                                           duration=cut.duration, text=row.get("text", ""),
                                           language=row.get("lang"))]
    skip = {"audio_filepath", "duration", "offset", "sampling_rate", "sample_rate", "_skipme"}
    cut.custom = {k: v for k, v in row.items() if k not in skip} or None
    return cut


class _MultimodalJsonl:
    """NeMo's multimodal conversation JSON lines: {"id", "conversations": [{"from", "type", ...}]}.
    As in NeMo, tags.context comes first when the conversation starts with the user's audio, and
    tags.system_prompt before that unless it starts with a system turn."""

    def __init__(self, path, skipped, tags=None):
        self.path, self.skipped, self.tags = Path(path), skipped, tags or {}

    def __iter__(self):
        for i, row in _json_lines(self.path):
            if (row.get("custom") or {}).get("_skipme"):
                continue
            example_id = str(row.get("id", f"{self.path.stem}-{i}"))
            try:
                turns = [self._turn(turn, f"{example_id}-{j}")
                         for j, turn in enumerate(row["conversations"])]
            except AudioError as e:
                self.skipped.add(UNREADABLE, example_id, str(e))
                continue
            starts_with_audio = turns[0].role == "user" and turns[0].audio is not None
            if self.tags.get("context") is not None and starts_with_audio:
                turns.insert(0, Turn("user", text=self.tags["context"]))
            if self.tags.get("system_prompt") is not None and turns[0].role != "system":
                turns.insert(0, Turn("system", text=self.tags["system_prompt"]))
            yield Conversation(example_id, turns, dict(row.get("custom") or {}))

    def _turn(self, turn, cut_id):
        role = turn["from"].lower()
        if turn.get("type", "text") != "audio":
            return Turn(role, text=turn["value"])
        path = _resolve_path(turn["value"], self.path)
        audio = _audio_cut(cut_id, path, turn.get("duration"), turn.get("offset", 0.0))
        return Turn(role, audio=audio)


def _json_lines(path):
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i + 1} is not valid JSON: {e.msg}") from None


_warned = set()  # the items this process named in a warning


def _warn(item_id: str, warning: str) -> None:
    if item_id in _warned or len(_warned) >= MAX_WARNINGS:
        return
    _warned.add(item_id)
    more = " (further unreadable items are only counted)" if len(_warned) == MAX_WARNINGS else ""
    tqdm.write(f"warning: skipped {warning}{more}", file=sys.stderr)


def _audio_cut(cut_id, path, duration, offset):
    """A cut over (part of) an audio file and all its channels (mixed to mono when loaded, as NeMo's
    SALM data does); the file header gives its true sampling rate and length."""
    recording = _read_recording(path, cut_id)
    longest = recording.duration - offset
    duration = longest if duration is None else min(duration, longest)
    return fastcopy(recording.to_cut(), id=cut_id, start=offset, duration=duration)


def _read_recording(path, recording_id=None) -> Recording:
    if not Path(path).is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        return Recording.from_file(path, recording_id=recording_id)
    except Exception as e:  # soundfile and lhotse raise many types for unreadable files
        raise AudioError.unreadable(f"audio file {path}", e) from None


def _resolve_path(value, manifest_path):
    path = Path(value)
    if not path.is_absolute() and (manifest_path.parent / path).exists():
        return manifest_path.parent / path
    return path


class DemoConversations:
    """Lazily rendered demo conversations (see `read_duplex_demo`), laid out at construction."""

    def __init__(self, shar_path: str | Path, seed: int):
        by_pair = {}
        for cut in CutSet.from_shar(in_dir=str(shar_path)):
            custom = cut.custom or {}
            if custom.get("role") in ("user", "agent") and custom.get("pair_id"):
                by_pair.setdefault(custom["pair_id"], {})[custom["role"]] = cut
        pair_ids = sorted(p for p, roles in by_pair.items() if len(roles) == 2)
        if not pair_ids:
            raise ValueError(f"{shar_path} holds no question/answer pairs (cuts with custom "
                             "pair_id and role user/agent); duplex_demo expects the demo "
                             "qa_train/qa_val data")
        rng = random.Random(seed)
        rng.shuffle(pair_ids)
        self.conversations = []  # (id, [(utterance cut, start seconds)], duration seconds)
        first = 0
        while first < len(pair_ids):
            group = pair_ids[first : first + rng.choice(DEMO_PAIRS_PER_CONVERSATION)]
            first += len(group)
            placed, t = [], rng.uniform(*DEMO_LEAD_IN)
            for pair_id in group:
                question, answer = by_pair[pair_id]["user"], by_pair[pair_id]["agent"]
                placed.append((question, t))
                t += question.duration + rng.uniform(*DEMO_ANSWER_DELAY)
                placed.append((answer, t))
                t += answer.duration + rng.uniform(*DEMO_NEXT_DELAY)
            self.conversations.append((f"conv-{group[0]}-{len(group)}", placed, t))

    def __iter__(self):
        for conversation_id, placed, duration in self.conversations:
            yield _render_conversation(conversation_id, placed, duration)


def _render_conversation(conversation_id: str, placed: list, duration: float) -> MonoCut:
    """Place each utterance on its channel (user or agent) and return the conversation cut."""
    sample_rate = placed[0][0].sampling_rate
    num_samples = round(duration * sample_rate)
    channels = {role: np.zeros(num_samples, np.float32) for role in ("user", "agent")}
    supervisions = []
    for i, (utterance, start) in enumerate(placed):
        role = utterance.custom["role"]
        samples = utterance.load_audio()[0]
        offset = round(start * sample_rate)
        channels[role][offset : offset + len(samples)] = samples[: num_samples - offset]
        supervisions.append(SupervisionSegment(
            id=f"{conversation_id}-{i}", recording_id=conversation_id, start=offset / sample_rate,
            duration=len(samples) / sample_rate, text=utterance.supervisions[0].text, speaker=role,
        ))
    recording = _flac_recording(channels["user"], sample_rate, conversation_id)
    target_audio = _flac_recording(channels["agent"], sample_rate, f"{conversation_id}-agent")
    return MonoCut(conversation_id, start=0.0, duration=recording.duration, channel=0,
                   recording=recording, supervisions=supervisions,
                   custom={"target_audio": target_audio})


def _flac_recording(samples: np.ndarray, sample_rate: int, recording_id: str) -> Recording:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return Recording.from_bytes(buffer.getvalue(), recording_id=recording_id)
