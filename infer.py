"""Use a trained model: export it, generate with it, score it, have a duplex model answer speech.

    python infer.py export   --model runs/salm --out exports/salm [--dtype bfloat16]
    python infer.py generate --model exports/salm --inputs assets/demo/asr_val [--user-prompt ...]
    python infer.py evaluate --model runs/salm --inputs assets/demo/asr_val more.jsonl
    python infer.py duplex   --model runs/s2s_duplex --audio question.wav --out answer/
    python infer.py stream   --model runs/s2s_duplex --audio question.wav --out live/ [--realtime]

--model: an export directory (save_pretrained) or a train.py checkpoint (.ckpt file or run dir); for
SALM also NeMo's: a Lightning .ckpt or an HF-style export (config.json + model.safetensors).
--inputs, one dataset each, named after its file or directory: lhotse Shar directories or cut
manifests (.jsonl.gz), NeMo ASR manifests ({"audio_filepath", "duration", "text"} lines), NeMo
conversation manifests ({"id", "conversations"} lines), YAML `input_cfg` lists, or audio files (all
in the dataset "audio"). ASR items, prompted with their `context` (a manifest key, or tags) or else
NeMo salm_eval's "Repeat after me, typing in lowercase." (--user-prompt replaces it; '' for none),
are written as {"id", "duration", "text", "pred_text", "prompt"} lines; conversations are written
back with the generated turn in place of the last assistant turn. "prompt": the model's input.
generate and evaluate run SALM, duplex and stream the duplex models; export takes all three. stream
feeds the recording to a live session 80 ms at a time (--realtime: at the pace of speech) and writes
agent.wav (on the user's time axis), timeline.jsonl, timeline.svg and summary.json.
Metrics (metrics.py): WER and BLEU after Whisper's text normalizer, per dataset and their mean.
"""
import argparse
import gzip
import json
import os
import statistics
import sys
import time
from html import escape
from pathlib import Path

import numpy as np
import soundfile
import torch
from lhotse.cut import Cut
from tqdm import tqdm

from checkpoint import DTYPES, load_model
from config import cli
from data import load_audio, load_audio_files
from duplex_s2s import DuplexS2SModel
from manifests import (UNREADABLE, AudioError, Conversation, Skipped, Turn, audio_file_cut,
                       cut_to_conversation, read_inputs)
from metrics import NORMALIZER, bleu, metrics_by_dataset, wer_details
from salm import DEFAULT_ASR_PROMPT, SALM, answer
from train import model_class

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".sph")
AGENT_PEAK = 0.9  # agent speech beyond full scale (an untrained codec's) is scaled to this peak


