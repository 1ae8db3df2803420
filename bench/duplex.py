"""Duplex inference: time per 80 ms frame and real-time factor of DuplexS2SModel and
DuplexS2SSpeechDecoderModel (with and without its speech decoder's KV cache), offline and live.

    python -m bench.duplex          # both configs/s2s_duplex*.yaml, one 10 s session, on the CPU
    python -m bench.duplex --preset large --device cuda --dtype bfloat16 --seconds 60

Offline, each model answers the user channel of a demo conversation (repeated to `--seconds`) with
`offline_inference`: perception once, one step per frame (LLM with its KV cache, text and codec
heads or the speech decoder), then the codec decodes the agent's speech. RTF = wall seconds /
audio seconds. Without its KV cache the speech decoder recomputes all past frames at every frame
(as NeMo's decoder does). A live session (`model.stream`) answers the same audio 80 ms at a time
(streaming perception, LLM, incremental codec decode); its median and p99 wall time per step (and
CPU time, steadier on a shared machine) must stay under the 80 ms frame.
"""
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench import common
from data import load_audio
from manifests import read_duplex_demo

CONVERSATIONS = "assets/demo/qa_val"
CONFIGS = ["configs/s2s_duplex.yaml", "configs/s2s_duplex_speech_decoder.yaml"]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, CONFIGS, reps=3)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the user's audio")
    p.add_argument("--batch", type=int, default=1, help="sessions answered at once")
    args = p.parse_intermixed_args(argv)
    device, dtype = common.setup(args)

    runs, frames, steps = {}, {}, {}
    for path in args.config:
        model = common.build_model(common.load(args, path)["model"], device, dtype).eval()
        sample_rate = model.perception.sample_rate
        user = load_audio(next(iter(read_duplex_demo(CONVERSATIONS))), sample_rate)
        user = np.resize(user, int(args.seconds * sample_rate))  # repeated to length
        audio = torch.from_numpy(user).to(device).expand(args.batch, -1)  # (B, T_samples)
        audio_lens = torch.full((args.batch,), audio.size(1), device=device)
        name = Path(path).stem
        with torch.no_grad():
            n = int(model.perception(audio[:1], audio_lens[:1])[1][0])
        frames[name] = frames[f"{name}_nocache"] = n
        runs[name] = partial(answer, model, audio, audio_lens, use_cache=True)
        steps[name] = []
        runs[f"{name}_stream"] = partial(live_session, model, audio, device, steps[name])
        frames[f"{name}_stream"] = audio.size(1) // round(sample_rate * 0.08)
        if hasattr(model, "speech_decoder"):
            runs[f"{name}_nocache"] = partial(answer, model, audio, audio_lens, use_cache=False)

    times = common.measure(runs, args.reps, args.warmup, device)
    print(f"{args.seconds:g} s of user audio | {args.batch} session(s) | median of {args.reps}")
    figures = []
    for name, seconds in times.items():
        ms_per_frame, rtf = 1000 * seconds / frames[name], seconds / args.seconds
        print(f"{name}: {frames[name]} frames of 80 ms | {ms_per_frame:.2f} ms per frame | "
              f"RTF {rtf:.3f}")
        base = name.removesuffix("_stream").removesuffix("_nocache")
        if name.endswith("_stream"):
            wall, cpu = zip(*[step for session in steps[base][args.warmup:] for step in session])
            p99 = sorted(wall)[int(0.99 * (len(wall) - 1))]
            median, cpu = 1000 * statistics.median(wall), 1000 * statistics.median(cpu)
            print(f"{name}: per step {median:.2f} ms median, {1000 * p99:.2f} ms p99, CPU time "
                  f"{cpu:.2f} ms median")
            per_frame = seconds / frames[name]
            figures += [(f"{name}_ms_per_frame", median, "ms", "<= 40ms"),
                        (f"{name}_p99_ms", 1000 * p99, "ms", "< 80ms"),
                        (f"{name}_cpu_ms_per_frame", cpu, "ms", None),
                        (f"{name}_over_offline", per_frame * frames[base] / times[base], "x", None)]
        elif name == base:
            figures += [(f"{name}_ms_per_frame", ms_per_frame, "ms", None),
                        (f"{name}_rtf", rtf, "", None)]
        else:
            figures.append((f"{name}_over_cache", seconds / times[base], "x", None))
    common.result(*figures)


def answer(model, audio: torch.Tensor, audio_lens: torch.Tensor, use_cache: bool) -> None:
    """offline_inference; without the cache the speech decoder recomputes all past frames."""
    if hasattr(model, "speech_decoder"):
        model.speech_decoder.use_cache = use_cache
    model.offline_inference(audio, audio_lens)


def live_session(model, audio: torch.Tensor, device: torch.device, sessions: list) -> None:
    """Stream `audio` (B, T) through a new live session; append its steps' (wall, CPU) seconds."""
    if hasattr(model, "speech_decoder"):
        model.speech_decoder.use_cache = True
    session, n, steps = model.stream(audio.size(0)), round(model.perception.sample_rate * 0.08), []
    for k in range(audio.size(1) // n):
        common.sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        session.step(audio[:, k * n : (k + 1) * n])
        common.sync(device)
        steps.append((time.perf_counter() - wall, time.process_time() - cpu))
    sessions.append(steps)


if __name__ == "__main__":
    common.cli(main)
