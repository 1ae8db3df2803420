"""What every bench script shares: its command line, the `large` preset, model building, timing
and the RESULT line, `RESULT name=value[unit] (goal ...) name=value ...`, which it prints last."""
import argparse
import atexit
import json
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from config import cli as cli, load_config, parse_yaml  # cli: a mistake ends with one line
from checkpoint import DTYPES, cast_model
from train import build_model as build_model_from_config

TINY_LLM = Path(__file__).resolve().parents[1] / "assets" / "tiny-llm"
# `--preset large`: a TinyLlama-1.1B-sized LLM, a FastConformer-large-sized encoder and the speech
# decoder of the configuration document's example; all random init.
LARGE_LLM = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, head_dim=64,
                 max_position_embeddings=2048, tie_word_embeddings=False)
LARGE_ENCODER = dict(d_model=512, n_layers=17, n_heads=8, subsampling_factor=8,
                     subsampling_conv_channels=256)
LARGE_SPEECH_DECODER = dict(d_model=768, n_layers=12, d_ffn=3072, sa_n_heads=12)
# Dense bf16 TFLOPs by GPU name; float32 matmuls run as TF32 (train.py turns it on) at half.
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121}


def parser(description: str, default_config: str | list[str], reps: int = 5):
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (see config.py)")
    p.add_argument("--config", default=default_config,
                   nargs="+" if isinstance(default_config, list) else None)
    p.add_argument("--preset", choices=["large"],
                   help="TinyLlama-1.1B-sized LLM + FastConformer-large encoder")
    p.add_argument("--llm", type=llm_sizes, metavar="KEY=VALUE,...", help="a random-init LLM: "
                   "assets/tiny-llm's config with these keys changed (on top of --preset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=reps,
                   help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py does (NaN gradients on Hopper)
    print(f"device {describe_device(device)} | dtype {args.dtype} | "
          f"threads {torch.get_num_threads()}")
    return device, DTYPES[args.dtype]


def load(args: argparse.Namespace, path: str | None = None) -> dict:
    """The config (`path`, else --config), the preset's and --llm's sizes under the overrides."""
    path = path or args.config
    cfg = load_config(path, args.overrides, report=None)
    sizes = {**(LARGE_LLM if args.preset == "large" else {}), **(args.llm or {})}
    extra = ([f"model.pretrained_llm={write_llm_dir(sizes)}", "model.pretrained_weights=false"]
             if sizes else [])
    if args.preset == "large":
        extra += [f"model.perception.encoder.{k}={v}" for k, v in LARGE_ENCODER.items()]
        if "feat_in" in (cfg["model"]["perception"].get("modality_adapter") or {}):
            extra.append(f"model.perception.modality_adapter.feat_in={LARGE_ENCODER['d_model']}")
        if cfg["model"].get("speech_decoder"):
            extra += [f"model.speech_decoder.{k}={v}" for k, v in LARGE_SPEECH_DECODER.items()]
    return load_config(path, extra + args.overrides, report=None) if extra else cfg


def llm_sizes(text: str) -> dict:
    """--llm "hidden_size=256,num_hidden_layers=2" -> {"hidden_size": 256, ...}."""
    pairs = (item.split("=", 1) for item in text.split(","))
    return {key: parse_yaml(value) for key, value in pairs}


def write_llm_dir(sizes: dict) -> Path:
    """A temporary Llama directory: the tiny LLM's tokenizer with a config of the given sizes."""
    path = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    atexit.register(shutil.rmtree, path, True)
    config = json.loads((TINY_LLM / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **sizes}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_LLM / name, path / name)
    return path


def build_model(model_cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """As train.py builds it, in `dtype` like bf16-true (the mel frontend and codec stay fp32)."""
    return cast_model(build_model_from_config(model_cfg), dtype).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, reps: int, warmup: int, device: torch.device, every: dict | None = None):
    """Median seconds per call of each function (every timed call's into `every`). They take turns
    in every repetition, so the noise of a shared machine hits all alike and ratios stay fair."""
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    if every is not None:
        every.update(times)
    return {name: statistics.median(t) for name, t in times.items()}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {len(names) or '?'} cores"


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """Dense peak TFLOPs of `dtype` matmuls: --peak-tflops, else the table; None if unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if peak is None else peak if dtype == torch.bfloat16 else peak / 2


def result(*figures: tuple) -> None:
    """Print the RESULT line from (name, value, unit, goal or None) tuples."""
    print("RESULT " + " ".join(f"{name}={value:.4g}{unit}" + (f" (goal {goal})" if goal else "")
                               for name, value, unit, goal in figures))


def parse_result(line: str) -> dict[str, float]:
    """A RESULT line -> {name: value}, units dropped."""
    if not line.startswith("RESULT "):
        raise ValueError(f"not a RESULT line: {line!r}")
    pairs = re.findall(r"(\w+)=([-+0-9.eE]+|nan|inf)[a-zA-Z%]*", line)
    return {name: float(value) for name, value in pairs}
