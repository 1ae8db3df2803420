"""Train SALM, DuplexS2SModel or DuplexS2SSpeechDecoderModel from a NeMo-style YAML config.

    python train.py configs/salm.yaml                                         # CPU or one GPU
    torchrun --nproc_per_node 8 train.py configs/salm.yaml trainer.devices=8  # DDP on one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 \\
        train.py CONFIG trainer.num_nodes=2

Any `key=value` after the config overrides it (see config.py). The model class follows from the
config: a `speech_decoder` section means DuplexS2SSpeechDecoderModel, a `pretrained_audio_codec`
DuplexS2SModel, else SALM.
"""
import contextlib
import importlib
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (cast_model, check_monitor_logged, find_resume_checkpoint, load_checkpoint,
                        run_dir, save_checkpoints)
from config import OPTIMIZERS, ConfigError, cli, load_config, save_config
from data import TrainBatches, check_data_paths, has_data, make_val_loaders
from duplex_s2s import DuplexS2SModel, DuplexS2SSpeechDecoderModel
from salm import SALM

SCHEDULERS = ("CosineAnnealing",)
MAX_BAD_STEPS = 10  # non-finite losses in a row before the run stops
DIST_TIMEOUT = timedelta(minutes=10)  # how long a collective waits for a slow or lost rank
GENERATED_METRICS = ("val_wer", "val_txt_bleu", "val_asr_bleu")  # need generation in validation


