"""Synthesize the demo speech data shipped in assets/demo/.

The demo data lets every config run offline: a small-vocabulary English grammar (numbers, colors,
objects, commands, questions) spoken by espeak-ng in several voices, rates and pitches, small enough
for a tiny model to learn on a CPU in minutes. Everything is deterministic, so running the script
again gives the same transcripts and, with the same espeak-ng and libopus, the same audio.

    python scripts/make_demo_data.py                      # rewrites assets/demo/
    python scripts/make_demo_data.py --out /tmp/d --limit 5

Output, four lhotse Shar directories with Opus audio at 16 kHz in gzip'd tars:
    asr_train/, asr_val/  one utterance per cut, transcript in its supervision, speaker = voice;
                          asr_train adds more utterances of any non-validation sentence;
    qa_train/, qa_val/    question (role "user", many voices) and answer (role "agent", one voice)
                          cuts, paired by cut.custom["pair_id"]; each is also a plain ASR cut.
No sentence (question, answer or ASR utterance) occurs in both a train and a validation split, and
every validation word occurs in training.
"""

import argparse
import gzip
import io
import itertools
import json
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from lhotse import MonoCut, Recording, SupervisionSegment, fastcopy
from lhotse.shar.utils import to_shar_placeholder
from lhotse.shar.writers import JsonlShardWriter, TarWriter
from scipy.signal import resample_poly

SEED = 2024
ESPEAK_SAMPLE_RATE = 22050
SAMPLE_RATE = 16000
RESAMPLE_UP, RESAMPLE_DOWN = 320, 441  # 22050 * 320 / 441 = 16000
SILENCE_THRESHOLD = 0.01  # of the peak: samples below it at either end count as silence
EDGE_PAD = int(0.05 * SAMPLE_RATE)  # silence kept before and after the speech
PEAK_LEVEL = 0.95
# libsndfile's Opus compression level (0 = 256 kbit/s ... 1 = 6 kbit/s): 0.97 is about 14 kbit/s,
# which with gzip'd tars stores a second of speech in about 1.8 kB (7-bit FLAC took 7 kB).
OPUS_COMPRESSION = 0.97

# espeak-ng voice = language[+variant]; all exist in Debian's espeak-ng-data.
USER_VOICES = (
    "en-us", "en-us+f2", "en-us+m3", "en-us+f4", "en-us+klatt4",
    "en", "en+f5", "en+m7", "en+klatt",
    "en-gb-x-rp+m2", "en-gb-scotland+f1", "en-029+m4", "en-us-nyc+f5",
    "en-gb-x-gbclan+m6", "en-gb-x-gbcwmd+f2", "en-us+m1",
)
AGENT_VOICE = "en-us+f3"
AGENT_RATE, AGENT_PITCH = 175, 50
USER_RATES = (150, 165, 180, 195, 210)  # words per minute
USER_PITCHES = (30, 40, 50, 60, 70)

