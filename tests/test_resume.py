"""kill -9 a training run at chosen points, rerun the same command each time: it must end exactly as
a run that was never killed, bit for bit (the same losses after every resume, the same weights,
optimizer, schedule, RNG and checkpoints).

The kills are injected by a small runner script, not by the code under test: it wraps train.py's
functions and SIGKILLs its own process at the point that KILL_AT names:
  step:N           inside training step N (after the forward pass, before the optimizer step)
  midwrite:N:FILE  while FILE of step N is written: half of its bytes are in FILE.tmp
  rename:N:FILE    after FILE.tmp of step N is complete, before it is renamed to FILE
  val:N            during the validation after step N (one batch done)
"""
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import SMALL_PERCEPTION
from train import load_checkpoint

ROOT = Path(__file__).parent.parent
# one thread: bit-reproducible on CPU, and fair to a shared machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow

RUNNER = '''
import io, os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
import train

event, _, where = os.environ.get("KILL_AT", "").partition(":")
at, _, target = where.partition(":")
at = int(at) if at else None
# the step in progress (one forward each), the step of the checkpoint being saved
now = {"step": 0, "saving": None}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, make):
    setattr(owner, name, make(getattr(owner, name)))


def load_checkpoint(real):
    def load(path):
        state = real(path)
        now["step"] = state["step"]
        leftovers = sorted(p.name for p in Path(path).parent.glob("*.tmp"))
        print(f"resumed at step {state['step']}; leftover temporary files: {leftovers}")
        return state
    return load


def forward(real):
    def step(self, batch):
        now["step"] += 1
        out = real(self, batch)
        if event == "step" and now["step"] == at:
            die()
        return out
    return step


def save(real):
    def save(obj, f, *args, **kwargs):
        now["saving"] = obj.get("step") if isinstance(obj, dict) else None
        name = Path(getattr(f, "name", "")).name
        if event == "midwrite" and now["saving"] == at and name == target + ".tmp":
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            die()
        real(obj, f, *args, **kwargs)
    return save


def replace(real):
    def replace(src, dst):
        if event == "rename" and now["saving"] == at and Path(dst).name == target:
            die()
        real(src, dst)
    return replace


def validate(real):
    def validate(model, *args, **kwargs):
        if event == "val" and now["step"] == at and not kwargs.get("generate"):
            validation_step = model.validation_step
            def one_batch_then_die(*a, **k):
                validation_step(*a, **k)
                die()
            model.validation_step = one_batch_then_die
        return real(model, *args, **kwargs)
    return validate


def format_log(real):
    def log(step, max_steps, metrics):
        print(f"exact step {step} loss {metrics['loss']!r}")
        return real(step, max_steps, metrics)
    return log


wrap(train, "load_checkpoint", load_checkpoint)
wrap(train.TrainStep, "forward", forward)
wrap(torch, "save", save)
wrap(os, "replace", replace)
wrap(train, "validate", validate)
wrap(train, "format_log", format_log)
train.main(sys.argv[1:])
'''

RUN = ["trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
       "exp_manager.resume_if_exists=true", "exp_manager.resume_ignore_no_checkpoint=true"]