def main(argv: list[str]) -> torch.nn.Module | None:
    """Run training as the command line says; returns the trained model (tests, notebooks)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return None
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once, also when piped
    # 1. distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; else rank 0 of 1
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    master = rank == 0

    # 2. config, device, precision, and where the run lives (nothing written before the checks)
    cfg = load_config(argv[0], argv[1:], report=print if master else None)
    check_data_paths(cfg["data"])
    trainer, exp = cfg["trainer"], cfg["exp_manager"]
    device = pick_device(trainer, world_size, local_rank)
    autocast_dtype = check_precision(trainer["precision"])
    log_dir = run_dir(exp)
    resume_path = find_resume_checkpoint(exp, log_dir)
    for partial in (log_dir / "checkpoints").glob("*.tmp") if master else ():
        partial.unlink()  # left by a run killed while saving
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)

    # 3. model, optimizer, schedule, data; the state of a resumed run
    run = setup(cfg, device, rank, world_size, resume_path)
    check_monitor(exp, run.model, run.val_loaders)
    max_steps, log_every = trainer["max_steps"], trainer["log_every_n_steps"]
    val_every, ckpt_params = validation_interval(trainer), exp["checkpoint_callback_params"]
    generate = str(ckpt_params["monitor"]).startswith(GENERATED_METRICS)  # e.g. monitor: val_wer
    if run.val_loaders and trainer["num_sanity_val_steps"] and not resume_path:
        results, _ = validate(run.model, run.val_loaders, trainer["num_sanity_val_steps"], device,
                              autocast_dtype, generate)
        if exp["create_checkpoint_callback"]:
            check_monitor_logged(ckpt_params, results)
    loggers = make_loggers(exp, log_dir, cfg) if master else []
    if master:
        start_run_dir(log_dir, cfg, resume_path)
        if resume_path and run.step >= max_steps:
            print(f"note: {resume_path.name} is at step {run.step} and trainer.max_steps is "
                  f"{max_steps}: nothing is left to train (raise trainer.max_steps to go on)")

    # 4. the loop: step, log, validate, save, until max_steps or the time budget
    deadline = time_budget(exp["max_time_per_run"], trainer["max_time"])
    start_step, stream, meter, results = run.step, iter(run.batches), Meter(), None
    stop_reason, failed = "max_steps", False
    progress = tqdm(total=max_steps, initial=run.step, desc="train", dynamic_ncols=True,
                    disable=not master or not trainer["enable_progress_bar"])
    while run.step < max_steps:
        micro_batches = [next(stream) for _ in range(trainer["accumulate_grad_batches"])]
        train_step(run, micro_batches, trainer, device, autocast_dtype, meter)
        progress.update(1)
        if run.step % log_every == 0 or run.step == max_steps:  # the host reads the steps here only
            metrics = meter.summary(world_size, run.optimizer.param_groups[0]["lr"], device,
                                    run.batches.skipped.counts())
            if master:
                progress.write(format_log(run.step, max_steps, metrics))
                log_metrics(loggers, metrics, run.step)
            failed = meter.too_many_bad  # read at log lines only
            if failed:
                stop_reason = (f"{MAX_BAD_STEPS} non-finite losses in a row (check the learning "
                               "rate, precision and data)")
                break
        results = None
        if run.val_loaders and (run.step % val_every == 0 or run.step == max_steps):
            results, pairs = validate(run.model, run.val_loaders, trainer["limit_val_batches"],
                                      device, autocast_dtype, generate)
            if master:
                progress.write("validation: " + "  ".join(f"{k} {v:.4f}"
                                                          for k, v in results.items()))
                log_metrics(loggers, results, run.step)
        if exp["create_checkpoint_callback"] and (results or every_n(ckpt_params, run.step)):
            save(run, cfg, log_dir, results, meter, master)
        if deadline and time.time() > deadline:
            stop_reason = "max_time_per_run reached; rerun the same command to continue"
            break
    progress.close()
    if exp["create_checkpoint_callback"] and run.step > start_step:  # else: as it was loaded
        save(run, cfg, log_dir, None, meter, master)
    if master:
        print(f"stopped at step {run.step}: {stop_reason}")

    # 5. held-out evaluation with generation (WER for SALM, BLEU for the duplex models)
    if run.val_loaders and not failed:
        if not (generate and results):  # else the last step's validation generated with this model
            results, pairs = validate(run.model, run.val_loaders, trainer["limit_val_batches"],
                                      device, autocast_dtype, generate=True)
        if master:
            print("held-out: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
            for reference, hypothesis in pairs[:5]:
                print(f"  ref: {reference}\n  hyp: {hypothesis}")
            log_metrics(loggers, results, run.step)
    for logger in loggers:
        logger.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if failed:
        sys.exit(f"error: {stop_reason}")
    return run.model


@dataclass
class Run:
    """What the loop carries from step to step, and what a checkpoint saves."""
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model's training_step, wrapped in DDP when there are several ranks
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: TrainBatches
    val_loaders: dict
    world_size: int
    step: int = 0
    best: list = field(default_factory=list)  # (signed monitor value, step) of the top-k


def setup(cfg: dict, device: torch.device, rank: int, world_size: int,
          resume_path: Path | None) -> Run:
    """Model (the same init on every rank), optimizer, LR schedule, gradient scaler and data; a
    resumed run's state, RNG streams and data position; else a per-rank seed for dropout and
    sampling."""
    seed = cfg["data"]["train_ds"]["seed"]
    seed_everything(seed)
    if device.type == "cuda":  # cuDNN attention's backward (torch >= 2.11, Hopper) can give NaN
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(cfg["model"]).to(device)
    if cfg["trainer"]["precision"] == "bf16-true":
        cast_model(model, torch.bfloat16)  # the mel frontend and the codec keep their fp32 numerics
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg["model"]["optimizer"], params)
    scheduler = build_scheduler(cfg["model"]["lr_scheduler"], optimizer,
                                cfg["trainer"]["max_steps"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["trainer"]["precision"] == "16-mixed")
    state, rank_state = None, {}
    if resume_path:
        state = load_checkpoint(resume_path)
        for part, module in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                             ("scaler", scaler)):
            module.load_state_dict(state[part])
        rank_state = resume_rank_state(state["ranks"], rank, world_size)
    if "python" in rank_state:
        set_rng_state(rank_state)
    else:
        seed_everything(seed + rank)
    ddp = TrainStep(model)
    if world_size > 1:
        ddp = DistributedDataParallel(ddp, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    # data: each rank takes every world_size-th batch of the same seeded stream
    dataset = model.make_dataset(cfg["data"])
    batches = TrainBatches(cfg["data"]["train_ds"], dataset, rank, world_size,
                           skip=rank_state.get("batches", 0), skipped=rank_state.get("skipped"))
    val_cfg = cfg["data"]["validation_ds"]
    val_loaders = make_val_loaders(val_cfg, dataset, rank, world_size) if has_data(val_cfg) else {}
    run = Run(model, ddp, params, optimizer, scheduler, scaler, batches, val_loaders, world_size)
    if state:
        run.step, run.best = state["step"], [tuple(b) for b in state["best"]]
    return run


def resume_rank_state(ranks: list[dict], rank: int, world_size: int) -> dict:
    """This rank's saved RNG states, data position and skips. A run resumed with another number of
    processes goes on with the data after the batches its ranks drew together (rank r of W takes
    batches r, r + W, ... of one stream, so each rank skips its share of them); its RNG streams
    restart from the seed."""
    if len(ranks) == world_size:
        return ranks[rank]
    drawn = sum(r["batches"] for r in ranks)
    skip = max(0, math.ceil((drawn - rank) / world_size))
    if rank == 0:
        print(f"note: resuming a run of {len(ranks)} process(es) with {world_size}: each rank "
              f"skips its share of the {drawn} batches drawn so far ({skip} on rank 0), RNG "
              f"streams restart from the seed, and the global batch is {world_size}/{len(ranks)} "
              "of what it was")
    return {"batches": skip, "skipped": ranks[rank]["skipped"] if rank < len(ranks) else {}}


def train_step(run: Run, micro_batches: list[dict], trainer: dict, device, autocast_dtype,
               meter) -> None:
    """One optimizer step over `micro_batches` (gradient accumulation), without a host sync: a step
    whose loss or gradient is not finite updates nothing (a fused optimizer skips it on the device)
    and is counted in `meter`, which the host reads at log lines. Gradients of summed losses / the
    global number of supervised positions give the exact global mean, however the tokens fall into
    micro-batches and ranks."""
    run.model.train()
    loss_sum, count = torch.zeros((), device=device), torch.zeros((), device=device)
    autocast = dict(dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or run.world_size == 1 else run.ddp.no_sync()
        with sync, torch.autocast(device.type, **autocast):
            out = run.ddp(to_device(batch, device))
            run.scaler.scale(out["loss_sum"]).backward()
        loss_sum += out["loss_sum"].detach().float()
        count += out["count"]
        meter.add(out, batch)
    totals = torch.stack([loss_sum, count])
    if run.world_size > 1:
        dist.all_reduce(totals)
    run.scaler.unscale_(run.optimizer)
    grads = [p.grad for p in run.params if p.grad is not None]
    # DDP averaged over ranks: undo that, then divide by the global count
    torch._foreach_mul_(grads, run.world_size / totals[1].clamp(min=1))
    grad_norm = clip_gradients(run.params, trainer["gradient_clip_val"],
                               trainer["gradient_clip_algorithm"])
    finite = torch.isfinite(totals[0]) & torch.isfinite(grad_norm)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # 16-mixed: the scaler skips inf/NaN gradients itself
    elif getattr(run.optimizer, "_step_supports_amp_scaling", False):  # fused: skips on the device
        run.optimizer.grad_scale, run.optimizer.found_inf = None, (~finite).float()
        run.optimizer.step()
    elif finite:  # other optimizers: the host waits for the flag
        run.optimizer.step()
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    meter.add_step(totals[0] / totals[1].clamp(min=1), grad_norm, finite)


def save(run: Run, cfg: dict, log_dir: Path, results: dict | None, meter, master: bool) -> None:
    """Checkpoints of the run as it stands (checkpoint.save_checkpoints), with every rank's RNG and
    data state."""
    skipped = run.batches.skipped.state(meter.step_skips())
    ranks = gather_rank_states(run.batches.num_batches, run.world_size, skipped)
    run.best = save_checkpoints(log_dir, run.step, run.model, run.optimizer, run.scheduler,
                                run.scaler, cfg, run.best,
                                cfg["exp_manager"]["checkpoint_callback_params"], results, ranks,
                                master)


class TrainStep(torch.nn.Module):
    """Routes DDP's forward to the model's training_step: DDP's hooks see every micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_step(batch)


