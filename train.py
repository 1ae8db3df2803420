"""Train SALM, DuplexS2SModel or DuplexS2SSpeechDecoderModel from a NeMo-style YAML config.

    python train.py configs/salm.yaml                                        # one process: CPU or one GPU
    torchrun --nproc_per_node 8 train.py configs/salm.yaml trainer.devices=8  # DDP on one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 train.py CONFIG trainer.num_nodes=2

Any `key=value` after the config overrides it (see config.py). The model class follows from the config: a
`speech_decoder` section means DuplexS2SSpeechDecoderModel, a `pretrained_audio_codec` DuplexS2SModel, else SALM.
"""
import contextlib
import math
import os
import pickle
import random
import resource
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import OPTIMIZERS, ConfigError, load_config, save_config
from data import TrainBatches, make_val_loaders

SCHEDULERS = ("CosineAnnealing",)
MAX_BAD_STEPS = 10  # non-finite losses in a row before the run stops


def main(argv: list[str]) -> torch.nn.Module | None:
    """Run training as the command line says; returns the trained model (for tests and notebooks)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return None
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once, also when piped to a file
    # 1. distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0 of 1
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    master = rank == 0
    say = print if master else None

    # 2. config, devices, precision
    cfg = load_config(argv[0], argv[1:], report=say)
    trainer, exp = cfg["trainer"], cfg["exp_manager"]
    device = pick_device(trainer, world_size, local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    precision = str(trainer["precision"])
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if precision not in ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(f"trainer.precision '{precision}' is not supported: use 32, bf16-mixed, 16-mixed or bf16-true")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # 3. run directory and what to resume from
    log_dir = run_dir(exp)
    resume_path = find_resume_checkpoint(exp, log_dir)
    if master:
        (log_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for partial in (log_dir / "checkpoints").glob("*.tmp"):  # left by a run killed while saving
            partial.unlink()
        save_config(cfg, log_dir / "exp_config.yaml")
        print(f"run directory: {log_dir}" + (f" (resuming from {resume_path.name})" if resume_path else ""))

    # 4. model, optimizer, LR schedule; the same init on every rank, then a per-rank seed for dropout/sampling
    seed = int(cfg["data"]["train_ds"].get("seed") or 0)
    seed_everything(seed)
    model = build_model(cfg["model"]).to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
        for module in model.modules():  # the mel frontend and the codec keep their fp32 numerics
            if getattr(module, "keep_fp32", False):
                module.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg["model"].get("optimizer"), params)
    scheduler = build_scheduler(cfg["model"].get("lr_scheduler"), optimizer, trainer["max_steps"])
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    step, best = 0, []
    if resume_path:
        state = load_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best = state["step"], [tuple(b) for b in state["best"]]
        rank_state = state["ranks"][rank] if rank < len(state["ranks"]) else state["ranks"][0]
        set_rng_state(rank_state)
    else:
        seed_everything(seed + rank)
    ddp = DistributedDataParallel(TrainStep(model), device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else TrainStep(model)

    # 5. data: each rank takes every world_size-th batch of the same seeded stream
    dataset = model.make_dataset(cfg["data"])
    accumulate = int(trainer["accumulate_grad_batches"])
    batches = TrainBatches(cfg["data"]["train_ds"], dataset, rank, world_size,
                           skip=int(rank_state["batches"]) if resume_path else 0,
                           skipped=rank_state.get("skipped") if resume_path else None)
    val_cfg = cfg["data"]["validation_ds"]
    val_loaders = make_val_loaders(val_cfg, dataset, rank, world_size) if has_data(val_cfg) else {}
    loggers = make_loggers(exp, log_dir, cfg) if master else []

    # 6. training loop
    max_steps, log_every = int(trainer["max_steps"]), int(trainer["log_every_n_steps"])
    val_every = validation_interval(trainer)
    deadline = time_budget(exp.get("max_time_per_run"), trainer.get("max_time"))
    ckpt_params = exp["checkpoint_callback_params"]
    if val_loaders and trainer["num_sanity_val_steps"] and not resume_path:
        validate(model, val_loaders, int(trainer["num_sanity_val_steps"]), device, autocast_dtype)
    stream, bad_steps, window = iter(batches), 0, Meter()
    progress = tqdm(total=max_steps, initial=step, desc="train", disable=not master or not trainer["enable_progress_bar"],
                    dynamic_ncols=True)
    stop_reason = "max_steps"
    while step < max_steps:
        model.train()
        micro_batches = [next(stream) for _ in range(accumulate)]
        loss_sum, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == accumulate - 1 or world_size == 1 else ddp.no_sync()
            with sync, torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = ddp(to_device(batch, device))
                scaler.scale(out["loss_sum"]).backward()
            loss_sum += out["loss_sum"].detach().float()
            count += out["count"]
            window.add(out, batch)
        # gradients of summed losses / the global number of supervised positions = the exact global mean,
        # however the tokens fall into micro-batches and ranks (DDP already averaged over ranks)
        totals = torch.stack([loss_sum, count])
        if world_size > 1:
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        scaler.unscale_(optimizer)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(world_size / totals[1].clamp(min=1))
        grad_norm = clip_gradients(params, trainer["gradient_clip_val"], trainer["gradient_clip_algorithm"])
        if math.isfinite(loss):
            scaler.step(optimizer)
            bad_steps = 0
        else:
            bad_steps += 1
            window.skipped["non-finite loss"] += 1
            if bad_steps >= MAX_BAD_STEPS:
                stop_reason = f"{bad_steps} non-finite losses in a row (check the learning rate, precision and data)"
                break
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        progress.update(1)
        window.add_step(loss, grad_norm)

        if step % log_every == 0 or step == max_steps:
            metrics = window.summary(world_size, optimizer.param_groups[0]["lr"], device, batches.skipped)
            if master:
                progress.write(format_log(step, max_steps, metrics))
                log_metrics(loggers, metrics, step)
        results = None
        if val_loaders and (step % val_every == 0 or step == max_steps):
            results, _ = validate(model, val_loaders, trainer["limit_val_batches"], device, autocast_dtype)
            if master:
                progress.write("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
                log_metrics(loggers, results, step)
        if exp["create_checkpoint_callback"] and (results or every_n(ckpt_params, step)):
            ranks = gather_rank_states(batches.num_batches, world_size, batches.skipped + window.skipped)
            best = save_checkpoints(log_dir, step, model, optimizer, scheduler, scaler, cfg, best, ckpt_params,
                                    results, ranks, master)
        if deadline and time.time() > deadline:
            stop_reason = "max_time_per_run reached; rerun the same command to continue"
            break
    progress.close()
    if exp["create_checkpoint_callback"]:
        ranks = gather_rank_states(batches.num_batches, world_size, batches.skipped + window.skipped)
        save_checkpoints(log_dir, step, model, optimizer, scheduler, scaler, cfg, best, ckpt_params, None, ranks, master)
    if master:
        print(f"stopped at step {step}: {stop_reason}")

    # 7. held-out evaluation with generation (WER for SALM, BLEU for the duplex models)
    if val_loaders and bad_steps < MAX_BAD_STEPS:
        results, pairs = validate(model, val_loaders, trainer["limit_val_batches"], device, autocast_dtype,
                                  generate=True)
        if master:
            print("held-out: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
            for reference, hypothesis in pairs[:5]:
                print(f"  ref: {reference}\n  hyp: {hypothesis}")
            log_metrics(loggers, results, step)
    for logger in loggers:
        logger.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if bad_steps >= MAX_BAD_STEPS:
        sys.exit(f"error: {stop_reason}")
    return model


class TrainStep(torch.nn.Module):
    """Routes DDP's forward to the model's training_step, so DDP's gradient hooks see every micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_step(batch)


