"""End-to-end runs of train.py on the shipped demo data with a very small SALM (marked slow)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
# A SALM small enough for many short runs: every dropout and dither off so runs are comparable.
SMALL = [
    "model.perception.encoder.n_layers=1", "model.perception.encoder.d_model=32",
    "model.perception.encoder.n_heads=2", "model.perception.encoder.subsampling_conv_channels=16",
    "model.perception.modality_adapter.feat_in=32", "model.perception.modality_adapter.d_model=32",
    "model.perception.modality_adapter.n_heads=2",
    "model.perception.encoder.dropout=0", "model.perception.encoder.dropout_pre_encoder=0",
    "model.perception.encoder.dropout_att=0", "model.perception.modality_adapter.dropout=0",
    "model.perception.preprocessor.dither=0",
    "model.perception.encoder.conv_norm_type=layer_norm", "model.perception.modality_adapter.conv_norm_type=layer_norm",
    "data.train_ds.batch_size=4", "data.train_ds.num_workers=0", "data.validation_ds.batch_size=8",
    "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
pytestmark = pytest.mark.slow


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; and two busy threads per process stall a shared CPU


def run_python(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def run_train(args):
    return run_python(["train.py", "configs/salm.yaml", *SMALL, *args])


def test_train_saves_config_and_checkpoints(tmp_path):
    out = run_train([f"exp_manager.explicit_log_dir={tmp_path}", "trainer.max_steps=4", "trainer.val_check_interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "exp_config.yaml").is_file()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in names and len([n for n in names if n.startswith("step=")]) == 1  # save_top_k: 1
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["step"] == 4 and state["config"]["trainer"]["max_steps"] == 4
    assert "step 4/4 | loss" in out.stdout and "tok/s" in out.stdout and "held-out:" in out.stdout
    assert "val_wer" in out.stdout


def test_gradient_accumulation_equals_a_double_batch(tmp_path):
    # plain SGD with lr 1 and no schedule: the weight change is the gradient itself
    common = ["trainer.max_steps=1", "data.train_ds.shuffle=false", "exp_manager.create_checkpoint_callback=false",
              "trainer.gradient_clip_val=null", "model.optimizer={_target_: torch.optim.SGD, lr: 1.0}",
              "model.lr_scheduler=null"]
    script = ("import sys, torch, train; m = train.main(sys.argv[2:]); "
              "torch.save(m.state_dict(), sys.argv[1])")
    for name, extra in (("accumulated", ["data.train_ds.batch_size=4", "trainer.accumulate_grad_batches=2"]),
                        ("double", ["data.train_ds.batch_size=8"])):
        out = run_python(["-c", script, str(tmp_path / f"{name}.pt"), "configs/salm.yaml", *SMALL, *common, *extra,
                          f"exp_manager.explicit_log_dir={tmp_path / name}"])
        assert out.returncode == 0, out.stderr[-3000:]
    a, b = torch.load(tmp_path / "accumulated.pt"), torch.load(tmp_path / "double.pt")
    initial = run_python(["-c", "import sys, torch; from config import load_config; "
                          "from train import build_model, seed_everything; cfg = load_config(sys.argv[2], sys.argv[3:], None); "
                          "seed_everything(42); torch.save(build_model(cfg['model']).state_dict(), sys.argv[1])",
                          str(tmp_path / "init.pt"), "configs/salm.yaml", *SMALL])
    assert initial.returncode == 0, initial.stderr[-3000:]
    init = torch.load(tmp_path / "init.pt")
    moved = 0
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key] - init[key], b[key] - init[key], atol=1e-6, rtol=1e-3)
            moved += int((a[key] - init[key]).abs().max() > 1e-4)
    assert moved > 10  # the step really changed the weights


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_probe.py"
    script.write_text("import os, sys, torch\nsys.path.insert(0, os.getcwd())\nimport train\n"
                      "model = train.main(sys.argv[2:])\n"
                      "torch.save(model.state_dict(), f\"{sys.argv[1]}/rank{os.environ['RANK']}.pt\")\n")
    out = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path),
                      "configs/salm.yaml", *SMALL, "trainer.max_steps=3", "trainer.devices=2",
                      "trainer.val_check_interval=3", f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert "step 3/3" in out.stdout


def test_bad_config_key_is_one_line(tmp_path):
    out = run_train(["trainer.max_step=3"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "did you mean 'trainer.max_steps'" in out.stderr


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
    out = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "configs/salm.yaml",
                      *SMALL, "trainer.max_steps=50", "trainer.devices=2", "trainer.val_check_interval=1000",
                      f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    assert out.returncode != 0
    assert time.time() - start < 120  # rank 0, blocked in the gradient all-reduce, is stopped, not left hanging
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
