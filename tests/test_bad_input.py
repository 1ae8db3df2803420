"""Bad input: broken audio, text and configs give a counted skip that training survives, or a
one-line error.

Data tests put G good and B bad items through the real readers, dataset and TrainBatches and check
that exactly the G good ones arrive (none lost), resampled where needed, and that each bad one is
counted under its reason.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, SupervisionSegment

import data
import salm
import train
from conftest import ROOT, SMALL, salm_dataset, tone
from config import TARGETS, ConfigError, load_config
from data import TrainBatches
from manifests import audio_file_cut, cut_to_conversation, read_duplex_demo

DEMO = ROOT / "assets" / "demo" / "asr_train"
CONFIG = str(ROOT / "configs" / "salm.yaml")
NO_VALIDATION = ["data.validation_ds.datasets={}"]


def demo_flacs(directory: Path, n: int) -> list[tuple[Path, str]]:
    """The first n demo utterances as 16-bit FLAC files with their transcripts."""
    files = []
    for cut in CutSet.from_shar(in_dir=DEMO).subset(first=n):
        path = directory / f"{cut.id}.flac"
        sf.write(path, cut.load_audio()[0], cut.sampling_rate, subtype="PCM_16")
        files.append((path, cut.supervisions[0].text))
    return files


def broken_files(directory: Path) -> dict[str, Path]:
    """One audio file of each broken kind, made from a real demo FLAC."""
    raw = demo_flacs(directory, 1)[0][0].read_bytes()
    paths = {kind: directory / name for kind, name in [
        ("truncated", "truncated.flac"), ("header_cut", "header_cut.flac"),
        ("zero_samples", "zero_samples.wav"), ("zero_bytes", "zero_bytes.flac"),
        ("missing", "missing.flac")]}
    paths["truncated"].write_bytes(raw[: len(raw) // 2])  # header intact: fails when decoded
    paths["header_cut"].write_bytes(raw[:60])  # fails when opened
    sf.write(paths["zero_samples"], np.zeros(0, np.float32), 16000)  # a valid WAV holding no sample
    paths["zero_bytes"].write_bytes(b"")
    return paths


def write_manifest(path: Path, rows: list[tuple[Path, str]]) -> Path:
    """A NeMo ASR manifest; `duration` is left out so that the file header gives it."""
    path.write_text("\n".join(json.dumps({"audio_filepath": str(a), "text": t}) for a, t in rows))
    return path


def ids_of(manifest: Path, rows: list, wanted: list) -> list[str]:
    return [f"{manifest.stem}-{rows.index(row)}" for row in wanted]


def test_one_pass_delivers_every_good_item_and_counts_each_bad_kind(tmp_path, capsys,
                                                                    fresh_warnings):
    good = demo_flacs(tmp_path, 3)
    low = (tone(tmp_path / "low.wav", 1.0, rate=8000, freq=500.0), "a low rate tone")
    high = (tone(tmp_path / "high.flac", 1.0, rate=44100, freq=1000.0), "a high rate tone")
    bad = broken_files(tmp_path)
    too_long = (tone(tmp_path / "long.wav", 3.0), "a long tone")
    empty_text = (good[0][0], " ")
    long_text = (good[1][0], " ".join(["word"] * 50))
    rows = [good[0], (bad["missing"], "x"), (bad["truncated"], "x"), low, (bad["zero_bytes"], "x"),
            too_long, good[1], (bad["header_cut"], "x"), empty_text, high,
            (bad["zero_samples"], "x"), long_text, good[2]]
    manifest = write_manifest(tmp_path / "mixed.json", rows)
    cfg = {"manifest_filepath": str(manifest), "batch_size": 100, "max_duration": 2.5}
    batches = TrainBatches(cfg, salm_dataset(max_tokens=40))  # long_text ~70 tokens, good < 40
    batch = next(iter(batches))

    assert batch["ids"] == ids_of(manifest, rows, [good[0], low, good[1], high, good[2]])  # all
    assert batches.skipped.counts() == {"unreadable audio": 5, "longer than max_duration": 1,
                                        "empty transcript": 1, "longer than max_tokens": 1}
    lens = dict(zip(batch["ids"], batch["audio_lens"].tolist()))
    for row in good:
        assert lens[ids_of(manifest, rows, [row])[0]] == sf.info(row[0]).frames
    low_id, high_id = ids_of(manifest, rows, [low, high])
    assert lens[low_id] == lens[high_id] == 16000  # 1 s at 8 kHz and at 44.1 kHz, now at 16 kHz
    for clip_id, freq in ((low_id, 500), (high_id, 1000)):  # tones keep their pitch (1 Hz per bin)
        clip = batch["audios"][batch["ids"].index(clip_id), :16000].numpy()
        assert np.argmax(np.abs(np.fft.rfft(clip))) == pytest.approx(freq, abs=2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"warning: skipped audio file not found: {bad['missing']}" in err
    assert "truncated.flac" in err and "decoder lost sync" in err  # the backend's reason only


def test_cut_manifest_with_bad_audio_is_filtered_when_loading(tmp_path, capsys, fresh_warnings):
    good = demo_flacs(tmp_path, 2)
    bad = broken_files(tmp_path)
    bad["missing"].write_bytes(good[0][0].read_bytes())  # there while the manifest is written
    paths = [good[0][0], bad["truncated"], tone(tmp_path / "low.wav", 1.0, rate=8000),
             bad["missing"], bad["zero_samples"], good[1][0]]
    cuts = []
    for path in paths:
        cut = audio_file_cut(path)
        cut.supervisions = [SupervisionSegment(cut.id, cut.recording_id, 0, cut.duration,
                                               text="some words")]
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    bad["missing"].unlink()
    cfg = {"cuts_path": str(tmp_path / "cuts.jsonl.gz"), "batch_size": 100}
    batches = TrainBatches(cfg, salm_dataset())
    batch = next(iter(batches))
    assert batch["ids"] == [good[0][0].stem, "low", good[1][0].stem]
    assert batch["audio_lens"][1] == 16000
    assert batches.skipped.counts() == {"unreadable audio": 3}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("warning: skipped ") for line in err)
    assert any(f"file not found: {bad['missing']}" in line for line in err)
    assert any("zero_samples" in line and line.endswith("is empty") for line in err)


def test_a_batch_where_every_clip_fails_is_skipped_and_the_next_drawn(tmp_path, fresh_warnings):
    good = demo_flacs(tmp_path, 4)
    bad = broken_files(tmp_path)
    rows = [good[0], good[1], (bad["truncated"], "x"), (bad["zero_samples"], "x"), good[2], good[3]]
    manifest = write_manifest(tmp_path / "m.json", rows)
    batches = TrainBatches({"manifest_filepath": str(manifest), "batch_size": 2}, salm_dataset())
    stream = iter(batches)
    delivered = [next(stream)["ids"], next(stream)["ids"]]
    assert delivered == [ids_of(manifest, rows, good[:2]), ids_of(manifest, rows, good[2:])]
    assert batches.num_batches == 3  # the empty one counts as drawn: a resumed run replays it too
    assert batches.skipped.counts() == {"unreadable audio": 2, "batches with nothing readable": 1}


def test_a_stream_where_everything_fails_ends_with_one_line(tmp_path, fresh_warnings):
    bad = broken_files(tmp_path)
    rows = [(bad["truncated"], "x"), (bad["zero_samples"], "y")]
    manifest = write_manifest(tmp_path / "m.json", rows)
    batches = TrainBatches({"manifest_filepath": str(manifest), "batch_size": 1}, salm_dataset())
    with pytest.raises(ValueError) as err:
        next(iter(batches))
    assert str(err.value).startswith(f"{data.MAX_EMPTY_BATCHES} training batches in a row had no "
                                     "usable item")
    assert "\n" not in str(err.value)
    assert batches.num_batches == data.MAX_EMPTY_BATCHES
    assert batches.skipped.counts() == {"unreadable audio": 2,  # the same two items in every epoch
                                        "batches with nothing readable": data.MAX_EMPTY_BATCHES}
    # files that cannot even be opened never reach a batch: the data yields nothing, an error too
    rows = [(bad["missing"], "x"), (bad["header_cut"], "y")]
    unopenable = write_manifest(tmp_path / "u.json", rows)
    cfg = {"manifest_filepath": str(unopenable), "batch_size": 1}
    with pytest.raises(ValueError, match="the training data yields no batch"):
        next(iter(TrainBatches(cfg, salm_dataset())))


def test_bad_items_are_counted_and_named_once_however_many_epochs(tmp_path, capsys, fresh_warnings):
    """Two bad lines stay two skipped items over ten epochs (one fails when the manifest is read,
    one when its audio is loaded), are named in one warning each, and a run resumed after any batch
    keeps the same record."""
    good = demo_flacs(tmp_path, 2)
    bad = broken_files(tmp_path)
    rows = [good[0], (bad["missing"], "x"), good[1], (bad["truncated"], "x")]
    manifest = write_manifest(tmp_path / "m.json", rows)
    cfg = {"manifest_filepath": str(manifest), "batch_size": 3, "shuffle": True, "seed": 1}
    batches = TrainBatches(cfg, salm_dataset())
    stream, saved = iter(batches), []
    for _ in range(10):
        next(stream)
        saved.append((batches.num_batches, batches.skipped.state()))
    assert batches.skipped.counts() == {"unreadable audio": 2}
    assert saved[-1][1] == {"unreadable audio": ["m-1", "m-3"]}
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: skipped ") for line in warnings)
    assert "missing.flac" in warnings[0] and "truncated.flac" in warnings[1]
    for drawn, state in saved[2], saved[6]:  # as a checkpoint holds it, then resumed
        buffer = io.BytesIO()
        torch.save(state, buffer)
        restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        resumed = TrainBatches(cfg, salm_dataset(), skip=drawn, skipped=restored)
        stream = iter(resumed)
        for _ in range(10 - drawn):
            next(stream)
        assert resumed.num_batches == 10 and resumed.skipped.state() == saved[-1][1]


@pytest.fixture(scope="module")
def small_cfg():
    return load_config(CONFIG, SMALL, report=None)


def test_a_transcript_longer_than_the_llm_context_is_skipped(tmp_path, small_cfg, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = train.build_model(small_cfg["model"])
    llm_config = json.loads((ROOT / "assets" / "tiny-llm" / "config.json").read_text())
    context = llm_config["max_position_embeddings"]
    dataset = model.make_dataset(small_cfg["data"])
    assert small_cfg["data"]["train_ds"].get("max_tokens") is None and dataset.max_tokens == context
    capped = model.make_dataset({"train_ds": {**small_cfg["data"]["train_ds"], "max_tokens": 64}})
    assert capped.max_tokens == 64

    (path, text), = demo_flacs(tmp_path, 1)
    cuts = []
    for i, transcript in enumerate([text, " ".join(["seven"] * context)]):
        cut = audio_file_cut(path).with_id(f"utt{i}")
        cut.supervisions = [SupervisionSegment(cut.id, cut.recording_id, 0, cut.duration,
                                               text=transcript)]
        cuts.append(cut)
    turns = [cut_to_conversation(c).prompt_turns(model.audio_locator_tag) for c in cuts]
    lengths = [len(model.encode_dialog(t)["input_ids"]) for t in turns]
    assert lengths[0] < context < lengths[1]
    batch = dataset[CutSet.from_cuts(cuts)]
    assert batch["ids"] == ["utt0"]
    assert batch["skipped"] == [("longer than max_tokens", "utt1", None)]


def run_main(args, tmp_path):
    return train.main([CONFIG, *SMALL, *NO_VALIDATION, "trainer.max_steps=5",
                       "data.train_ds.batch_size=2",
                       f"exp_manager.explicit_log_dir={tmp_path / 'run'}", *args])


def corrupt_losses(monkeypatch, factors: dict):
    """Multiply the n-th training step's loss by factors[n] (nan or inf), like a broken batch."""
    training_step, calls = salm.SALM.training_step, []

    def step(self, batch):
        calls.append(1)
        out = training_step(self, batch)
        if len(calls) in factors:
            out["loss_sum"] = out["loss_sum"] * factors[len(calls)]
        return out

    monkeypatch.setattr(salm.SALM, "training_step", step)