def build_model(model_cfg: dict) -> torch.nn.Module:
    if model_cfg.get("speech_decoder"):
        from duplex_s2s import DuplexS2SSpeechDecoderModel as cls
    elif model_cfg.get("pretrained_audio_codec"):
        from duplex_s2s import DuplexS2SModel as cls
    else:
        from salm import SALM as cls
    return cls(model_cfg)


def build_optimizer(opt_cfg: dict | None, params) -> torch.optim.Optimizer:
    """`model.optimizer`: `_target_` names a torch.optim class (only those); the other keys are its arguments."""
    opt_cfg = dict(opt_cfg or {"_target_": "torch.optim.AdamW", "lr": 1e-4})
    target = opt_cfg.pop("_target_", None) or opt_cfg.pop("name", "AdamW")
    name = target.rsplit(".", 1)[-1]
    if name not in OPTIMIZERS or not target.removesuffix(name).rstrip(".") in ("", "torch.optim"):
        raise ConfigError(f"model.optimizer._target_ '{target}' is not allowed: use torch.optim.<{'|'.join(OPTIMIZERS)}>")
    if not params:
        raise ConfigError("no trainable parameters: model.freeze_params froze everything")
    opt_cfg.pop("sched", None)
    for key in ("lr", "weight_decay", "eps"):
        if isinstance(opt_cfg.get(key), str):
            opt_cfg[key] = float(opt_cfg[key])
    return getattr(torch.optim, name)(params, **opt_cfg)


