"""End-to-end runs of train.py on the shipped demo data with a very small SALM (marked slow)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from config import load_config
from conftest import ROOT, SMALL
from data import TrainBatches
from train import build_model, seed_everything

pytestmark = pytest.mark.slow  # every test here trains; quick checks of train.py: test_train.py


# tiny models; and two busy threads per process stall a shared CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_python(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def run_train(args):
    return run_python(["train.py", "configs/salm.yaml", *SMALL, *args])


def test_train_saves_config_and_checkpoints(tmp_path):
    out = run_train([f"exp_manager.explicit_log_dir={tmp_path}", "trainer.max_steps=4",
                     "trainer.val_check_interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "exp_config.yaml").is_file()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # save_top_k: 1
    assert "last.ckpt" in names and len([n for n in names if n.startswith("step=")]) == 1
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["step"] == 4 and state["config"]["trainer"]["max_steps"] == 4
    assert "step 4/4 | loss" in out.stdout and "tok/s" in out.stdout and "held-out:" in out.stdout
    assert "val_wer" in out.stdout


# plain SGD with lr 1 and no schedule or clipping: the weight change is minus the gradient itself
SGD = ["model.optimizer={_target_: torch.optim.SGD, lr: 1.0}", "model.lr_scheduler=null",
       "trainer.gradient_clip_val=null", "exp_manager.create_checkpoint_callback=false"]
PROBE = ("import os, sys, torch\nsys.path.insert(0, os.getcwd())\nimport train\n"
         "model = train.main(sys.argv[2:])\n"
         "rank = os.environ.get('RANK', 'single')\n"
         "torch.save(model.state_dict(), f\"{sys.argv[1]}/{rank}.pt\")\n")


def trained_weights(tmp_path, name, args, ranks=1):
    """Train with train.py (under torchrun for ranks > 1): the final weights of every rank, and its
    output."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / name).mkdir()
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    out = run_python([*(torchrun if ranks > 1 else []), str(tmp_path / "probe.py"),
                      str(tmp_path / name), "configs/salm.yaml", *SMALL, *args,
                      f"exp_manager.explicit_log_dir={tmp_path / name / 'run'}"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    weights = [torch.load(path) for path in sorted((tmp_path / name).glob("*.pt"))]
    return weights, out.stdout + out.stderr


def test_gradient_accumulation_equals_a_double_batch_and_the_mean_loss_gradient(tmp_path):
    common = ["trainer.max_steps=1", "data.train_ds.shuffle=false", *SGD]
    (accumulated,), _ = trained_weights(tmp_path, "accumulated", [
        *common, "data.train_ds.batch_size=4", "trainer.accumulate_grad_batches=2"])
    (double,), _ = trained_weights(tmp_path, "double", [*common, "data.train_ds.batch_size=8"])
    # by hand: the model's own mean loss over the same 8 items (one batch), its gradient, one step
    cfg = load_config("configs/salm.yaml", [*SMALL, *common, "data.train_ds.batch_size=8"], None)
    seed_everything(cfg["data"]["train_ds"]["seed"])
    model = build_model(cfg["model"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(TrainBatches(cfg["data"]["train_ds"], model.make_dataset(cfg["data"]))))
    out = model.training_step(batch)
    (out["loss_sum"] / out["count"]).backward()
    by_hand = {name: initial[name] - p.grad for name, p in model.named_parameters()}
    moved = 0
    for key, expected in by_hand.items():
        for weights in (accumulated, double):
            torch.testing.assert_close(weights[key] - initial[key], expected - initial[key],
                                       atol=1e-6, rtol=1e-3)
        moved += int((expected - initial[key]).abs().max() > 1e-4)
    assert moved > 10  # the step really changed the weights


WORDS = zip(["red box", "blue cup", "green bag", "white plate"] * 12,
            ["one two", "small dog", "big cat", "left door", "right door"] * 10)
TEXT_ONLY = [{"id": f"text-{i}", "conversations": [{"from": "User", "value": f"Say: {a} {b}"},
                                                   {"from": "Assistant", "value": f"{a} {b}"}]}
             for i, (a, b) in enumerate(WORDS)]


@pytest.mark.parametrize("data", ["speech and text-only", "text-only"])
def test_torchrun_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path, data):
    # Each rank takes every second batch; one process accumulating two batches per step sees the
    # same items. With speech and text mixed, some steps give one rank a text-only batch and the
    # other speech (its perception must still join the gradient all-reduce); text-only data never
    # runs the perception. SGD: a gradient scaled wrongly moves the weights by as much.
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in TEXT_ONLY))
    text = f"{{type: multimodal_conversation, manifest_filepath: {jsonl}}}"
    speech = ("{type: lhotse_as_conversation, shar_path: assets/demo/asr_train, "
              "tags: {context: 'Repeat after me.'}}")
    inputs = f"[{speech}, {text}]" if data == "speech and text-only" else f"[{text}]"
    common = [f"data.train_ds.input_cfg={inputs}", "data.train_ds.batch_size=2",
              "trainer.max_steps=3", "trainer.val_check_interval=1000", *SGD]
    (rank0, rank1), ddp_log = trained_weights(tmp_path, "ddp", [*common, "trainer.devices=2"],
                                              ranks=2)
    (single,), single_log = trained_weights(tmp_path, "single",
                                            [*common, "trainer.accumulate_grad_batches=2"])
    pattern = re.compile(r"^step \d+/3 \| loss ([\d.]+)", re.M)
    losses = [pattern.findall(log) for log in (ddp_log, single_log)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert "Grad strides do not match" not in ddp_log
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, atol=1e-6, rtol=1e-5)


def test_a_failing_rank_ends_the_other_within_bounded_time(tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\nsys.path.insert(0, os.getcwd())\nimport salm, train\n"
        "if os.environ['RANK'] == '1':\n"
        "    step = salm.SALM.training_step\n"
        "    calls = []\n"
        "    def failing(self, batch):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return step(self, batch)\n"
        "    salm.SALM.training_step = failing\n"
        "train.main(sys.argv[1:])\n")
    start = time.time()
    out = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                      "configs/salm.yaml", *SMALL, "trainer.max_steps=50", "trainer.devices=2",
                      "trainer.val_check_interval=1000",
                      f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    assert out.returncode != 0
    # rank 0, blocked in the gradient all-reduce, is stopped, not left hanging
    assert time.time() - start < 120
    assert "injected failure on rank 1" in out.stdout + out.stderr


def test_val_wer_monitor_generates_in_validation_and_keeps_the_lowest(tmp_path):
    out = run_train([f"exp_manager.explicit_log_dir={tmp_path}", "trainer.max_steps=6",
                     "trainer.val_check_interval=2",
                     "exp_manager.checkpoint_callback_params.monitor=val_wer",
                     "exp_manager.checkpoint_callback_params.mode=min"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("validation:")]
    wers = [float(words[words.index("val_wer") + 1]) for words in lines]
    assert len(wers) == 3 and all(0 < w for w in wers)  # at steps 2, 4 and 6
    best_step = 2 * (wers.index(min(wers)) + 1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step=*.ckpt"))
    assert kept == [f"step={best_step}.ckpt"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["best"] == [(pytest.approx(min(wers), abs=1e-4), best_step)]