def model_class(model_cfg: dict) -> type:
    """The model a config describes: a `speech_decoder` section means DuplexS2SSpeechDecoderModel, a
    `pretrained_audio_codec` DuplexS2SModel, anything else SALM."""
    if model_cfg.get("speech_decoder"):
        return DuplexS2SSpeechDecoderModel
    return DuplexS2SModel if model_cfg.get("pretrained_audio_codec") else SALM


def build_model(model_cfg: dict) -> torch.nn.Module:
    return model_class(model_cfg)(model_cfg)


def check_precision(precision) -> torch.dtype | None:
    """trainer.precision -> the autocast dtype (None: no autocast)."""
    if str(precision) not in ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(f"trainer.precision '{precision}' is not supported: use 32, bf16-mixed, "
                          "16-mixed or bf16-true")
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def start_run_dir(log_dir: Path, cfg: dict, resume_path: Path | None) -> None:
    """Create the run directory and write the resolved config."""
    (log_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, log_dir / "exp_config.yaml")
    print(f"run directory: {log_dir}"
          + (f" (resuming from {resume_path.name})" if resume_path else ""))


def build_optimizer(opt_cfg: dict | None, params) -> torch.optim.Optimizer:
    """`model.optimizer`: `_target_` names a torch.optim class (only those); the other keys are its
    arguments."""
    opt_cfg = dict(opt_cfg or {"_target_": "torch.optim.AdamW", "lr": 1e-4})
    target = opt_cfg.pop("_target_", None) or opt_cfg.pop("name", "AdamW")
    name = target.rsplit(".", 1)[-1]
    if name not in OPTIMIZERS or target.removesuffix(name).rstrip(".") not in ("", "torch.optim"):
        raise ConfigError(f"model.optimizer._target_ '{target}' is not allowed: use "
                          f"torch.optim.<{'|'.join(OPTIMIZERS)}>")
    if not params:
        raise ConfigError("no trainable parameters: model.freeze_params froze everything")
    opt_cfg.pop("sched", None)
    return getattr(torch.optim, name)(params, **opt_cfg)