def build_scheduler(sched_cfg: dict | None, optimizer, max_steps: int):
    """NeMo's CosineAnnealing (warmup, then cosine from the base LR to min_lr at max_steps), stepped per step."""
    if not sched_cfg:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sched_cfg = dict(sched_cfg)
    target = sched_cfg.pop("_target_", None) or sched_cfg.pop("name", "CosineAnnealing")
    if target.rsplit(".", 1)[-1] not in SCHEDULERS:
        raise ConfigError(f"model.lr_scheduler '{target}' is not supported: use CosineAnnealing")
    total = int(sched_cfg.get("max_steps") or max_steps)
    warmup = int(sched_cfg.get("warmup_steps") or round(float(sched_cfg.get("warmup_ratio") or 0) * total))
    min_lr = float(sched_cfg.get("min_lr", 0.0))
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_annealing(s, base_lr, warmup, total, min_lr) / base_lr)


def cosine_annealing(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    if warmup_steps and step <= warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step > max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)) + min_lr


@torch.no_grad()
def validate(model, loaders: dict, limit, device, autocast_dtype, generate: bool = False) -> tuple[dict, list]:
    """Per-set metrics (`val_{metric}_{name}`) and their mean over sets (`val_{metric}`), gathered over ranks,
    plus (reference, hypothesis) pairs when the model generated."""
    model.eval()
    results, per_metric, pairs = {}, {}, []
    for name, loader in loaders.items():
        totals = {}
        for i, batch in enumerate(loader):
            if isinstance(limit, int) and i >= limit:
                break
            if batch.get("empty"):
                continue
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model.validation_step(to_device(batch, device), generate=generate)
            for key, value in out.items():
                totals[key] = totals.get(key, 0) + value if not isinstance(value, list) else totals.get(key, []) + value
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, totals)
            totals = {k: sum((g[k] for g in gathered), [] if isinstance(v, list) else 0) for k, v in totals.items()}
        pairs += totals.get("pairs", [])
        for metric, value in model.validation_summary(totals).items():
            results[f"val_{metric}_{name}"] = value
            per_metric.setdefault(f"val_{metric}", []).append(value)
    results.update({k: sum(v) / len(v) for k, v in per_metric.items()})
    model.train()
    return results, pairs


