"""Every GPU figure of bench/README.md in one command, printed as rows of its table (a fresh H200
machine: about 5 minutes, model building included; the goal is under 8):

    python -m bench.gpu             # on a GPU: the shipped configs, then the large preset in bf16
    python -m bench.gpu --quick     # tiny sizes, on the CPU too (tests/test_bench.py runs it)

1. train.py's setup and training step for each shipped config, 50 steps in bf16-mixed and in
   bf16-true (SALM in 32 too): every loss and gradient finite; ms per step over the second half;
2. bench.train_step at the large preset on batches of up to 600 s of speech in duration buckets
   (as NeMo's configs batch), so that the 1.1B LLM reads >= 16k tokens a step: SALM step /
   bare-LLM step, and the MFU of each;
3. bench.generate, bench.encoder and bench.duplex at the large preset.
The last line is a RESULT line of every figure.
"""
import argparse
import contextlib
import gc
import io
import math
import sys
import time
from datetime import date

import torch

import train
from bench import common, duplex, encoder, generate, train_step
from config import load_config

RUNS = {"salm": ("bf16-mixed", "bf16-true", "32"), "s2s_duplex": ("bf16-mixed", "bf16-true"),
        "s2s_duplex_speech_decoder": ("bf16-mixed", "bf16-true")}
LARGE = ["--preset", "large", "--dtype", "bfloat16"]
ONCE = ["--reps", "1", "--warmup", "0"]
BUCKETS = ["data.train_ds.batch_size=null", "data.train_ds.use_bucketing=true"]
# the demo's ~4300 s of training speech in 2 buckets: batches of about 16k and 23k LLM tokens
BIG_BATCH = ["data.train_ds.batch_duration=600", "data.train_ds.num_buckets=2",
             "data.train_ds.drop_last=true", "data.train_ds.num_workers=8"]
# (full size, --quick) of every part
SIZES = {
    "steps": (50, 2),
    "train_step": (LARGE + BUCKETS + BIG_BATCH + ["--reps", "5", "--warmup", "2"],
                   BUCKETS + ["data.train_ds.batch_duration=6", "data.train_ds.num_buckets=2",
                              *ONCE]),
    "generate": (LARGE + ["--reps", "2"], ["--batch", "2", "--new-tokens", "4", *ONCE]),
    "encoder": (LARGE + ["--batch", "16", "--seconds", "20"],
                ["--batch", "2", "--seconds", "1", *ONCE]),
    "duplex": (LARGE + ["--seconds", "10", "--reps", "2"], ["--seconds", "1", *ONCE]),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU run of every part)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    size = 1 if args.quick else 0
    device, start, rows, figures = torch.device(args.device), time.time(), [], []
    print(f"bench.gpu on {common.describe_device(device)}{' (--quick)' if args.quick else ''}")

    for name, precisions in RUNS.items():
        for precision in precisions:
            ms, loss, finite = train_steps(name, precision, SIZES["steps"][size], device)
            key = f"{name}_{precision.replace('-', '_')}"
            rows.append((f"`{name}` {SIZES['steps'][size]} training steps, {precision}",
                         "every loss finite", f"{'finite' if finite else '**NOT FINITE**'}: "
                                              f"loss {loss:.3f}, {ms:.0f} ms/step"))
            figures += [(f"{key}_finite", float(finite), "", None), (f"{key}_ms", ms, "ms", None)]

    out = run_part(train_step.main, SIZES["train_step"][size], device, figures)
    mfu = lambda key: f"{out[key]:.1f}%" if key in out else "n/a (no GPU peak)"  # noqa: E731
    rows += [("SALM step / bare LLM step, large preset, >= 16k tokens", "<= 1.3x",
              f"{out['salm_step_over_llm_step']:.2f}x, {out['tokens_per_step']:,.0f} tokens/step"),
             ("MFU of a SALM step (large preset)", ">= 40%", mfu("salm_mfu")),
             ("MFU of the bare-LLM step (large preset)", "—", mfu("llm_mfu"))]
    out = run_part(generate.main, SIZES["generate"][size], device, figures)
    rows += [("SALM / HF decode tokens/s (large)", ">= 0.95x",
              f"{out['salm_decode_over_hf']:.2f}x"),
             ("RTFx batch of 16 / one clip at a time (large)", ">= 4x",
              f"{out['batched_rtfx_over_one_by_one']:.1f}x")]
    out = run_part(encoder.main, SIZES["encoder"][size], device, figures)
    rows.append(("ParakeetEncoder / ours (large, inference)", ">= 1.0x",
                 f"{out['parakeet_over_ours']:.2f}x, max abs diff {out['max_abs_diff']:.1e}"))
    out = run_part(duplex.main, SIZES["duplex"][size], device, figures)
    for model in ("s2s_duplex", "s2s_duplex_speech_decoder"):
        rows.append((f"{model} per 80 ms frame (large), RTF", "—",
                     f"{out[f'{model}_ms_per_frame']:.1f} ms, RTF {out[f'{model}_rtf']:.3f}"))

    machine = common.describe_device(device)
    print(f"\nbench/README.md rows ({time.time() - start:.0f} s in all):")
    for figure, goal, measured in rows:
        print(f"| {figure} | {goal} | {measured} | {date.today()} | {machine} | "
              "`python -m bench.gpu` |")
    common.result(*figures)


def train_steps(config: str, precision: str, steps: int, device: torch.device) -> tuple:
    """train.py's own setup and steps: ms per step over the second half, the mean loss there, and
    whether every loss and gradient was finite."""
    overrides = [f"trainer.precision={precision}", f"trainer.max_steps={steps}"]
    cfg = load_config(f"configs/{config}.yaml", overrides, report=None)
    with contextlib.redirect_stdout(io.StringIO()):  # the parameter count
        run = train.setup(cfg, device, 0, 1, None)
    stream, meter, autocast = iter(run.batches), train.Meter(), train.check_precision(precision)
    for step in range(steps):
        train.train_step(run, [next(stream)], cfg["trainer"], device, autocast, meter)
        if step + 1 == steps // 2:
            first = meter.summary(1, 0.0, device, {})  # the first half warms up, timed apart
    second = meter.summary(1, 0.0, device, {})
    finite = second["skipped"] == 0 and all(math.isfinite(m["loss"]) for m in (first, second))
    print(f"{config} {precision}: {steps} steps | loss {first['loss']:.3f} -> {second['loss']:.3f}"
          f" | {second['ms_per_step']:.0f} ms/step | {'all finite' if finite else 'NOT FINITE'}")
    del run, stream
    free(device)
    return second["ms_per_step"], second["loss"], finite


def run_part(script_main, argv: list[str], device: torch.device, figures: list) -> dict:
    """A script's RESULT figures, also added to `figures`; its output is shown as it runs."""
    print(f"\n$ python -m {script_main.__module__} {' '.join(argv)}")
    shown = sys.stdout

    class Tee(io.StringIO):
        def write(self, text):
            shown.write(text)
            return super().write(text)

    with contextlib.redirect_stdout(Tee()) as captured:
        script_main(argv + ["--device", str(device)])
    free(device)
    out = common.parse_result(captured.getvalue().strip().splitlines()[-1])
    figures += [(k, v, "", None) for k, v in out.items()]
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    common.cli(main)
