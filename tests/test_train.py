import math
import time

import pytest
import torch

from config import ConfigError
from checkpoint import atomic_save
from train import (build_optimizer, build_scheduler, clip_gradients, cosine_annealing, time_budget,
                   validation_interval)


def nemo_cosine(step, base, warmup, max_steps, min_lr):
    """NeMo's CosineAnnealing as its documentation states it, written out independently."""
    if step <= warmup and warmup > 0:
        return base * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    return (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) + min_lr


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
    scheduler = build_scheduler({"_target_": "nemo.core.optim.lr_scheduler.CosineAnnealing", "warmup_steps": 5,
                                 "min_lr": 1e-4, "max_steps": 40}, optimizer, max_steps=40)
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
    assert validation_interval({"val_check_interval": 250, "limit_train_batches": 1.0, "max_steps": 1000}) == 250
    assert validation_interval({"val_check_interval": 0.5, "limit_train_batches": 100, "max_steps": 1000}) == 50
    assert validation_interval({"val_check_interval": 1.0, "limit_train_batches": 1.0, "max_steps": 700}) == 700


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


def test_clip_gradients_returns_the_norm_and_clips():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    for algorithm, clipped in (("norm", [0.6, -0.8, 0.0]), ("value", [0.5, -0.5, 0.0])):
        params[0].grad, params[1].grad = torch.tensor([3.0, -4.0]), torch.tensor([0.0])
        norm = clip_gradients(params, 0.5 if algorithm == "value" else 1.0, algorithm)
        assert float(norm) == pytest.approx(0.5 * 2**0.5 if algorithm == "value" else 5.0)
        assert torch.cat([p.grad for p in params]).tolist() == pytest.approx(clipped, abs=1e-5)