def save_checkpoints(log_dir, step, model, optimizer, scheduler, scaler, cfg, best, params, results, ranks, master):
    """`last.ckpt` always; `step=N.ckpt` kept while it is among the `save_top_k` best by `monitor`.
    Only rank 0 writes; every rank returns the same updated ranking."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "config": cfg, "best": best, "ranks": ranks}
    ckpt_dir = log_dir / "checkpoints"
    if results is not None and params["save_top_k"] != 0:
        monitor = params["monitor"]
        if monitor not in results:
            raise ConfigError(f"checkpoint monitor '{monitor}' is not a validation metric; pick one of "
                              f"{', '.join(sorted(results))}")
        sign = -1 if params["mode"] == "max" else 1
        best = sorted(best + [(sign * results[monitor], step)])
        keep = best if params["save_top_k"] < 0 else best[: params["save_top_k"]]
        dropped, best = best[len(keep):], keep
        state["best"] = best
        if master and any(s == step for _, s in best):
            atomic_save(state, ckpt_dir / f"step={step}.ckpt")
        for _, old_step in dropped if master else []:
            (ckpt_dir / f"step={old_step}.ckpt").unlink(missing_ok=True)
    if master:
        atomic_save(state, ckpt_dir / "last.ckpt")
    return best


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain tensors and containers: pickled code in it is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not loaded: it is not a torch.save file of tensors and plain containers "
                         "(pickled objects are refused, weights_only=True)") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}") \
            from None


def atomic_save(state: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_dir(exp: dict) -> Path:
    if exp.get("explicit_log_dir"):
        return Path(exp["explicit_log_dir"])
    base = Path(exp.get("exp_dir") or "nemo_experiments") / (exp.get("name") or "default")
    if exp.get("version"):
        return base / str(exp["version"])
    existing = sorted(p for p in base.glob("*") if (p / "checkpoints" / "last.ckpt").exists())
    if exp.get("resume_if_exists") and existing:
        return existing[-1]
    if exp.get("use_datetime_version", True):
        stamp = os.environ.get("SLM_RUN_VERSION") or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        os.environ["SLM_RUN_VERSION"] = stamp
        return base / stamp
    return base / f"version_{len(list(base.glob('version_*')))}"


def find_resume_checkpoint(exp: dict, log_dir: Path) -> Path | None:
    if exp.get("resume_from_checkpoint"):
        path = Path(exp["resume_from_checkpoint"])
        if not path.is_file():
            raise ConfigError(f"exp_manager.resume_from_checkpoint {path} does not exist")
        return path
    last = log_dir / "checkpoints" / "last.ckpt"
    if exp.get("resume_if_exists"):
        if last.is_file():
            return last
        if not exp.get("resume_ignore_no_checkpoint"):
            raise ConfigError(f"resume_if_exists is set but {last} does not exist; set "
                              "exp_manager.resume_ignore_no_checkpoint=true to start a new run")
    elif last.is_file():
        raise ConfigError(f"{log_dir} already holds checkpoints: set exp_manager.resume_if_exists=true to continue "
                          "that run, or choose another exp_manager.explicit_log_dir")
    return None


def pick_device(trainer: dict, world_size: int, local_rank: int) -> torch.device:
    accelerator = str(trainer["accelerator"]).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator is gpu but no CUDA device is visible: set trainer.accelerator=cpu")
    devices, num_nodes = trainer["devices"], int(trainer["num_nodes"] or 1)
    if isinstance(devices, int) and devices > 0 and devices * num_nodes != world_size:
        raise ConfigError(f"trainer.devices={devices} x trainer.num_nodes={num_nodes} != {world_size} processes "
                          f"started; launch with torchrun --nproc_per_node {devices} or set trainer.devices")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def validation_interval(trainer: dict) -> int:
    """`val_check_interval`: an int counts steps; a float is a fraction of the `limit_train_batches` "epoch"."""
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


def has_data(ds_cfg: dict) -> bool:
    return any(ds_cfg.get(k) for k in ("input_cfg", "shar_path", "cuts_path", "manifest_filepath", "datasets"))


def clip_gradients(params, clip_val, algorithm) -> float:
    if clip_val:
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            return float(torch.nn.utils.clip_grad_norm_(params, clip_val))
    return float(torch.nn.utils.clip_grad_norm_(params, float("inf")))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rank_states(batches_drawn: int, world_size: int, skipped: dict | None = None) -> list:
    """Each rank's RNG states, data position and skip counts, so that a resumed run continues exactly where it
    stopped. Plain lists and dicts of ints: they pickle across ranks and load with weights_only=True."""
    _, numpy_keys, numpy_pos, *_ = np.random.get_state()
    state = {"batches": batches_drawn, "skipped": dict(skipped or {}), "python": list(random.getstate()[1]),
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
    np.random.set_state(("MT19937", np.array(state["numpy"][:-1], dtype=np.uint32), state["numpy"][-1], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Meter:
    """What the log line reports, summed between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.steps, self.micro_steps = time.time(), 0, 0
        self.tokens, self.audio_seconds, self.loss, self.grad_norm = 0, 0.0, 0.0, 0.0
        self.logs, self.skipped = {}, Counter()

    def add(self, out: dict, batch: dict):
        """Tensors are summed where they are and read at the log line: no GPU sync in every step."""
        self.micro_steps += 1
        self.tokens += out.get("num_tokens", 0)
        self.audio_seconds += float(batch.get("audio_seconds", 0.0))
        for key, value in out.get("log", {}).items():
            self.logs[key] = self.logs.get(key, 0.0) + value

    def add_step(self, loss: float, grad_norm: float):
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm

    def summary(self, world_size, lr, device, data_skips) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        counts = torch.tensor([float(self.tokens), self.audio_seconds], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(counts)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)
        steps, micro_steps = max(self.steps, 1), max(self.micro_steps, 1)
        metrics = {"loss": self.loss / steps, **{k: float(v) / micro_steps for k, v in self.logs.items()},
                   "lr": lr, "grad_norm": self.grad_norm / steps,
                   "tokens_per_s": counts[0].item() / elapsed, "audio_s_per_s": counts[1].item() / elapsed,
                   "ms_per_step": 1000 * elapsed / steps, "peak_mem_gb": memory}
        skipped = Counter(data_skips) + self.skipped  # items and batches the data dropped, steps the loop dropped
        metrics["skipped"] = sum(skipped.values())
        metrics.update({f"skipped/{reason}": n for reason, n in sorted(skipped.items())})
        skipped_steps = self.skipped
        self.reset()
        self.skipped = skipped_steps  # step skips are counted for the whole run, like data skips
        return metrics


def format_log(step: int, max_steps: int, m: dict) -> str:
    extra = "".join(f" | {k} {v:.4f}" for k, v in m.items() if k.endswith("_loss"))
    reasons = ", ".join(f"{k.removeprefix('skipped/')} {v}" for k, v in m.items() if k.startswith("skipped/"))
    return (f"step {step}/{max_steps} | loss {m['loss']:.4f}{extra} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s | {m['audio_s_per_s']:.1f} audio s/s | {m['ms_per_step']:.0f} ms/step | "
            f"mem {m['peak_mem_gb']:.2f} GB | skipped {m['skipped']}" + (f" ({reasons})" if reasons else ""))


def make_loggers(exp: dict, log_dir: Path, cfg: dict) -> list:
    loggers = []
    if exp.get("create_tensorboard_logger"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("create_tensorboard_logger needs the tensorboard package: pip install tensorboard") from None
        loggers.append(_TensorBoard(SummaryWriter(str(log_dir / "tensorboard"))))
    if exp.get("create_wandb_logger"):
        try:
            import wandb
        except ImportError:
            raise ConfigError("create_wandb_logger needs the wandb package: pip install wandb") from None
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
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # config, data and path problems: one line, not a traceback
        if os.environ.get("SLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
