"""bench/ does not rot: `python -m bench.gpu --quick` runs every bench script (and train.py's step
for every config and precision) at tiny sizes on the CPU and ends with a RESULT line of finite
figures. Run as subprocesses: tests do not import bench/."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TRAINING_RUNS = ["salm_bf16_mixed", "salm_bf16_true", "salm_32", "s2s_duplex_bf16_mixed",
                 "s2s_duplex_bf16_true", "s2s_duplex_speech_decoder_bf16_mixed",
                 "s2s_duplex_speech_decoder_bf16_true"]
FIGURES = ["salm_step_over_llm_step", "tokens_per_step", "peak_mem", "salm_decode_over_hf",
           "batched_rtfx_over_one_by_one", "parakeet_over_ours", "s2s_duplex_ms_per_frame",
           "s2s_duplex_speech_decoder_rtf", "s2s_duplex_speech_decoder_nocache_over_cache"]


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", *args, "--device", "cpu"], cwd=ROOT, text=True,
                          capture_output=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_the_gpu_command_runs_every_part_at_tiny_sizes():
    out = run_bench("bench.gpu", "--quick")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    figures = {k: float(v) for k, v in re.findall(r"(\w+)=([-+0-9.eE]+|nan|inf)", last)}
    assert all(figures[f"{run}_finite"] == 1 for run in TRAINING_RUNS), figures
    assert all(figures[f"{run}_ms"] > 0 for run in TRAINING_RUNS), figures
    assert all(math.isfinite(figures[name]) and figures[name] > 0 for name in FIGURES), figures
    assert 0 <= figures["max_abs_diff"] < 1e-4  # our encoder = ParakeetEncoder, same weights
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == len(TRAINING_RUNS) + 8 and all(line.count(" | ") == 5 for line in rows)


def test_encoder_refuses_a_streaming_config():
    out = run_bench("bench.encoder", "--config", "configs/s2s_duplex.yaml")
    assert out.returncode == 2 and "causal_downsampling=True" in out.stderr