NUM_ASR = {"train": 400, "val": 60}
# More train utterances, drawn after everything else: any sentence outside validation, new voices.
# The demo's held-out WER is set by how much speech it hears (400 alone: 21-28%; 2800: 5-8%).
NUM_ASR_TRAIN_EXTRA = 2400
# share of the ASR utterances per template (pools range from 19 to 1188 sentences)
TEMPLATE_WEIGHTS = {
    "switch": 6, "open": 5, "pick": 6, "put": 7, "move": 5, "give": 7, "timer": 1, "count": 3,
    "digits": 8, "state": 6, "see": 7, "where": 5, "how_many": 6, "is_it": 6,
}
NUM_QA = {"train": 160, "val": 30}  # question/answer pairs
# cuts per shard; pairs never straddle QA shards
SHARD_SIZE = {"asr_train": 400, "asr_val": 100, "qa_train": 80, "qa_val": 100}

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
COLORS = "red green blue yellow white black orange purple pink brown gray".split()
THINGS = {  # singular -> plural
    "ball": "balls", "box": "boxes", "cup": "cups", "book": "books", "chair": "chairs",
    "key": "keys", "hat": "hats", "bag": "bags", "car": "cars", "shoe": "shoes", "pen": "pens",
    "plate": "plates",
}
DEVICES = "light lamp fan radio heater music".split()
OPENABLE = "door window box bag book".split()
PLACES = "table chair floor shelf bed desk".split()
SIDES = "left right".split()
COLOR_FACTS = {
    "sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black",
    "banana": "yellow", "tomato": "red", "milk": "white", "coal": "black", "leaf": "green",
    "sea": "blue", "lemon": "yellow", "cherry": "red", "carrot": "orange", "plum": "purple",
    "grape": "purple", "mouse": "gray", "elephant": "gray", "pig": "pink", "chocolate": "brown",
    "bear": "brown", "strawberry": "red", "cloud": "white", "frog": "green", "orange": "orange",
}
OPPOSITES = {"on": "off", "off": "on", "open": "closed", "closed": "open", "left": "right",
             "right": "left", "up": "down", "down": "up", "big": "small", "small": "big",
             "hot": "cold", "cold": "hot", "yes": "no", "no": "yes", "black": "white",
             "white": "black"}