def main(argv: list[str] | None = None) -> dict | None:
    """Run a subcommand; returns evaluate's metrics or stream's summary (for tests, notebooks)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "export directory or train.py checkpoint (.ckpt or run dir)"
    export_cmd = commands.add_parser("export", help="checkpoint -> self-contained export directory")
    export_cmd.add_argument("--model", required=True, help=model_help)
    export_cmd.add_argument("--out", required=True, help="the export directory to write")
    export_cmd.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: float32)")
    export_cmd.add_argument("--merge-lora", action="store_true",
                            help="fold LoRA adapters into the LLM weights")
    for name in ("generate", "evaluate"):
        cmd = commands.add_parser(name, help="SALM answers to every input"
                                  + " + WER or BLEU" * (name[0] == "e"))
        cmd.add_argument("--model", required=True, help=model_help)
        cmd.add_argument("--inputs", required=True, nargs="+",
                         help="datasets: Shar dirs, manifests, audio files")
        cmd.add_argument("--output-dir", default="generations",
                         help="one <dataset>.jsonl per dataset goes here")
        cmd.add_argument("--system-prompt", help="a system turn put first in every conversation")
        cmd.add_argument("--user-prompt",
                         help=f"user text before the audio (ASR default: '{DEFAULT_ASR_PROMPT}')")
        cmd.add_argument("--batch-size", type=int, default=16,
                         help="items per batch (sorted by duration)")
        cmd.add_argument("--max-new-tokens", type=int, default=128)
        if name == "evaluate":
            cmd.add_argument("--metric", choices=("auto", "wer", "bleu"), default="auto",
                             help="auto: WER for ASR inputs, BLEU for conversations")
    duplex_cmd = commands.add_parser(
        "duplex", help="a duplex model answers a recording: agent.wav, agent.txt")
    duplex_cmd.add_argument("--model", required=True, help=model_help)
    duplex_cmd.add_argument("--audio", required=True,
                            help="the user's side of the conversation (any rate)")
    duplex_cmd.add_argument("--out", required=True, help="output directory")
    stream_cmd = commands.add_parser("stream", help="a live duplex session over a recording")
    stream_cmd.add_argument("--model", required=True, help=model_help)
    stream_cmd.add_argument("--audio", required=True, help="the user's side (any sample rate)")
    stream_cmd.add_argument("--out", required=True, help="output directory")
    stream_cmd.add_argument("--realtime", action="store_true",
                            help="feed 80 ms every 80 ms (default: as fast as it goes)")
    stream_cmd.add_argument("--threads", type=int, default=1,
                            help="torch CPU threads (default 1: a step's operations are too small "
                            "to share, and spinning threads on busy cores stall it)")
    for cmd in (*commands.choices.values(),):
        if cmd is not export_cmd:
            cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
            cmd.add_argument("--dtype", choices=DTYPES, help="inference dtype (default: as saved)")
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.dtype)

    if args.command == "export":
        export(args.model, args.out, dtype, args.merge_lora)
        return None
    model = load_model(args.model, model_class, dtype).to(args.device)
    wanted = DuplexS2SModel if args.command in ("duplex", "stream") else SALM
    if not isinstance(model, wanted):
        raise ValueError(f"{args.model} is a {type(model).__name__}; `infer.py {args.command}` "
                         f"runs a {wanted.__name__} (SALM: generate / evaluate; duplex models: "
                         "duplex / stream)")
    if args.command == "duplex":
        duplex(model, args.audio, Path(args.out))
        return None
    if args.command == "stream":
        if model.device.type == "cpu":
            torch.set_num_threads(args.threads)
        return stream(model, args.audio, Path(args.out), args.realtime)
    datasets = read_datasets(args.inputs)
    results = generate(model, datasets, args.output_dir, args.system_prompt, args.user_prompt,
                       args.batch_size, args.max_new_tokens)
    if args.command == "evaluate":
        return evaluate(results, args.metric, Path(args.output_dir))
    return None


def export(model_path: str | Path, out: str | Path, dtype: torch.dtype | None = None,
           merge_lora: bool = False):
    """Checkpoint (or export) -> a self-contained export directory, optionally cast, LoRA merged."""
    model = load_model(model_path, model_class)
    if merge_lora:
        model.merge_lora()
    model.save_pretrained(out, dtype)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"exported {type(model).__name__} to {out} ({size / 2**20:.1f} MiB"
          f"{', ' + str(dtype).removeprefix('torch.') if dtype else ''}"
          f"{', LoRA merged' if merge_lora else ''})")
    return model


# ----------------------------------------------------------------------------------------------
# inputs

def read_datasets(inputs: list[str]) -> dict[str, tuple[list, Skipped]]:
    """Each input -> its name: (lhotse cuts or Conversations, a Skipped of what reading dropped)."""
    datasets = {}
    for spec in inputs:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--inputs {spec}: no such file or directory")
        if path.suffix.lower() in AUDIO_SUFFIXES:
            try:
                datasets.setdefault("audio", ([], Skipped()))[0].append(audio_file_cut(path))
            except AudioError as e:
                raise ValueError(f"--inputs {spec}: {e}") from None
            continue
        name = path.name.split(".")[0] or path.name
        name = name if name not in datasets else f"{name}_{len(datasets)}"
        skipped = Skipped()
        items = list(read_inputs({"input_cfg": _input_cfg(path)}, train=False, skipped=skipped))
        if not items:
            raise ValueError(f"--inputs {spec}: holds no items ({_skips(skipped)})")
        datasets[name] = items, skipped
    return datasets


def _input_cfg(path: Path) -> list[dict] | str:
    if path.is_dir():
        return [{"type": "lhotse_shar", "shar_path": str(path)}]
    if path.suffix in (".yaml", ".yml"):
        return str(path)  # a NeMo input_cfg file (data.py reads it)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise ValueError(f"--inputs {path}: not JSON lines, a Shar directory, a YAML input_cfg "
                         "or audio") from None
    if "conversations" in row:
        return [{"type": "multimodal_conversation", "manifest_filepath": str(path)}]
    if "audio_filepath" in row:
        return [{"type": "nemo", "manifest_filepath": str(path)}]
    return [{"type": "lhotse", "cuts_path": str(path)}]


def prompt_and_reference(item, system_prompt: str | None,
                         user_prompt: str | None) -> tuple[Conversation, str | None]:
    """The conversation to answer (last assistant turn cut, prompts added) and that turn's text."""
    conversation = item if isinstance(item, Conversation) else cut_to_conversation(item)
    turns, reference = list(conversation.turns), None
    if turns and turns[-1].role == "assistant":
        reference = turns.pop().text
    if user_prompt is None and isinstance(item, Cut) and not (item.custom or {}).get("context"):
        user_prompt = DEFAULT_ASR_PROMPT
    if user_prompt:
        turns.insert(next((i for i, t in enumerate(turns) if t.role != "system"), len(turns)),
                     Turn("user", user_prompt))
    if system_prompt:
        turns = [Turn("system", system_prompt)] + [t for t in turns if t.role != "system"]
    return Conversation(conversation.id, turns, conversation.custom), reference


