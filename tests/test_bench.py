"""bench/ does not rot, and divides the right times. Each script runs at its smallest sizes in a
subprocess (tests do not import bench/); a small runner replaces `common.measure` with one that runs
each timed call once and reports chosen times, so every ratio is checked against a hand-computed
value. `python -m bench.gpu --quick` runs every part of the GPU command at tiny sizes on the CPU."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

QUICK = ["--reps", "1", "--warmup", "0", "--device", "cpu"]
RUNNER = """
import importlib, json, sys
from bench import common
seconds = json.loads(sys.argv[1])
if seconds:
    def measure(fns, reps, warmup, device, every=None):
        for fn in fns.values():
            fn()  # the real work, once
        if every is not None:
            every.update({name: [seconds[name]] for name in fns})
        return {name: seconds[name] for name in fns}
    common.measure = measure
importlib.import_module("bench." + sys.argv[2]).main(sys.argv[3:])
"""
TRAINING_RUNS = ["salm_bf16_mixed", "salm_bf16_true", "salm_32", "s2s_duplex_bf16_mixed",
                 "s2s_duplex_bf16_true", "s2s_duplex_speech_decoder_bf16_mixed",
                 "s2s_duplex_speech_decoder_bf16_true"]
FIGURES = ["salm_step_over_llm_step", "tokens_per_step", "peak_mem", "salm_decode_over_hf",
           "batched_rtfx_over_one_by_one", "parakeet_over_ours", "s2s_duplex_ms_per_frame",
           "s2s_duplex_speech_decoder_rtf", "s2s_duplex_speech_decoder_nocache_over_cache"]


def bench(script: str, argv: list[str], seconds: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, json.dumps(seconds or {}), script, *argv],
                          cwd=ROOT, text=True, capture_output=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def figures_of(out: subprocess.CompletedProcess) -> dict[str, float]:
    """The figures of the RESULT line a script ends with, units dropped."""
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-+0-9.eE]+|nan|inf)", last)}


def test_train_step():
    figures = figures_of(bench("train_step", ["data.train_ds.batch_size=2", *QUICK],
                               {"salm": 0.030, "llm": 0.020, "perception": 0.005}))
    assert figures["salm_step_over_llm_step"] == pytest.approx(1.5)  # 30 ms / 20 ms
    assert figures["salm_over_llm_plus_perception"] == pytest.approx(1.2)  # 30 ms / (20 + 5) ms
    assert figures["peak_mem"] > 0 and figures["peak_mem_over_static"] > 1


def test_data():
    argv = ["data.train_ds.batch_size=2", "--batches", "2", "--steps", "1", *QUICK]
    figures = figures_of(bench("data", argv))
    assert set(figures) == {"loader_over_training"}  # timed by the script, not by common.measure
    assert math.isfinite(figures["loader_over_training"]) and figures["loader_over_training"] > 0


def test_generate():
    figures = figures_of(bench("generate", ["--batch", "2", "--new-tokens", "4", *QUICK],
                               {"salm": 0.1, "llm": 0.1, "batched": 0.05, "one_by_one": 0.2}))
    assert figures["batched_rtfx_over_one_by_one"] == pytest.approx(4.0)  # in 50 ms, not 200 ms
    decode = figures["salm_decode_over_hf"]  # timed by the script's token clocks
    assert math.isfinite(decode) and decode > 0


def test_encoder_matches_parakeet():
    figures = figures_of(bench("encoder", ["--batch", "2", "--seconds", "1", *QUICK],
                               {"ours": 0.010, "theirs": 0.025}))
    assert figures["parakeet_over_ours"] == pytest.approx(2.5)
    assert 0 <= figures["max_abs_diff"] < 1e-4  # transformers' ParakeetEncoder is the reference


def test_duplex():
    seconds = {"s2s_duplex": 0.7, "s2s_duplex_speech_decoder": 1.4,
               "s2s_duplex_speech_decoder_nocache": 4.2, "s2s_duplex_stream": 0.8,
               "s2s_duplex_speech_decoder_stream": 1.6}
    figures = figures_of(bench("duplex", ["--seconds", "1", *QUICK], seconds))
    for name in ("s2s_duplex", "s2s_duplex_speech_decoder"):  # 1 s, causal encoder: 14 frames
        assert figures[f"{name}_ms_per_frame"] == pytest.approx(1000 * seconds[name] / 14, rel=1e-3)
        assert figures[f"{name}_rtf"] == pytest.approx(seconds[name])
    assert figures["s2s_duplex_speech_decoder_nocache_over_cache"] == pytest.approx(3.0)
    for name in ("s2s_duplex_stream", "s2s_duplex_speech_decoder_stream"):  # timed per live step
        stream = [figures[f"{name}_{k}"] for k in ("ms_per_frame", "p99_ms", "cpu_ms_per_frame")]
        assert all(math.isfinite(v) and v > 0 for v in stream) and stream[1] >= stream[0]


def test_encoder_refuses_a_streaming_config():
    out = bench("encoder", ["--config", "configs/s2s_duplex.yaml", *QUICK])
    assert out.returncode != 0 and "causal_downsampling=True" in out.stderr


@pytest.mark.slow
def test_the_gpu_command_runs_every_part_at_tiny_sizes():
    out = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--device", "cpu"],
                         cwd=ROOT, text=True, capture_output=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures = figures_of(out)
    assert all(figures[f"{run}_finite"] == 1 for run in TRAINING_RUNS), figures
    assert all(figures[f"{run}_ms"] > 0 for run in TRAINING_RUNS), figures
    assert all(math.isfinite(figures[name]) and figures[name] > 0 for name in FIGURES), figures
    assert 0 <= figures["max_abs_diff"] < 1e-4  # our encoder = ParakeetEncoder, same weights
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == len(TRAINING_RUNS) + 8 and all(line.count(" | ") == 5 for line in rows)