@dataclass(frozen=True)
class Utterance:
    cut_id: str
    text: str
    voice: str
    rate: int
    pitch: int
    speaker: str  # the voice name for ASR cuts, "user"/"agent" for QA cuts
    pair_id: str | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "assets" / "demo")
    parser.add_argument("--limit", type=int, default=None,
                        help="synthesize only the first N utterances (QA: pairs) of each split, "
                             "as in a full run")
    args = parser.parse_args()
    check_espeak()
    splits = build_splits()
    if args.limit is not None:
        splits = {name: utts[: args.limit * (2 if name.startswith("qa") else 1)]
                  for name, utts in splits.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, utts in splits.items():
        cuts = [make_cut(u) for u in utts]
        shar_dir = args.out / name
        shutil.rmtree(shar_dir, ignore_errors=True)
        shar_dir.mkdir()
        write_shar(cuts, shar_dir, SHARD_SIZE[name])
        stats[name] = (len(cuts), sum(c.duration for c in cuts), min(c.duration for c in cuts),
                       max(c.duration for c in cuts))
        print(f"{name}: {stats[name][0]} cuts, {stats[name][1] / 3600:.3f} h")
    (args.out / "README.md").write_text(render_readme(stats, args.out))
    print(f"wrote {args.out} ({directory_bytes(args.out)} bytes)")


# --------------------------------------------------------------------------------------------------
# Grammar

def asr_templates() -> dict[str, list[str]]:
    """Every sentence of each ASR template, sorted, so sampling from them is deterministic."""
    def things(fmt: str) -> list[str]:
        return [fmt.format(c=c, t=t) for c, t in itertools.product(COLORS, THINGS)]

    templates = {
        "switch": [f"turn {s} the {c} {d}" for s in ("on", "off") for c in COLORS for d in DEVICES]
                  + [f"turn {s} the {d}" for s in ("on", "off") for d in DEVICES],
        "open": [f"{v} the {c} {o}" for v in ("open", "close") for c in COLORS for o in OPENABLE],
        "pick": things("pick up the {c} {t}") + things("show me the {c} {t}"),
        "put": [f"put the {c} {t} on the {p}"
                for c, t, p in itertools.product(COLORS, THINGS, PLACES)],
        "move": [f"move the {c} {t} to the {s}"
                 for c, t, s in itertools.product(COLORS, THINGS, SIDES)],
        "give": [f"give me {n} {c} {THINGS[t]}"
                 for n, c, t in itertools.product(NUMBERS[2:11], COLORS, THINGS)],
        "timer": [f"set a timer for {n} minutes" for n in NUMBERS[2:]],
        "count": [f"count from {a} to {b}" for a, b in itertools.combinations(NUMBERS[:11], 2)],
        "digits": [" ".join(d) for d in itertools.product(NUMBERS[:10], repeat=3)],
        "state": things("the {t} is {c}")
                 + [f"the {t} is on the {p}" for t, p in itertools.product(THINGS, PLACES)],
        "see": [f"i see {n} {c} {THINGS[t]}"
                for n, c, t in itertools.product(NUMBERS[2:11], COLORS, THINGS)],
        "where": things("where is the {c} {t}"),
        "how_many": [f"how many {c} {THINGS[t]} are on the {p}"
                     for c, t, p in itertools.product(COLORS, THINGS, PLACES)],
        "is_it": [f"is the {c} {t} on the {p}"
                  for c, t, p in itertools.product(COLORS, THINGS, PLACES)],
    }
    return {name: sorted(set(sentences)) for name, sentences in templates.items()}


def qa_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs whose answer follows from the question, sorted by question."""
    value = {word: i for i, word in enumerate(NUMBERS)}
    pairs = []
    for a, b in itertools.product(NUMBERS[:11], repeat=2):
        if value[a] + value[b] <= 20:
            pairs.append((f"what is {a} plus {b}",
                          f"{a} plus {b} is {NUMBERS[value[a] + value[b]]}"))
        if value[a] >= value[b]:
            pairs.append((f"what is {a} minus {b}",
                          f"{a} minus {b} is {NUMBERS[value[a] - value[b]]}"))
        if 0 < value[a] * value[b] <= 20:
            pairs.append((f"what is {a} times {b}",
                          f"{a} times {b} is {NUMBERS[value[a] * value[b]]}"))
        if value[a] != value[b]:
            big, small = (a, b) if value[a] > value[b] else (b, a)
            pairs.append((f"which is bigger {a} or {b}", f"{big} is bigger than {small}"))
    for n in range(20):
        pairs.append((f"what number comes after {NUMBERS[n]}",
                      f"{NUMBERS[n + 1]} comes after {NUMBERS[n]}"))
        pairs.append((f"what number comes before {NUMBERS[n + 1]}",
                      f"{NUMBERS[n]} comes before {NUMBERS[n + 1]}"))
    for thing, color in COLOR_FACTS.items():
        pairs.append((f"what color is the {thing}", f"the {thing} is {color}"))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"what is the opposite of {word}", f"the opposite of {word} is {opposite}"))
    return sorted(set(pairs))


def build_splits() -> dict[str, list[Utterance]]:
    """Choose train and validation sentences, then a voice, rate and pitch for each utterance.

    Train sentences are drawn first (ASR and QA); validation then draws from what is left, keeping
    only sentences whose words all occur in training. Every random choice is made here, before any
    audio exists, so a shorter run (--limit) speaks the same first items as the full run.
    """
    rng = random.Random(SEED)
    templates = asr_templates()
    pairs = qa_pairs()
    rng.shuffle(pairs)
    qa_train = pairs[: NUM_QA["train"]]
    per_template = {split: allocate(NUM_ASR[split], TEMPLATE_WEIGHTS) for split in ("train", "val")}
    asr_train, leftovers = [], []
    for name, sentences in templates.items():
        sentences = list(sentences)
        rng.shuffle(sentences)
        asr_train += sentences[: per_template["train"][name]]
        leftovers.append((name, sentences[per_template["train"][name]:]))

    train_texts = set(asr_train) | {t for pair in qa_train for t in pair}
    train_vocab = {w for text in train_texts for w in text.split()}

    def known(text: str) -> bool:
        return text not in train_texts and set(text.split()) <= train_vocab

    asr_val = []
    for name, sentences in leftovers:
        asr_val += [s for s in sentences if known(s)][: per_template["val"][name]]
    qa_val = [p for p in pairs[NUM_QA["train"]:] if known(p[0]) and known(p[1])][: NUM_QA["val"]]
    if len(asr_val) < NUM_ASR["val"] or len(qa_val) < NUM_QA["val"]:
        raise RuntimeError("the grammar is too small for the requested validation sizes")

    def spoken(cut_id: str, text: str) -> Utterance:
        voice = rng.choice(USER_VOICES)
        return Utterance(cut_id, text, voice, rng.choice(USER_RATES), rng.choice(USER_PITCHES),
                         voice)

    splits = {}
    for split, sentences in (("train", asr_train), ("val", asr_val)):
        rng.shuffle(sentences)
        splits[f"asr_{split}"] = [spoken(f"asr-{split}-{i:04d}", text)
                                  for i, text in enumerate(sentences)]
    for split, chosen in (("train", qa_train), ("val", qa_val)):
        splits[f"qa_{split}"] = []
        for i, (question, answer) in enumerate(chosen):
            pair_id = f"qa-{split}-{i:04d}"
            splits[f"qa_{split}"] += [
                Utterance(f"{pair_id}-user", question, rng.choice(USER_VOICES),
                          rng.choice(USER_RATES), rng.choice(USER_PITCHES), "user", pair_id),
                Utterance(f"{pair_id}-agent", answer, AGENT_VOICE, AGENT_RATE, AGENT_PITCH,
                          "agent", pair_id),
            ]
    val_texts = set(asr_val) | {text for pair in qa_val for text in pair}
    pools = {name: [s for s in sentences if s not in val_texts]
             for name, sentences in templates.items()}
    extra = [rng.choice(pools[name])
             for name, count in allocate(NUM_ASR_TRAIN_EXTRA, TEMPLATE_WEIGHTS).items()
             for _ in range(count)]
    rng.shuffle(extra)
    splits["asr_train"] += [spoken(f"asr-train-{i:04d}", text)
                            for i, text in enumerate(extra, start=len(asr_train))]
    return splits


def allocate(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split total in proportion to weights, largest remainders first: the counts sum to total."""
    exact = {name: total * w / sum(weights.values()) for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Audio

def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech, 16 kHz int16 samples: trimmed and peak-normalised."""
    command = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(command, capture_output=True, check=True).stdout
    samples, sample_rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert sample_rate == ESPEAK_SAMPLE_RATE, f"espeak-ng gave {sample_rate} Hz"
    audio = resample_poly(samples.astype(np.float64) / 32768, RESAMPLE_UP, RESAMPLE_DOWN)
    loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD * np.abs(audio).max())
    audio = audio[max(loud[0] - EDGE_PAD, 0): loud[-1] + EDGE_PAD + 1]
    return np.round(audio / np.abs(audio).max() * PEAK_LEVEL * 32767).astype(np.int16)


def make_cut(utt: Utterance) -> MonoCut:
    buffer = io.BytesIO()
    sf.write(buffer, synthesize(utt.text, utt.voice, utt.rate, utt.pitch), SAMPLE_RATE,
             format="OGG", subtype="OPUS", compression_level=OPUS_COMPRESSION)
    cut = Recording.from_bytes(buffer.getvalue(), recording_id=utt.cut_id).to_cut()
    cut.supervisions = [SupervisionSegment(id=utt.cut_id, recording_id=utt.cut_id, start=0.0,
                                           duration=cut.duration, text=utt.text,
                                           speaker=utt.speaker, language="en")]
    if utt.pair_id is not None:
        cut.custom = {"pair_id": utt.pair_id, "role": utt.speaker, "voice": utt.voice}
    return cut


def write_shar(cuts: list[MonoCut], shar_dir: Path, shard_size: int) -> None:
    """A lhotse Shar directory that keeps our Opus bytes (CutSet.to_shar would decode and re-encode
    them at its own bitrate), its tars gzip'd: the tar headers weigh more than the speech."""
    with TarWriter(str(shar_dir / "recording.%06d.tar.gz"), shard_size) as tar, \
            JsonlShardWriter(str(shar_dir / "cuts.%06d.jsonl.gz"), shard_size) as manifest:
        for cut in cuts:
            placeholder = to_shar_placeholder(cut.recording, cut)
            tar.write(f"{cut.id}.opus", io.BytesIO(cut.recording.sources[0].source))
            tar.write(f"{cut.id}.json", io.BytesIO(json.dumps(placeholder.to_dict()).encode()),
                      count=False)
            manifest.write(fastcopy(cut, recording=placeholder))
    for path in shar_dir.glob("*.gz"):  # gzip stamps the write time; zero it for identical reruns
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), mtime=0))