# ----------------------------------------------------------------------------------------------
# generation

def generate(model, datasets: dict[str, tuple[list, Skipped]], output_dir: str | Path,
             system_prompt: str | None = None, user_prompt: str | None = None, batch_size: int = 16,
             max_new_tokens: int = 128) -> dict[str, tuple[list, Skipped]]:
    """Answer every item, longest first in batches; write `output_dir/<dataset>.jsonl`; print
    tokens/s and RTFx. Per dataset: ([(record, reference, hypothesis)], its Skipped, updated)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (items, skipped) in datasets.items():
        items = sorted(items, key=lambda item: item.duration, reverse=True)
        rows, audio_seconds, num_tokens, seconds = [], 0.0, 0, 0.0
        progress = tqdm(total=len(items), desc=name, unit="item", dynamic_ncols=True,
                        file=sys.stderr)
        for start in range(0, len(items), batch_size):
            batch, conversations, references, audios = [], [], [], []
            for item in items[start : start + batch_size]:
                conversation, reference = prompt_and_reference(item, system_prompt, user_prompt)
                try:
                    clips = [load_audio(cut, model.sampling_rate)
                             for cut in conversation.audio_cuts]
                except AudioError as e:
                    skipped.add(UNREADABLE, item.id, str(e))
                    continue
                batch.append(item)
                conversations.append(conversation)
                references.append(reference)
                audios += clips
            if batch:
                tic = time.perf_counter()
                prompts = [c.prompt_turns(model.audio_locator_tag) for c in conversations]
                hypotheses, tokens = answer(model, prompts, audios, max_new_tokens)
                seconds += time.perf_counter() - tic
                num_tokens += tokens
                audio_seconds += sum(len(a) for a in audios) / model.sampling_rate
                rendered = [model.tokenizer.decode(model.encode_dialog(p)["input_ids"])
                            for p in prompts]  # what the model read, as text
                rows += [(_record(*row), row[2], row[3])
                         for row in zip(batch, conversations, references, hypotheses, rendered)]
            progress.update(len(items[start : start + batch_size]))
        progress.close()
        path = output_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record, ensure_ascii=False, default=str) + "\n"
                                for record, _, _ in rows))
        print(f"{name}: {len(rows)} items ({_skips(skipped)}), {audio_seconds:.1f} s of audio, "
              f"{num_tokens} tokens in {seconds:.2f} s: "
              f"{num_tokens / max(seconds, 1e-9):.1f} tokens/s, "
              f"RTFx {audio_seconds / max(seconds, 1e-9):.1f} -> {path}")
        results[name] = rows, skipped
    return results


def _record(item, conversation: Conversation, reference: str | None, hypothesis: str,
            prompt: str) -> dict:
    """ASR items: NeMo salm_eval's line; conversations: NeMo's multimodal conversation with the
    answer appended. Both with "prompt": the text the model was given (audio as the locator tag)."""
    if isinstance(item, Cut):
        return {"id": item.id, "duration": round(item.duration, 3), "text": reference or "",
                "pred_text": hypothesis, "prompt": prompt}
    turns = []
    for turn in conversation.turns + [Turn("assistant", hypothesis)]:
        if turn.audio is None:
            turns.append({"from": turn.role.capitalize(), "type": "text", "value": turn.text})
            continue
        source = turn.audio.recording.sources[0]
        turns.append({"from": turn.role.capitalize(), "type": "audio",
                      "duration": round(turn.audio.duration, 3), "offset": turn.audio.start,
                      "value": source.source if source.type == "file" else turn.audio.id})
    custom = {"custom": conversation.custom} if conversation.custom else {}
    return {"id": conversation.id, "conversations": turns, **custom, "prompt": prompt}


def evaluate(results: dict[str, tuple[list, Skipped]], metric: str = "auto",
             output_dir: Path | None = None) -> dict[str, float]:
    """Print and return WER (ASR data) or BLEU (conversations) per dataset and their mean, and the
    number of items each dataset skipped (`skipped_<name>`, in no score); metrics.json too."""
    metrics, by_key, skips = {}, {}, {}
    print(f"text normalizer: {NORMALIZER}")
    for name, (rows, skipped) in results.items():
        skips[f"skipped_{name}"] = sum(skipped.counts().values())
        scored = f"over {len(rows)} items ({_skips(skipped)})"
        pairs = [(ref, hyp) for _, ref, hyp in rows if ref is not None]
        if not pairs or not any(ref.strip() for ref, _ in pairs):
            raise ValueError(f"dataset {name} has no reference texts to score against")
        is_asr = "pred_text" in rows[0][0]
        key = "wer" if metric == "wer" or (metric == "auto" and is_asr) else "txt_bleu"
        by_key.setdefault(key, {})[name] = pairs
        if key == "wer":
            d = wer_details([r for r, _ in pairs], [h for _, h in pairs])
            print(f"{name}: WER {100 * d['wer']:.2f}% (ins {100 * d['ins']:.2f}%, "
                  f"del {100 * d['del']:.2f}%, sub {100 * d['sub']:.2f}%) {scored}, "
                  f"{d['ref_words']} words")
        else:
            print(f"{name}: BLEU {bleu([r for r, _ in pairs], [h for _, h in pairs]):.2f} {scored}")
    for key, pairs in by_key.items():
        metrics.update(metrics_by_dataset(key, pairs))
        value = f"{100 * metrics[key]:.2f}%" if key == "wer" else f"{metrics[key]:.2f}"
        print(f"{key} (mean over {len(pairs)} dataset{'s' * (len(pairs) > 1)}): {value}")
    metrics.update(skips)
    if output_dir is not None:
        (output_dir / "metrics.json").write_text(
            json.dumps({**metrics, "normalizer": NORMALIZER}, indent=2) + "\n")
    return metrics


def _skips(skipped: Skipped) -> str:
    """'2 skipped: unreadable audio 2' (or '0 skipped')."""
    counts = skipped.counts()
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    return f"{sum(counts.values())} skipped" + (f": {reasons}" if reasons else "")


def duplex(model: DuplexS2SModel, audio_path: str, out: Path) -> None:
    """Answer a recording of the user: write the agent's speech and text, print time per frame."""
    audio, audio_lens = load_audio_files([audio_path], model.perception.sample_rate)
    start = time.perf_counter()
    result = model.offline_inference(audio, audio_lens)
    elapsed = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    agent = result["audio"][0, : int(result["audio_len"][0])].float().cpu()
    peak = float(agent.abs().max()) if len(agent) else 0.0
    if peak > 1.0:
        agent = agent * (AGENT_PEAK / peak)
        print(f"agent speech peaked at {peak:.1f} times full scale (an untrained codec?): scaled "
              f"to a peak of {AGENT_PEAK} instead of clipped")
    soundfile.write(out / "agent.wav", agent.numpy(), model.audio_codec.sample_rate)
    (out / "agent.txt").write_text(result["text"][0] + "\n")
    frames = int(result["tokens_len"][0])
    print(f"{frames} frames in {elapsed:.2f} s "
          f"({1000 * elapsed / max(frames, 1):.1f} ms per frame)")
    print(f"agent: {result['text'][0]}")
    print(f"wrote {out / 'agent.wav'} and {out / 'agent.txt'}")


