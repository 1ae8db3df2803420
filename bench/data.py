"""Data pipeline headroom: audio seconds per second the loader delivers / audio seconds per second
training consumes (goal >= 10x: the loader never makes a step wait).

    python -m bench.data                  # configs/salm.yaml, its num_workers, on the CPU
    python -m bench.data --config configs/s2s_duplex.yaml data.train_ds.num_workers=2 --batches 16

Each round pulls `--batches` batches from TrainBatches as fast as they come (the clock starts after
the batches its workers made ready while training ran: DataLoader prefetches 2 per worker), then
trains `--steps` steps on loaded batches (to_device -> training_step -> backward -> optimizer
step). Medians over rounds.
"""
import statistics
import time

from bench import common
from data import TrainBatches
from train import build_optimizer, to_device

PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker has ready ahead of the consumer


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, "configs/salm.yaml", reps=3)
    p.add_argument("--batches", type=int, default=8, help="batches the loader delivers per round")
    p.add_argument("--steps", type=int, default=2, help="training steps per round")
    args = p.parse_intermixed_args(argv)
    device, dtype = common.setup(args)
    cfg = common.load(args)
    model = common.build_model(cfg["model"], device, dtype).train()
    optimizer = build_optimizer(cfg["model"].get("optimizer"),
                                [p for p in model.parameters() if p.requires_grad])
    ds_cfg = cfg["data"]["train_ds"]
    num_workers = ds_cfg.get("num_workers") or 0
    stream = iter(TrainBatches(ds_cfg, model.make_dataset(cfg["data"])))
    loaded = []

    def loader_rate() -> float:
        # the batches ready before the clock starts
        loaded.extend(next(stream) for _ in range(PREFETCH_FACTOR * num_workers))
        start = time.perf_counter()
        batches = [next(stream) for _ in range(args.batches)]
        elapsed = time.perf_counter() - start
        loaded.extend(batches)
        return sum(b["audio_seconds"] for b in batches) / elapsed

    def training_rate() -> float:
        batches = [loaded.pop() for _ in range(args.steps)]
        common.sync(device)
        start = time.perf_counter()
        for batch in batches:
            model.training_step(to_device(batch, device))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        common.sync(device)
        return sum(b["audio_seconds"] for b in batches) / (time.perf_counter() - start)

    rounds = [(loader_rate(), training_rate()) for _ in range(args.warmup + args.reps)]
    loader, training = (statistics.median(rates) for rates in zip(*rounds[args.warmup:]))
    audio_per_batch = statistics.mean(b["audio_seconds"] for b in loaded)
    print(f"num_workers {num_workers} | {audio_per_batch:.1f} audio seconds per batch | "
          f"median of {args.reps} rounds")
    print(f"loader delivers {loader:.1f} audio s/s | training consumes {training:.1f} audio s/s "
          f"({1000 * audio_per_batch / training:.0f} ms per step)")
    common.result(("loader_over_training", loader / training, "x", ">= 10x"))


if __name__ == "__main__":
    common.cli(main)