def build_scheduler(sched_cfg: dict | None, optimizer, max_steps: int):
    """NeMo's CosineAnnealing (warmup, then cosine from the base LR to min_lr at max_steps), stepped
    per step."""
    if not sched_cfg:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sched_cfg = dict(sched_cfg)
    target = sched_cfg.pop("_target_", None) or sched_cfg.pop("name", "CosineAnnealing")
    if target.rsplit(".", 1)[-1] not in SCHEDULERS:
        raise ConfigError(f"model.lr_scheduler '{target}' is not supported: use CosineAnnealing")
    total = int(sched_cfg.get("max_steps") or max_steps)
    warmup = int(sched_cfg.get("warmup_steps")
                 or round(float(sched_cfg.get("warmup_ratio") or 0) * total))
    min_lr = float(sched_cfg.get("min_lr", 0.0))
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_annealing(s, base_lr, warmup, total, min_lr) / base_lr)


def cosine_annealing(step: int, base_lr: float, warmup_steps: int, max_steps: int,
                     min_lr: float) -> float:
    if warmup_steps and step <= warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step > max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)) + min_lr


@torch.no_grad()
def validate(model, loaders: dict, limit, device, autocast_dtype,
             generate: bool = False) -> tuple[dict, list]:
    """Per-set metrics (`val_{metric}_{name}`) and their mean over sets (`val_{metric}`), gathered
    over ranks, plus (reference, hypothesis) pairs when the model generated."""
    model.eval()
    results, per_metric, pairs = {}, {}, []
    for name, loader in loaders.items():
        totals = {}
        for i, batch in enumerate(loader):
            if isinstance(limit, int) and i >= limit:
                break
            if batch.get("empty"):
                continue
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = model.validation_step(to_device(batch, device), generate=generate)
            for key, value in out.items():
                totals[key] = totals.get(key, [] if isinstance(value, list) else 0) + value
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, totals)
            totals = {k: sum((g[k] for g in gathered), [] if isinstance(v, list) else 0)
                      for k, v in totals.items()}
        pairs += totals.get("pairs", [])
        for metric, value in model.validation_summary(totals).items():
            results[f"val_{metric}_{name}"] = value
            per_metric.setdefault(f"val_{metric}", []).append(value)
    results.update({k: sum(v) / len(v) for k, v in per_metric.items()})
    model.train()
    return results, pairs