def test_non_finite_losses_are_skipped_and_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    corrupt_losses(monkeypatch, {2: float("nan"), 3: float("inf")})
    model = run_main([], tmp_path)
    out = capsys.readouterr().out
    log = [line for line in out.splitlines() if line.startswith("step ")]
    assert log[0].endswith("| skipped 0")
    assert log[1].startswith("step 2/5 | loss nan")
    assert log[1].endswith("| skipped 1 (non-finite loss 1)")
    assert log[2].startswith("step 3/5 | loss inf")
    assert log[2].endswith("| skipped 2 (non-finite loss 2)")
    assert log[4].startswith("step 5/5") and log[4].endswith("| skipped 2 (non-finite loss 2)")
    assert "stopped at step 5: max_steps" in out
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no bad step reached them


def test_non_finite_losses_in_a_row_stop_the_run_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train, "MAX_BAD_STEPS", 3)
    corrupt_losses(monkeypatch, {n: float("nan") for n in range(1, 10)})
    with pytest.raises(SystemExit) as stop:
        run_main([], tmp_path)
    assert str(stop.value.code) == ("error: 3 non-finite losses in a row (check the learning rate, "
                                    "precision and data)")
    assert "stopped at step 3:" in capsys.readouterr().out  # at the log line after the third
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # kept
    assert state["step"] == 3


