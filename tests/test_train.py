import json
import math
import time

import pytest
import torch

import train
from checkpoint import atomic_save
from config import ConfigError
from conftest import ROOT, SMALL, salm_dataset, tone
from data import TrainBatches
from train import (build_optimizer, build_scheduler, clip_gradients, cosine_annealing,
                   resume_rank_state, time_budget, validation_interval)


def nemo_cosine(step, base, warmup, max_steps, min_lr):
    """NeMo's CosineAnnealing as its documentation states it, written out independently."""
    if step <= warmup and warmup > 0:
        return base * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    angle = math.pi * (step - warmup) / (max_steps - warmup)
    return (base - min_lr) * 0.5 * (1 + math.cos(angle)) + min_lr


def test_cosine_annealing_known_points():
    base, min_lr = 1e-3, 1e-5
    assert cosine_annealing(0, base, 0, 100, min_lr) == pytest.approx(base)
    assert cosine_annealing(50, base, 0, 100, min_lr) == pytest.approx((base - min_lr) / 2 + min_lr)
    assert cosine_annealing(100, base, 0, 100, min_lr) == pytest.approx(min_lr)
    assert cosine_annealing(150, base, 0, 100, min_lr) == pytest.approx(min_lr)
    assert cosine_annealing(0, base, 10, 100, min_lr) == pytest.approx(base / 11)
    assert cosine_annealing(10, base, 10, 100, min_lr) == pytest.approx(base)


def test_scheduler_steps_follow_the_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-3)
    scheduler = build_scheduler({"_target_": "nemo.core.optim.lr_scheduler.CosineAnnealing",
                                 "warmup_steps": 5, "min_lr": 1e-4, "max_steps": 40}, optimizer,
                                max_steps=40)
    seen = []
    for _ in range(45):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([nemo_cosine(s, 2e-3, 5, 40, 1e-4) for s in range(45)])


def test_optimizer_allowlist():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer({"_target_": "torch.optim.AdamW", "lr": 3e-4, "betas": [0.9, 0.98],
                           "weight_decay": 1e-3, "foreach": True}, params)
    assert isinstance(opt, torch.optim.AdamW) and tuple(opt.param_groups[0]["betas"]) == (0.9, 0.98)
    for target in ("os.system", "builtins.eval", "torch.nn.Linear", "mypkg.optim.AdamW"):
        with pytest.raises(ConfigError, match="not allowed"):
            build_optimizer({"_target_": target}, params)
    with pytest.raises(ConfigError, match="not supported"):
        build_scheduler({"_target_": "subprocess.run"}, opt, 10)


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_save({"step": 3, "w": torch.ones(2)}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 3


def test_time_budget_and_validation_interval():
    assert time_budget("00:03:50:00", None) - time.time() == pytest.approx(13800, abs=5)
    assert time_budget(None, {"hours": 1}) - time.time() == pytest.approx(3600, abs=5)
    assert time_budget(None, None) is None
    interval = lambda every, limit, max_steps: validation_interval(
        {"val_check_interval": every, "limit_train_batches": limit, "max_steps": max_steps})
    assert interval(250, 1.0, 1000) == 250
    assert interval(0.5, 100, 1000) == 50
    assert interval(1.0, 1.0, 700) == 700


def test_rank_state_round_trip_restores_every_rng():
    import random

    import numpy as np

    from train import gather_rank_states, set_rng_state
    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    np.random.rand(7), random.random(), torch.rand(3)  # move every stream off its seed
    state = gather_rank_states(batches_drawn=11, world_size=1)[0]
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    set_rng_state(state)
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    assert state["batches"] == 11


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __reduce__(self):
        import os
        return os.system, ("echo pwned > pwned.txt",)


def test_a_pickled_payload_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    from train import load_checkpoint
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "step": 1, "extra": _Payload()}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="not loaded"):
        load_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "pwned.txt").exists()


def test_a_run_resumed_with_more_processes_goes_on_with_the_data(tmp_path, capsys):
    """Rank r of W takes batches r, r + W, ... of one stream: after a 1-process run drew 5 batches,
    two ranks together take batches 5, 6, 7, 8 next, none seen before and none lost."""
    rows = [{"audio_filepath": str(tone(tmp_path / f"{i}.wav", 0.2 + 0.01 * i)), "text": f"{i}"}
            for i in range(30)]
    (tmp_path / "m.json").write_text("\n".join(json.dumps(row) for row in rows))
    cfg = {"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 3, "shuffle": True,
           "seed": 5}
    stream = iter(TrainBatches(cfg, salm_dataset()))
    one_process = [next(stream)["ids"] for _ in range(9)]
    saved = [{"batches": 5, "skipped": {"unreadable audio": ["x"]}}]  # the 1-process checkpoint's
    taken = []
    for rank in range(2):
        state = resume_rank_state(saved, rank, world_size=2)
        assert "python" not in state  # no RNG state of its own: seeded afresh
        batches = TrainBatches(cfg, salm_dataset(), rank, 2, skip=state["batches"],
                               skipped=state["skipped"])
        stream = iter(batches)
        taken += [next(stream)["ids"] for _ in range(2)]
    assert sorted(taken) == sorted(one_process[5:9])
    assert capsys.readouterr().out.splitlines()[0] == (
        "note: resuming a run of 1 process(es) with 2: each rank skips its share of the 5 "
        "batches drawn so far (3 on rank 0), RNG streams restart from the seed, and the global "
        "batch is 2/1 of what it was")
    assert resume_rank_state(saved * 2, 1, world_size=2) is saved[0]  # as many processes: exact


def test_rerunning_a_finished_run_says_so_and_keeps_its_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["configs/salm.yaml", *SMALL, "data.validation_ds.datasets={}",
            "data.train_ds.batch_size=2", f"exp_manager.explicit_log_dir={tmp_path}",
            "exp_manager.resume_if_exists=true"]
    train.main(args + ["trainer.max_steps=2"])
    finished = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    train.main(args + ["trainer.max_steps=1"])
    out = capsys.readouterr().out
    assert ("note: last.ckpt is at step 2 and trainer.max_steps is 1: nothing is left to train "
            "(raise trainer.max_steps to go on)") in out.splitlines()
    assert "stopped at step 2: max_steps" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == finished  # not rewritten


def test_clip_gradients_returns_the_norm_and_clips():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    for algorithm, clipped in (("norm", [0.6, -0.8, 0.0]), ("value", [0.5, -0.5, 0.0])):
        params[0].grad, params[1].grad = torch.tensor([3.0, -4.0]), torch.tensor([0.0])
        norm = clip_gradients(params, 0.5 if algorithm == "value" else 1.0, algorithm)
        assert float(norm) == pytest.approx(0.5 * 2**0.5 if algorithm == "value" else 5.0)
        assert torch.cat([p.grad for p in params]).tolist() == pytest.approx(clipped, abs=1e-5)