def check_monitor(exp: dict, model, val_loaders: dict) -> None:
    """A checkpoint monitor that validation will not log is an error before the first step, not at
    the first checkpoint (for the models that list their validation metrics: the duplex models)."""
    params = exp["checkpoint_callback_params"]
    if not (exp["create_checkpoint_callback"] and val_loaders and params["save_top_k"]
            and hasattr(model, "validation_metrics")):
        return
    metrics, monitor = model.validation_metrics(), params["monitor"]
    suffixes = ["", *(f"_{name}" for name in val_loaders)]
    names = {f"val_{metric}{suffix}": metric for metric in metrics for suffix in suffixes}
    if monitor not in names:
        logged = [name for name, metric in names.items() if not metrics[metric]]
        raise ConfigError(f"checkpoint monitor '{monitor}' is not a validation metric of this "
                          f"model; pick one of {', '.join(logged)}")
    if metrics[names[monitor]]:
        raise ConfigError(f"checkpoint monitor '{monitor}' is never logged: "
                          f"{metrics[names[monitor]]}")


def pick_device(trainer: dict, world_size: int, local_rank: int) -> torch.device:
    accelerator = str(trainer["accelerator"]).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator is gpu but no CUDA device is visible: set "
                          "trainer.accelerator=cpu")
    devices, num_nodes = trainer["devices"], int(trainer["num_nodes"] or 1)
    if isinstance(devices, int) and devices > 0 and devices * num_nodes != world_size:
        raise ConfigError(f"trainer.devices={devices} x trainer.num_nodes={num_nodes} != "
                          f"{world_size} processes started; launch with torchrun "
                          f"--nproc_per_node {devices} or set trainer.devices")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def validation_interval(trainer: dict) -> int:
    """`val_check_interval`: an int counts steps; a float is a fraction of the
    `limit_train_batches` "epoch"."""
    interval, epoch = trainer["val_check_interval"], trainer["limit_train_batches"]
    if isinstance(interval, int) and not isinstance(interval, bool):
        return max(1, interval)
    if isinstance(epoch, int):
        return max(1, round(interval * epoch))
    return int(trainer["max_steps"])  # no epoch length on an endless stream: validate at the end


def time_budget(max_time_per_run, max_time) -> float | None:
    """Seconds since the epoch when to stop; NeMo's "DD:HH:MM:SS" (or Lightning's dict) format."""
    value = max_time_per_run or max_time
    if not value:
        return None
    if isinstance(value, dict):
        seconds = timedelta(**value).total_seconds()
    else:
        parts = [float(p) for p in str(value).split(":")]
        seconds = sum(p * m for p, m in zip(reversed(parts), (1, 60, 3600, 86400)))
    return time.time() + seconds


def every_n(ckpt_params: dict, step: int) -> bool:
    n = ckpt_params.get("every_n_train_steps")
    return bool(n) and step % int(n) == 0