TYPO = ("unknown config key 'trainer.max_step' on the command line (did you mean "
        "'trainer.max_steps'?)")
MONITOR = "exp_manager.checkpoint_callback_params.monitor"


@pytest.mark.parametrize("override, message", [
    ("trainer.max_step=3", TYPO),  # no "+" is offered: trainer takes only the keys it knows ...
    ("+trainer.max_step=3", TYPO),  # ... so adding the key is refused too, blaming the command line
    ("model.lora.r=8", "unknown config key 'model.lora.r' on the command line; use "
                       "+model.lora.r=... to add it"),
    ("data.train_ds.batch_size=???",
     "data.train_ds.batch_size is '???' (required) on the command line: set it in the file or as "
     "data.train_ds.batch_size=VALUE on the command line"),
    ("trainer.max_steps=many",
     "trainer.max_steps on the command line must be an integer, got 'many'"),
    ("model.optimizer._target_=os.system",
     "model.optimizer._target_ on the command line is 'os.system', which is not allowed there; "
     "use one of ..."),
    ("data.train_ds.input_cfg.1.shar_path=assets/demo/qa_trian",
     "data.train_ds.input_cfg.1.shar_path: assets/demo/qa_trian does not exist"),
    ("data.validation_ds.datasets.demo_val.input_cfg.0.shar_path=/no/val",
     "data.validation_ds.datasets.demo_val.input_cfg.0.shar_path: /no/val does not exist"),
    (f"data.train_ds.input_cfg=[{{type: nemo, manifest_filepath: [{CONFIG}, [/no/m.json, 2]]}}]",
     "data.train_ds.input_cfg.0.manifest_filepath.1: /no/m.json does not exist"),
    ("data.train_ds.input_cfg.0.shar_path=[a, b]",
     "data.train_ds.input_cfg.0.shar_path must be a path, got ['a', 'b'] (a list is read only for "
     "manifest_filepath: paths or [path, weight] pairs)"),
    ("model.pretrained_llm=assets/tiny_llm",
     "cannot load pretrained_llm 'assets/tiny_llm': no such directory, and as a hub name it is not "
     "in the local ..."),
    (f"{MONITOR}=val_acc_demoval",
     f"{MONITOR} 'val_acc_demoval' is not a validation metric; pick one of val_acc, "
     "val_acc_demo_val, val_loss, val_loss_demo_val"),
])
def test_mistakes_stop_the_run_before_anything_is_written(tmp_path, monkeypatch, override, message):
    """Config and path mistakes are one-line errors found before the run directory is written (a
    wrong monitor at the sanity validation)."""
    monkeypatch.chdir(ROOT)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        train.main([CONFIG, *SMALL, "trainer.num_sanity_val_steps=1", override,
                    f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    text = str(err.value)  # a message ending in "..." is shown up to there
    assert text.startswith(message[:-3]) if message.endswith("...") else text == message
    assert "\n" not in text and not (tmp_path / "run").exists()


def test_a_missing_pretrained_llm_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError) as err:
        run_main([f"model.pretrained_llm={tmp_path / 'no-llm'}"], tmp_path)
    assert str(err.value).startswith(f"cannot load pretrained_llm '{tmp_path / 'no-llm'}': no such "
                                     "directory.")
    with pytest.raises(FileNotFoundError) as err:  # a directory without tokenizer files
        run_main(["model.pretrained_llm=assets/tiny-mimi",
                  f"exp_manager.explicit_log_dir={tmp_path / 'b'}"], tmp_path)
    assert str(err.value).startswith("cannot load pretrained_llm 'assets/tiny-mimi': ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.perception.modality_adapter.feat_in=???", "model.perception.modality_adapter.feat_in"),
    ("trainer.max_step=3", "did you mean 'trainer.max_steps'"),
    ("model.pretrained_llm=/nowhere/llm", "pretrained_llm")])