# ----------------------------------------------------------------------------------------------
# live streaming

USER_SPEECH_DBFS = -40.0  # a user chunk louder than this (RMS) counts as speech
MIN_PAUSE_FRAMES = 3  # silent chunks after speech that end a user's turn (240 ms)


def stream(model: DuplexS2SModel, audio_path: str, out: Path, realtime: bool = False) -> dict:
    """Feed a recording to a live session chunk by chunk; write what a listener gets: agent.wav
    (each output plays while the next chunk is heard, so it starts a frame after the user's time
    0), agent.txt, timeline.jsonl (a line per frame), timeline.svg and summary.json (returned)."""
    session = model.stream(batch_size=1)
    rate, n, frame_s = model.perception.sample_rate, session.chunk_samples, session.frame_seconds
    audio = load_audio_files([audio_path], rate)[0]
    audio = torch.nn.functional.pad(audio, (0, -audio.size(1) % n))  # the last chunk made whole
    records, speech = [], [torch.zeros(model.audio_codec.samples_per_frame)]
    agent_turn, late, start = False, 0, time.perf_counter()
    for k in range(audio.size(1) // n):
        chunk = audio[:, k * n : (k + 1) * n]  # heard from k to k + 1 frames
        if realtime:  # wait until all of it has been spoken
            time.sleep(max(0.0, start + (k + 1) * frame_s - time.perf_counter()))
        tic, cpu = time.perf_counter(), time.process_time()
        text, agent = session.step(chunk)
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
        late += realtime and time.perf_counter() > start + (k + 2) * frame_s
        token = int(text[0])
        agent_turn = agent_turn or token == model.text_bos_id  # the text channel's turn: BOS .. EOS
        loudness = 10 * np.log10(max(float(chunk.square().mean()), 1e-20))
        records.append({
            "frame": k, "time": round((k + 1) * frame_s, 3), "text_id": token,
            "token": "" if token == model.text_pad_id else model.tokenizer.decode([token]),
            "user_speaking": bool(loudness > USER_SPEECH_DBFS), "agent_speaking": agent_turn,
            "compute_ms": round(1000 * wall, 3), "cpu_ms": round(1000 * cpu, 3)})
        agent_turn = agent_turn and token != model.text_eos_id
        speech.append(agent[0].cpu())
    out.mkdir(parents=True, exist_ok=True)
    agent_audio = torch.cat(speech).numpy()
    soundfile.write(out / "agent.wav", agent_audio, model.audio_codec.sample_rate)
    text = model.decode_text(torch.tensor([r["text_id"] for r in records]))
    (out / "agent.txt").write_text(text + "\n")
    (out / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    responses = response_times(records, frame_s)
    summary = {"frames": len(records), "seconds": round(len(records) * frame_s, 2),
               "realtime": realtime, "late_frames": int(late),
               **percentiles("compute_ms", [r["compute_ms"] for r in records]),
               **percentiles("cpu_ms", [r["cpu_ms"] for r in records]),
               "algorithmic_latency_ms": round(session.latency_ms, 1),
               "first_response_ms": responses[0] if responses else None, "response_ms": responses,
               "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
               "agent_text": text}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"{Path(audio_path).name}: {summary['algorithmic_latency_ms']:g} ms algorithmic "
             f"latency, {summary['compute_ms_median']:g} ms compute per {1000 * frame_s:g} ms "
             "frame (median)")
    svg = timeline_svg(audio[0].numpy(), rate, agent_audio, model.audio_codec.sample_rate, records,
                       frame_s, title)
    (out / "timeline.svg").write_text(svg)
    print(f"{len(records)} frames of {1000 * frame_s:g} ms | compute per frame: median "
          f"{summary['compute_ms_median']} ms, p99 {summary['compute_ms_p99']} ms (CPU time "
          f"{summary['cpu_ms_median']} / {summary['cpu_ms_p99']} ms)"
          f"{f', {late} frames late' if realtime else ''} | algorithmic latency "
          f"{summary['algorithmic_latency_ms']:g} ms | first response "
          + (f"{responses[0]} ms after the user stopped" if responses else "none"))
    print(f"agent: {text}")
    print(f"wrote agent.wav, agent.txt, timeline.jsonl, timeline.svg, summary.json to {out}")
    return summary


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return {f"{name}_median": round(statistics.median(values), 2), f"{name}_p99": round(p99, 2),
            f"{name}_max": round(values[-1], 2)}


def response_times(records: list[dict], frame_s: float) -> list[float]:
    """Per end of a user's turn (speech, then MIN_PAUSE_FRAMES silent chunks): ms from the end of
    its speech to the output of the step starting the agent's next turn (none if speech resumes)."""
    times = []
    for k in range(1, len(records)):
        pause = records[k : k + MIN_PAUSE_FRAMES]
        if not records[k - 1]["user_speaking"] or any(r["user_speaking"] for r in pause):
            continue
        for j in range(k, len(records)):
            if records[j]["user_speaking"]:
                break
            if records[j]["agent_speaking"] and not records[j - 1]["agent_speaking"]:
                waited = records[j]["time"] - k * frame_s
                times.append(round(1000 * waited + records[j]["compute_ms"], 1))
                break
    return times


def timeline_svg(user: np.ndarray, user_rate: int, agent: np.ndarray, agent_rate: int,
                 records: list[dict], frame_s: float, title: str) -> str:
    """A self-contained SVG: both waveforms, shaded where each speaks, and the agent's text."""
    seconds, left = len(records) * frame_s, 70
    width = left + max(800, int(100 * seconds)) + 20
    x = lambda t: left + (width - left - 20) * t / seconds  # noqa: E731
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="330" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13">{escape(title)}</text>',
           f'<text x="{left}" y="30" fill="#666">shaded: the user speaking (above '
           f"{USER_SPEECH_DBFS:g} dBFS), the agent's turn (its text channel from BOS to EOS); each "
           "output is drawn where it plays, after the step that made it</text>"]
    lanes = (("user", 42, user, user_rate, "#1f77b4"), ("agent", 132, agent, agent_rate, "#d62728"))
    for name, y, samples, rate, color in lanes:
        for r in records:  # a chunk is heard during the frame before its output, which plays after
            if r[f"{name}_speaking"]:
                t = r["time"] - frame_s * (name == "user")
                svg.append(f'<rect x="{x(t):.1f}" y="{y}" width="{x(t + frame_s) - x(t) + 0.5:.1f}"'
                           f' height="80" fill="{color}" opacity="0.12"/>')
        columns = np.array_split(samples[: int(seconds * rate)], width - left - 20)
        peak = max(float(np.abs(samples).max()), 1e-9)
        edges = [(left + i, c.max() / peak, c.min() / peak)
                 for i, c in enumerate(columns) if len(c)]
        outline = [f"{i},{y + 40 - 38 * top:.1f}" for i, top, _ in edges]
        outline += [f"{i},{y + 40 - 38 * bottom:.1f}" for i, _, bottom in reversed(edges)]
        svg += [f'<polygon points="{" ".join(outline)}" fill="{color}"/>',
                f'<text x="4" y="{y + 44}">{name}</text>']
    svg.append('<text x="4" y="264">agent text</text>')
    svg += [f'<text transform="translate({x(r["time"]):.1f},300) rotate(-90)">'
            f'{escape(r["token"].strip())}</text>' for r in records if r["token"].strip()]
    for t in range(int(seconds) + 1):
        svg.append(f'<line x1="{x(t):.1f}" y1="38" x2="{x(t):.1f}" y2="305" stroke="#ccc"/>'
                   f'<text x="{x(t):.1f}" y="322" text-anchor="middle">{t} s</text>')
    return "\n".join(svg + ["</svg>"]) + "\n"


if __name__ == "__main__":
    cli(main)