# config, overrides, (max_steps, checkpoint every, validation every), kills. Dropout, dither and
# the configs' other random parts stay on, so every resume must restore the RNG states exactly.
MODELS = {
    "salm": (
        "configs/salm.yaml",
        ["data.train_ds.batch_size=4", "data.train_ds.num_workers=0",
         "data.validation_ds.batch_size=4", "exp_manager.checkpoint_callback_params.save_top_k=2"],
        (12, 3, 4),
        ["step:5", "midwrite:6:last.ckpt", "rename:9:last.ckpt", "val:12"],
    ),
    "s2s_duplex": (
        "configs/s2s_duplex.yaml",
        ["data.train_ds.batch_size=2", "data.train_ds.num_workers=0",
         "data.validation_ds.batch_size=2",
         # a lookahead drawn per step (python RNG)
         "model.perception.encoder.att_context_size=[[70,1],[70,0]]"],
        (9, 3, 1000),
        ["step:4", "midwrite:6:last.ckpt", "rename:9:last.ckpt"],
    ),
    "s2s_duplex_speech_decoder": (
        "configs/s2s_duplex_speech_decoder.yaml",
        # one loader worker, as configured
        ["data.train_ds.batch_size=2", "data.validation_ds.batch_size=2",
         "model.speech_decoder.n_layers=1", "model.speech_decoder.d_model=32",
         "model.speech_decoder.sa_n_heads=2", "model.speech_decoder.d_ffn=64"],
        (9, 3, 1000),
        ["rename:6:last.ckpt", "step:8", "midwrite:9:step=9.ckpt"],
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every model's unkilled and killed runs, all at once: a model's killed launches follow one
    another, and the models (and their unkilled runs) run side by side, which keeps two cores
    busy."""
    root = tmp_path_factory.mktemp("resume")
    (root / "runner.py").write_text(RUNNER)
    with ThreadPoolExecutor(2 * len(MODELS)) as pool:
        jobs = {name: (pool.submit(run_unkilled, root, name), pool.submit(run_killed, root, name))
                for name in MODELS}
        return {name: (unkilled.result(), killed.result())
                for name, (unkilled, killed) in jobs.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_killed_run_ends_exactly_as_an_unkilled_one(name, runs):
    _, _, (max_steps, every, val_every), kills = MODELS[name]
    reference, launches = runs[name]
    assert reference["out"].returncode == 0, reference["out"].stderr[-3000:]
    expected = parse_log(reference["out"].stdout)
    assert sorted(expected["losses"]) == list(range(1, max_steps + 1))
    saved_at = [s for s in range(1, max_steps + 1)
                if s % every == 0 or s % val_every == 0 or s == max_steps]

    for kill, (resumed_from, out, after) in zip([*kills, None], launches):
        got = parse_log(out.stdout)
        if kill:
            assert out.returncode == -signal.SIGKILL, (kill, out.stderr[-3000:])
            check_kill_point(kill, saved_at, got, after)
        assert got["losses"], (kill, out.stdout[-2000:], out.stderr[-2000:])
        # it went on from the checkpoint, not from the start
        assert min(got["losses"]) == resumed_from + 1
        if resumed_from:  # from last.ckpt, the killed launch's temporary files cleared away
            assert "(resuming from last.ckpt)" in out.stdout, kill
            assert got["resumed"] == (resumed_from, "[]"), kill
        for step, loss in got["losses"].items():  # repr of the float: equal to the last bit
            assert loss == expected["losses"][step], (kill, step, loss)
            assert got["lines"][step] == expected["lines"][step]
        for step, line in got["validation"].items():
            assert line == expected["validation"][step], (kill, step)
    # every kill came after a checkpoint
    assert all(resumed_from for resumed_from, _, _ in launches[1:])

    _, final, after = launches[-1]
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"stopped at step {max_steps}: max_steps" in final.stdout
    assert expected["held_out"] and parse_log(final.stdout)["held_out"] == expected["held_out"]
    assert after["tmp"] == {} and after["files"] == reference["files"]
    state = torch.load(after["dir"] / "last.ckpt", weights_only=True)
    reference_state = torch.load(reference["dir"] / "last.ckpt", weights_only=True)
    assert state["step"] == reference_state["step"] == max_steps
    # ranks: RNG states, data position
    for key in ("model", "optimizer", "scheduler", "scaler", "best", "ranks"):
        assert_same(state[key], reference_state[key], key)
    assert state["ranks"][0]["batches"] == max_steps
    state["config"]["exp_manager"].pop("explicit_log_dir")
    reference_state["config"]["exp_manager"].pop("explicit_log_dir")
    assert state["config"] == reference_state["config"]


def command(root: Path, name: str, log_dir: Path) -> list[str]:
    config, overrides, (max_steps, every, val_every), _ = MODELS[name]
    return [sys.executable, str(root / "runner.py"), config, *SMALL_PERCEPTION, *overrides, *RUN,
            f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={val_every}",
            f"exp_manager.checkpoint_callback_params.every_n_train_steps={every}",
            f"exp_manager.explicit_log_dir={log_dir}"]


def run_unkilled(root: Path, name: str) -> dict:
    out = subprocess.run(command(root, name, root / f"{name}-unkilled"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=900)
    return {"out": out, **look_at(root / f"{name}-unkilled" / "checkpoints")}


def run_killed(root: Path, name: str) -> list[tuple[int, subprocess.CompletedProcess, dict]]:
    """The same command, once per kill and once more: (step it resumed from, output, checkpoints
    after it)."""
    launches, checkpoints = [], root / f"{name}-killed" / "checkpoints"
    for kill in [*MODELS[name][3], ""]:
        resumed_from = look_at(checkpoints)["last"] or 0
        out = subprocess.run(command(root, name, checkpoints.parent), cwd=ROOT,
                             env={**ENV, "KILL_AT": kill}, capture_output=True, text=True,
                             timeout=900)
        launches.append((resumed_from, out, look_at(checkpoints)))
    return launches


def look_at(checkpoints: Path) -> dict:
    """The step of last.ckpt, the checkpoint file names, and each temporary file's step (or why it
    is unreadable)."""
    last = checkpoints / "last.ckpt"
    tmp = {}
    for path in checkpoints.glob("*.tmp"):
        try:
            tmp[path.name] = load_checkpoint(path)["step"]
        except ValueError as e:
            tmp[path.name] = str(e)
    return {"dir": checkpoints, "last": load_checkpoint(last)["step"] if last.is_file() else None,
            "files": sorted(p.name for p in checkpoints.glob("*.ckpt")), "tmp": tmp}


def check_kill_point(kill: str, saved_at: list[int], logged: dict, after: dict) -> None:
    """The kill hit where it was aimed: the checkpoint of that step is not (completely) in place."""
    event, _, where = kill.partition(":")
    at, _, target = where.partition(":")
    at = int(at)
    assert after["last"] == max(s for s in saved_at if s < at), kill
    if event == "step":
        assert max(logged["losses"]) == at - 1 and after["tmp"] == {}, kill
    elif event == "val":
        assert max(logged["losses"]) == at and at not in logged["validation"], kill
        assert after["tmp"] == {}, kill
    elif event == "midwrite":  # half a file: refused with a clear message
        assert after["tmp"].keys() == {f"{target}.tmp"}
        assert "truncated or corrupt" in after["tmp"][f"{target}.tmp"]
    else:  # rename: the temporary file is complete, only the rename is missing
        assert after["tmp"] == {f"{target}.tmp": at}, kill


def parse_log(stdout: str) -> dict:
    """Per step: the loss as repr prints it (every bit), the logged line (losses and LR), the
    validation line; the held-out line; and the step resumed from, with the temporary files found
    then."""
    log = {"losses": {}, "lines": {}, "validation": {}, "held_out": None, "resumed": None}
    step = 0
    for line in stdout.splitlines():
        if m := re.match(r"resumed at step (\d+); leftover temporary files: (.*)$", line):
            log["resumed"] = (int(m[1]), m[2])
        elif m := re.match(r"exact step (\d+) loss (\S+)$", line):
            step = int(m[1])
            log["losses"][step] = m[2]
        elif m := re.match(r"step (\d+)/\d+ \| (.*? \| lr \S+) \|", line):
            log["lines"][int(m[1])] = m[2]
        elif line.startswith("validation: val_"):
            log["validation"][step] = line
        elif line.startswith("held-out: "):
            log["held_out"] = line
    return log


def assert_same(got, expected, where: str) -> None:
    """Equal to the last bit, tensors and numbers alike."""
    if torch.is_tensor(expected):
        assert got.dtype == expected.dtype and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where