def test_the_command_line_prints_one_line_and_exits_2(tmp_path, override, key):
    out = subprocess.run([sys.executable, "train.py", CONFIG, override,
                          f"exp_manager.explicit_log_dir={tmp_path}"], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and key in out.stderr


# ---- `_target_` allowlist


def test_every_target_in_the_shipped_configs_is_in_the_allowlist():
    """(test_config.py loads each of these files, which runs the check itself.)"""
    paths = [*sorted((ROOT / "configs").glob("*.yaml")),
             *sorted((ROOT / "tests" / "fixtures").glob("*.yaml"))]
    seen = set()
    for path in paths:
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(":")
            if key in ("_target_", "target"):
                seen.add(value.strip())
    allowed = {name for names in TARGETS.values() for name in names}
    assert seen and seen <= allowed


@pytest.mark.parametrize("override, key, allowed", [
    ("model.optimizer._target_=builtins.eval", "model.optimizer._target_", "torch.optim.AdamW"),
    ("model.lr_scheduler._target_=torch.optim.lr_scheduler.LambdaLR", "model.lr_scheduler._target_",
     "nemo.core.optim.lr_scheduler.CosineAnnealing"),
    ("model.perception.target=subprocess.Popen", "model.perception.target",
     "perception.AudioPerceptionModule"),
    ("model.perception.modality_adapter._target_=torch.optim.AdamW",
     "model.perception.modality_adapter._target_",
     "perception.IdentityConnector"),  # a known name in the wrong place
    ("++model.perception.encoder._target_=perception.IdentityConnector",
     "model.perception.encoder._target_", "perception.ConformerEncoder"),
    ("trainer.strategy={_target_: os.system}", "trainer.strategy._target_",
     "lightning.pytorch.strategies.DDPStrategy"),  # a section only Lightning reads is checked too
])
def test_a_target_outside_the_allowlist_is_refused(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override], report=None)
    message = str(err.value)
    assert message.startswith(f"{key} on the command line is ")
    assert "not allowed there; use one of" in message
    assert allowed in message and "\n" not in message