def clip_gradients(params: list, clip_val, algorithm) -> torch.Tensor:
    """Clip by `gradient_clip_algorithm`; the total norm (before norm clipping), a device tensor."""
    if clip_val and algorithm != "value":
        return torch.nn.utils.clip_grad_norm_(params, clip_val)
    if clip_val:
        torch.nn.utils.clip_grad_value_(params, clip_val)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rank_states(batches_drawn: int, world_size: int, skipped: dict | None = None) -> list:
    """Each rank's RNG states, data position and skip counts, so that a resumed run continues
    exactly where it stopped. Plain lists and dicts of ints: they pickle across ranks and load with
    weights_only=True."""
    _, numpy_keys, numpy_pos, *_ = np.random.get_state()
    state = {"batches": batches_drawn, "skipped": dict(skipped or {}),
             "python": list(random.getstate()[1]),
             "numpy": [*numpy_keys.tolist(), numpy_pos],
             "torch": torch.get_rng_state().tolist(),
             "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else []}
    if world_size == 1 or not dist.is_initialized():
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"][:-1], dtype=np.uint32),
                         state["numpy"][-1], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Meter:
    """What the log line reports, summed between two log lines as tensors where they are: the host
    reads them at the log line only (no GPU sync in a step)."""

    def __init__(self):
        self.reset()
        self.non_finite = self.in_a_row = 0  # steps skipped for non-finite values: in all, in a row
        self.too_many_bad = False  # MAX_BAD_STEPS in a row; a tensor until summary() reads it

    def reset(self):
        self.start, self.steps, self.micro_steps = time.time(), 0, 0
        self.tokens, self.audio_seconds, self.loss, self.grad_norm = 0, 0.0, 0.0, 0.0
        self.logs = {}

    def add(self, out: dict, batch: dict):
        self.micro_steps += 1
        self.tokens += out.get("num_tokens", 0)
        self.audio_seconds += float(batch.get("audio_seconds", 0.0))
        for key, value in out.get("log", {}).items():
            self.logs[key] = self.logs.get(key, 0.0) + value

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor):
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.non_finite += (~finite).long()
        self.in_a_row = (self.in_a_row + 1) * (~finite).long()
        self.too_many_bad = self.too_many_bad | (self.in_a_row >= MAX_BAD_STEPS)

    def step_skips(self) -> Counter:
        """Steps the loop skipped in the whole run (reads the device counter)."""
        return Counter({"non-finite loss": int(self.non_finite)})

    def summary(self, world_size, lr, device, data_skips) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        counts = torch.tensor([float(self.tokens), self.audio_seconds], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(counts)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, KiB
        steps, micro_steps = max(self.steps, 1), max(self.micro_steps, 1)
        metrics = {"loss": float(self.loss) / steps,
                   **{k: float(v) / micro_steps for k, v in self.logs.items()},
                   "lr": lr, "grad_norm": float(self.grad_norm) / steps,
                   "tokens_per_s": counts[0].item() / elapsed,
                   "audio_s_per_s": counts[1].item() / elapsed,
                   "ms_per_step": 1000 * elapsed / steps, "peak_mem_gb": memory}
        skipped = Counter(data_skips) + self.step_skips()  # what the data and the loop dropped
        metrics["skipped"] = sum(skipped.values())
        metrics.update({f"skipped/{reason}": n for reason, n in sorted(skipped.items())})
        self.too_many_bad = bool(self.too_many_bad)
        self.reset()
        return metrics


def format_log(step: int, max_steps: int, m: dict) -> str:
    extra = "".join(f" | {k} {v:.4f}" for k, v in m.items() if k.endswith("_loss"))
    reasons = ", ".join(f"{k.removeprefix('skipped/')} {v}" for k, v in m.items()
                        if k.startswith("skipped/"))
    return (f"step {step}/{max_steps} | loss {m['loss']:.4f}{extra} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s | {m['audio_s_per_s']:.1f} audio s/s | "
            f"{m['ms_per_step']:.0f} ms/step | mem {m['peak_mem_gb']:.2f} GB | "
            f"skipped {m['skipped']}" + (f" ({reasons})" if reasons else ""))


def make_loggers(exp: dict, log_dir: Path, cfg: dict) -> list:
    """The loggers exp_manager asks for; each package is imported before any of them writes."""
    modules = {}
    for key, module, package in (
            ("create_tensorboard_logger", "torch.utils.tensorboard", "tensorboard"),
            ("create_wandb_logger", "wandb", "wandb")):
        try:
            modules[key] = importlib.import_module(module) if exp.get(key) else None
        except ImportError:
            raise ConfigError(f"{key} needs the {package} package: pip install {package}") from None
    tensorboard, wandb = modules["create_tensorboard_logger"], modules["create_wandb_logger"]
    loggers = []
    if tensorboard:
        loggers.append(_TensorBoard(tensorboard.SummaryWriter(str(log_dir / "tensorboard"))))
    if wandb:
        kwargs = {k: v for k, v in (exp.get("wandb_logger_kwargs") or {}).items() if v is not None}
        loggers.append(_Wandb(wandb.init(dir=str(log_dir), config=cfg, **kwargs)))
    return loggers


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, run):
        self.run = run

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def log_metrics(loggers, metrics, step):
    for logger in loggers:
        logger.log(metrics, step)


if __name__ == "__main__":
    cli(main)