def check_espeak() -> None:
    try:
        languages = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True,
                                   check=True).stdout
        variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True,
                                  check=True).stdout
    except FileNotFoundError:
        raise SystemExit("espeak-ng is not installed: install it (apt-get install espeak-ng) to "
                         "regenerate the demo data; the shipped assets/demo/ does not need it") \
            from None
    known = {line.split()[1] for line in languages.splitlines()[1:]}
    known_variants = {line.split()[4].removeprefix("!v/") for line in variants.splitlines()[1:]}
    for voice in (*USER_VOICES, AGENT_VOICE):
        language, _, variant = voice.partition("+")
        if language not in known or (variant and variant not in known_variants):
            raise SystemExit(f"espeak-ng has no voice {voice!r}; see `espeak-ng --voices=en`")


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r"text-to-speech: (\S+)", out).group(1)


# --------------------------------------------------------------------------------------------------
# README

def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def render_readme(stats: dict[str, tuple[int, float, float, float]], out: Path) -> str:
    rows = "\n".join(f"| {name} | {n} | {total:.1f} | {total / 3600:.4f} | {lo:.2f} | {hi:.2f} |"
                     for name, (n, total, lo, hi) in stats.items())
    total_seconds = sum(s[1] for s in stats.values())
    shar_bytes = sum(directory_bytes(out / name) for name in stats)
    return f"""# Demo speech data

Synthetic English speech for running every config offline and for tests: a small-vocabulary grammar
(numbers zero to twenty, {len(COLORS)} colors, household objects, simple commands and \
questions) spoken
by espeak-ng {espeak_version()}. Made by `scripts/make_demo_data.py`; the shipped files need no \
espeak-ng.

| split | cuts | seconds | hours | shortest (s) | longest (s) |
|---|---|---|---|---|---|
{rows}

Total: {total_seconds:.1f} s = {total_seconds / 3600:.4f} h in {shar_bytes} bytes of Shar data.

Each directory is a lhotse Shar set (`CutSet.from_shar(in_dir=...)`): `cuts.*.jsonl.gz` and
`recording.*.tar.gz` with 16 kHz mono Opus at libsndfile's compression level \
{OPUS_COMPRESSION} (about 14 kbit/s),
about 1.8 kB per second of speech with the tars gzip'd: four times the speech per megabyte of \
7-bit FLAC.

- `asr_train`, `asr_val`: commands, statements, digit strings and questions; one supervision per \
cut with
  the lower-case transcript, `speaker` = the espeak-ng voice, `language` = "en". `asr_train`'s \
first
  {NUM_ASR["train"]} cuts are distinct sentences; the other {NUM_ASR_TRAIN_EXTRA} speak any \
sentence outside validation in new voices.
- `qa_train`, `qa_val`: spoken question/answer pairs for the duplex models. The question cut
  (`speaker` "user") is spoken by one of the user voices, the answer cut (`speaker` "agent") \
always by
  `{AGENT_VOICE}` at {AGENT_RATE} words/min; both carry `custom = {{"pair_id", "role", "voice"}}`.
  Question and answer cuts are ordinary transcribed utterances too, usable as extra ASR data.
- No sentence occurs in both a train and a validation split; every validation word occurs in \
training.

User voices (rates {", ".join(map(str, USER_RATES))} words/min, \
pitches {", ".join(map(str, USER_PITCHES))}):
{", ".join(f"`{v}`" for v in USER_VOICES)}.

Regenerate (deterministic: the same espeak-ng and libopus give the same files), then retrain the \
tiny LLM's
tokenizer, which learns these transcripts:

    python scripts/make_demo_data.py
    python scripts/make_tiny_llm.py

`--out DIR --limit N` writes only the first N utterances (QA: pairs) of each split elsewhere, \
as a quick check.
"""


if __name__ == "__main__":
    main()