def test_a_target_where_no_class_is_chosen_is_refused():
    for override in ("data.train_ds._target_=torch.optim.AdamW",
                     "data.train_ds.input_cfg.0.target=os.system"):
        with pytest.raises(ConfigError, match=r"not allowed there; remove it: no class is chosen"):
            load_config(CONFIG, [override], report=None)
    with pytest.raises(ConfigError, match=r"model\.optimizer\._target_ .* is \{'a': 1\}"):
        load_config(CONFIG, ["model.optimizer._target_={a: 1}"], report=None)


def test_the_project_names_are_accepted_and_nothing_is_imported(tmp_path, monkeypatch):
    adapter = "model.perception.modality_adapter._target_=perception.IdentityConnector"
    cfg = load_config(CONFIG, [adapter, "model.optimizer._target_=torch.optim.SGD"], report=None)
    adapter_cfg = cfg["model"]["perception"]["modality_adapter"]
    assert adapter_cfg["_target_"] == "perception.IdentityConnector"
    ran = str(tmp_path / "ran")
    (tmp_path / "planted.py").write_text(f"open({ran!r}, 'w').close()\nAdamW = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError):
        load_config(CONFIG, ["model.optimizer._target_=planted.AdamW"], report=None)
    with pytest.raises(ConfigError):
        train.build_optimizer({"_target_": "planted.AdamW"}, [torch.nn.Parameter(torch.zeros(1))])
    assert not (tmp_path / "ran").exists() and "planted" not in sys.modules


# ---- end to end


@pytest.mark.slow
def test_training_on_a_manifest_with_every_bad_kind_finishes(tmp_path):
    """train.py on 14 good utterances mixed with every kind of bad item: it finishes and the log
    counts each, also across a stop and resume after step 2."""
    good = demo_flacs(tmp_path, 14)
    bad = broken_files(tmp_path)
    low = (tone(tmp_path / "low.wav", 1.0, rate=8000), "a low tone")
    high = (tone(tmp_path / "high.flac", 1.0, rate=44100), "a high tone")
    # batches of 4, in order: [g g g low] [g g g high] [all bad: skipped] [g g g g] [g g g g]; the
    # items that cannot be opened or are too long never reach a batch
    rows = [(bad["missing"], "x"), *good[0:3], low, (bad["zero_bytes"], "x"), *good[3:6], high,
            (tone(tmp_path / "long.wav", 6.0), "a long tone"), (bad["truncated"], "x"),
            (bad["zero_samples"], "x"), (good[0][0], ""), (good[1][0], " ".join(["seven"] * 1100)),
            (bad["header_cut"], "x"), *good[6:14]]
    manifest = write_manifest(tmp_path / "mixed.json", rows)
    for max_steps in (2, 4):  # the second run resumes from the first one's last.ckpt
        out = subprocess.run(
            [sys.executable, "train.py", CONFIG, *SMALL, *NO_VALIDATION,
             f"trainer.max_steps={max_steps}",
             "data.train_ds.input_cfg=[{type: lhotse_as_conversation, "
             f"manifest_filepath: {manifest}}}]",
             "data.train_ds.shuffle=false", "data.train_ds.max_duration=5.0",
             f"exp_manager.explicit_log_dir={tmp_path / 'run'}"], cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from last.ckpt" in out.stdout and "stopped at step 4: max_steps" in out.stdout
    last = [line for line in out.stdout.splitlines() if line.startswith("step 4/4")][0]
    assert last.endswith("| skipped 9 (batches with nothing readable 1, empty transcript 1, "
                         "longer than max_duration 1, longer than max_tokens 1, "
                         "unreadable audio 5)")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["step"] == 4


def test_a_conversation_longer_than_the_duplex_context_is_skipped(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/s2s_duplex_speech_decoder.yaml",
                      ["model.speech_decoder.max_length_causal_mask=64"], report=None)
    model = train.build_model(cfg["model"])
    dataset = model.make_dataset(cfg["data"])
    assert dataset.max_frames == 64  # the speech decoder's limit is below the LLM's 1024 positions
    cuts = sorted(read_duplex_demo("assets/demo/qa_val"), key=lambda c: c.duration)
    short, long = cuts[0], cuts[-1]
    assert short.duration / 0.08 + 1 <= 64 < long.duration / 0.08
    batch = dataset[CutSet.from_cuts([short, long])]
    assert batch["ids"] == [short.id]
    assert batch["skipped"] == [("longer than the model's context", long.id, None)]


def test_duplex_conversations_with_bad_audio_are_skipped_and_counted(tmp_path, monkeypatch,
                                                                     fresh_warnings):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/s2s_duplex.yaml", [], report=None)
    dataset = train.build_model(cfg["model"]).make_dataset(cfg["data"])
    broken = broken_files(tmp_path)
    for seed, name, rate in ((0, "user.wav", 16000), (1, "agent.wav", 44100)):
        noise = np.random.default_rng(seed).normal(0, 0.1, rate * 2).astype(np.float32)
        sf.write(tmp_path / name, noise, rate)

    def conversation(name, user, agent):
        cut = audio_file_cut(tmp_path / "user.wav").with_id(name)
        cut.recording.sources[0].source = str(user)
        rec_id = cut.recording_id
        cut.supervisions = [
            SupervisionSegment(f"{name}-q", rec_id, 0.1, 0.8, text="hi", speaker="user"),
            SupervisionSegment(f"{name}-a", rec_id, 1.0, 0.9, text="yes", speaker="agent")]
        target = audio_file_cut(tmp_path / "agent.wav").recording
        cut.custom = {"target_audio": target} if agent else {}
        if agent and agent != "good":
            cut.custom["target_audio"].sources[0].source = str(broken[agent])
        return cut

    cuts = [conversation("good", tmp_path / "user.wav", "good"),
            conversation("user_missing", broken["missing"], "good"),
            conversation("user_truncated", broken["truncated"], "good"),
            conversation("agent_truncated", tmp_path / "user.wav", "truncated"),
            conversation("agent_empty", tmp_path / "user.wav", "zero_bytes"),
            conversation("no_agent_channel", tmp_path / "user.wav", None)]
    batch = dataset[CutSet.from_cuts(cuts)]
    assert batch["ids"] == ["good"]  # none good lost
    assert [(reason, item) for reason, item, _ in batch["skipped"]] == [
        ("unreadable audio", cut.id) for cut in cuts[1:]]
    assert batch["source_audio"].shape == (1, 32000)  # 16 kHz as recorded
    assert batch["target_audio"].shape == (1, 48000)  # 44.1 kHz agent audio at the codec's 24 kHz
