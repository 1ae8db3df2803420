import json

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import MonoCut

from config import loader_defaults
from data import (Conversation, SALMDataset, TrainBatches, Turn, cut_to_conversation, left_pad, load_audio_files,
                  make_val_loaders, read_inputs, right_pad)
from data import load_audio, load_target_audio, read_duplex_demo

TAG = "<|audioplaceholder|>"


def tone(path, seconds, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def make_cuts(tmp_path, n=12, rate=16000, prefix="utt"):
    cuts = []
    for i in range(n):
        path = tone(tmp_path / f"{prefix}{i}.flac", 0.5 + 0.1 * i, rate, freq=200 + 50 * i)
        rec = Recording.from_file(path, recording_id=f"{prefix}{i}")
        cut = MonoCut(f"{prefix}{i}", start=0, duration=rec.duration, channel=0, recording=rec)
        cut.supervisions = [SupervisionSegment(f"{prefix}{i}", f"{prefix}{i}", 0, rec.duration, text=f"word {i}")]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def fake_encode(turns):
    """A stand-in prompt formatter: one token per turn + one per word; assistant tokens are supervised."""
    ids, mask = [], []
    for turn in turns:
        n = 1 + len(turn["content"].split())
        ids += [len(turn["content"]) % 50 + 3] * n
        mask += [turn["role"] == "assistant"] * n
    return {"input_ids": torch.tensor(ids), "mask": torch.tensor(mask)}


def salm_dataset(**kwargs):
    return SALMDataset(fake_encode, pad_id=0, sample_rate=16000, audio_locator_tag=TAG, **kwargs)


def test_conversation_turns_merge_same_role():
    cuts = CutSet.from_cuts([MonoCut("a", 0, 1.0, 0)])
    conv = Conversation("x", [Turn("user", text="Repeat after me:"), Turn("user", audio=cuts[0]),
                              Turn("assistant", text="Some text.")])
    assert conv.prompt_turns(TAG) == [{"role": "user", "content": f"Repeat after me: {TAG}"},
                                      {"role": "assistant", "content": "Some text."}]
    assert conv.duration == 1.0


def test_lhotse_as_conversation_with_tags(tmp_path):
    make_cuts(tmp_path, 3).to_file(tmp_path / "cuts.jsonl.gz")
    items = list(read_inputs({"input_cfg": [{"type": "lhotse_as_conversation", "cuts_path": str(tmp_path / "cuts.jsonl.gz"),
                                             "tags": {"context": "Repeat after me.", "system_prompt": "Be brief."}}]},
                             train=False))
    assert [type(i) for i in items] == [Conversation] * 3
    turns = items[1].prompt_turns(TAG)
    assert turns == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Repeat after me. {TAG}"},
                     {"role": "assistant", "content": "word 1"}]


def test_shar_reader_and_batches(tmp_path):
    (tmp_path / "shar").mkdir()
    make_cuts(tmp_path, 12).to_shar(tmp_path / "shar", fields={"recording": "flac"}, shard_size=4)
    cfg = {"shar_path": str(tmp_path / "shar"), "batch_size": 4, "shuffle": True, "seed": 3}
    batches = TrainBatches(cfg, salm_dataset())
    stream = iter(batches)
    first_epoch = [next(stream) for _ in range(3)]
    ids = sorted(i for b in first_epoch for i in b["ids"])
    assert ids == sorted(f"utt{i}" for i in range(12))  # one epoch covers every cut once
    b = first_epoch[0]
    assert b["audios"].shape[0] == len(b["ids"]) == b["input_ids"].shape[0]
    assert b["audio_lens"].max() == b["audios"].shape[1]
    assert b["loss_mask"].dtype == torch.bool and b["loss_mask"].shape == b["input_ids"].shape
    # left padding: the last column is never padding, the first may be
    assert (b["input_ids"][:, -1] != 0).all()
    next(stream)  # the stream goes on into the next epoch


def test_nemo_manifest_and_resampling(tmp_path):
    lines = [json.dumps({"audio_filepath": str(tone(tmp_path / f"a{i}.wav", 1.0, rate=8000)), "duration": 1.0,
                         "text": f"hello {i}"}) for i in range(3)]
    (tmp_path / "m.json").write_text("\n".join(lines))
    loaders = make_val_loaders({"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 2}, salm_dataset())
    batches = list(loaders["val"])
    assert [len(b["ids"]) for b in batches] == [2, 1]
    assert batches[0]["audios"].shape == (2, 16000)  # 8 kHz files resampled to 16 kHz


def test_multimodal_conversation_jsonl(tmp_path):
    _, b = tone(tmp_path / "a.wav", 1.0), tone(tmp_path / "b.wav", 0.5)
    rows = [
        {"id": "ex-0", "conversations": [
            {"from": "User", "type": "text", "value": "Compare:"},
            {"from": "User", "type": "audio", "value": "a.wav", "duration": 1.0},
            {"from": "User", "type": "audio", "value": str(b)},
            {"from": "Assistant", "type": "text", "value": "the first is longer"}]},
        {"id": "ex-1", "conversations": [{"from": "User", "type": "text", "value": "x"}], "custom": {"_skipme": True}},
    ]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = list(read_inputs({"input_cfg": [{"type": "multimodal_conversation",
                                             "manifest_filepath": str(tmp_path / "conv.jsonl")}]}, train=False))
    assert len(items) == 1 and items[0].id == "ex-0"  # _skipme honoured
    assert items[0].prompt_turns(TAG)[0]["content"] == f"Compare: {TAG} {TAG}"
    assert items[0].duration == pytest.approx(1.5)
    batch = salm_dataset()[CutSet(items)]
    assert batch["audios"].shape == (2, 16000) and batch["audio_lens"].tolist() == [16000, 8000]


def test_validation_sets_inherit_shared_keys(tmp_path):
    make_cuts(tmp_path, 5, prefix="a").to_file(tmp_path / "a.jsonl.gz")
    make_cuts(tmp_path, 3, prefix="b").to_file(tmp_path / "b.jsonl.gz")
    val_cfg = {"batch_size": 2, "datasets": {"set_a": {"cuts_path": str(tmp_path / "a.jsonl.gz")},
                                             "set_b": {"cuts_path": str(tmp_path / "b.jsonl.gz"), "batch_size": 3}}}
    loaders = make_val_loaders(val_cfg, salm_dataset())
    assert [len(b["ids"]) for b in loaders["set_a"]] == [2, 2, 1]
    assert [len(b["ids"]) for b in loaders["set_b"]] == [3]
    assert [i for b in loaders["set_a"] for i in b["ids"]] == [f"a{i}" for i in range(5)]  # ordered, finite


def test_ranks_partition_batches(tmp_path):
    make_cuts(tmp_path, 16).to_file(tmp_path / "c.jsonl.gz")
    cfg = {"cuts_path": str(tmp_path / "c.jsonl.gz"), "batch_size": 2, "shuffle": True, "seed": 7}
    per_rank = []
    for rank in range(2):
        stream = iter(TrainBatches(cfg, salm_dataset(), rank=rank, world_size=2))
        per_rank.append([i for _ in range(4) for i in next(stream)["ids"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"utt{i}" for i in range(16))


def test_resume_replays_the_stream(tmp_path):
    make_cuts(tmp_path, 10).to_file(tmp_path / "c.jsonl.gz")
    cfg = {"cuts_path": str(tmp_path / "c.jsonl.gz"), "batch_size": 3, "shuffle": True, "seed": 1}
    full = iter(TrainBatches(cfg, salm_dataset()))
    reference = [next(full)["ids"] for _ in range(9)]  # crosses two epoch boundaries
    resumed = TrainBatches(cfg, salm_dataset(), skip=5)
    stream = iter(resumed)
    assert [next(stream)["ids"] for _ in range(4)] == reference[5:]
    assert resumed.num_batches == 9


def test_bucketing_and_duration_batches(tmp_path):
    make_cuts(tmp_path, 12).to_file(tmp_path / "c.jsonl.gz")
    cfg = {"cuts_path": str(tmp_path / "c.jsonl.gz"), "batch_duration": 3.0, "use_bucketing": True,
           "num_buckets": 2, "shuffle": True, "seed": 0}
    stream = iter(TrainBatches(cfg, salm_dataset()))
    for _ in range(5):
        batch = next(stream)
        assert batch["audio_seconds"] <= 3.0 + 1e-6


def test_bad_audio_is_skipped_and_counted(tmp_path, capsys):
    cuts = list(make_cuts(tmp_path, 4))
    (tmp_path / "utt1.flac").unlink()                          # missing
    (tmp_path / "utt2.flac").write_bytes(b"fLaC" + b"\0" * 20)  # corrupt
    dataset = salm_dataset()
    batch = dataset[CutSet.from_cuts(cuts)]
    assert batch["ids"] == ["utt0", "utt3"]
    assert batch["skipped"]["unreadable audio"] == 2
    err = capsys.readouterr().err
    assert "utt1" in err and "utt1.flac" in err and "Traceback" not in err
    empty = dataset[CutSet.from_cuts(cuts[1:3])]
    assert empty["empty"] and empty["skipped"]["unreadable audio"] == 2


def test_duration_filter_counts(tmp_path):
    make_cuts(tmp_path, 10).to_file(tmp_path / "c.jsonl.gz")  # durations 0.5 .. 1.4 s
    cfg = {"cuts_path": str(tmp_path / "c.jsonl.gz"), "batch_size": 10, "max_duration": 1.0}
    batches = TrainBatches(cfg, salm_dataset())
    ids = next(iter(batches))["ids"]
    assert sorted(ids) == [f"utt{i}" for i in range(6)]
    assert batches.skipped["longer than max_duration"] == 4


def test_empty_transcript_and_max_tokens(tmp_path):
    cuts = list(make_cuts(tmp_path, 3))
    cuts[0].supervisions[0].text = ""
    batch = salm_dataset(max_tokens=20)[CutSet.from_cuts(cuts)]
    assert batch["skipped"]["empty transcript"] == 1
    long_batch = salm_dataset(max_tokens=8)[CutSet.from_cuts(cuts[1:])]
    assert long_batch["skipped"]["longer than max_tokens"] == 2


def test_left_and_right_pad():
    out = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], 0)
    assert out.tolist() == [[1, 2, 3], [0, 0, 4]]
    embeds = left_pad([torch.ones(1, 2), torch.full((2, 2), 2.0)], 0.0)  # (L_i, H) rows -> (B, L, H)
    assert embeds.tolist() == [[[0, 0], [1, 1]], [[2, 2], [2, 2]]]
    out, lens = right_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], 9)
    assert out.tolist() == [[1, 2, 3], [4, 9, 9]] and lens.tolist() == [3, 1]
    out, lens = right_pad([], 0.0)  # text-only batches have no audio
    assert out.shape == (0, 0) and lens.tolist() == []


def test_audio_files_are_mixed_to_mono_and_resampled(tmp_path):
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "tone.wav", tone, 8000, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", np.stack([tone, 0.5 * tone], 1), 8000, subtype="FLOAT")
    audios, audio_lens = load_audio_files([tmp_path / "tone.wav", tmp_path / "stereo.wav"], 16000)
    assert audios.shape == (2, 16000) and audio_lens.tolist() == [16000, 16000]
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(audios[0, 200:-200].numpy() - expected[200:-200]).max() < 0.02
    assert np.abs(audios[1, 200:-200].numpy() - 0.75 * expected[200:-200]).max() < 0.02  # the channels' mean
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio_files([tmp_path / "missing.wav"], 16000)


def test_cut_to_conversation_without_tags(tmp_path):
    cut = make_cuts(tmp_path, 1)[0]
    conv = cut_to_conversation(cut)
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.turns[1].text == "word 0"


def test_resampled_audio_keeps_its_content(tmp_path):
    path = tone(tmp_path / "t.wav", 1.0, rate=8000, freq=1000.0)
    (tmp_path / "m.json").write_text(json.dumps({"audio_filepath": str(path), "duration": 1.0, "text": "x"}))
    batch = next(iter(make_val_loaders({"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 1},
                                       salm_dataset())["val"]))
    spectrum = np.abs(np.fft.rfft(batch["audios"][0].numpy()))
    assert np.argmax(spectrum) == pytest.approx(1000, abs=2)  # 1 kHz stays 1 kHz at 16 kHz (1 Hz per bin)


def test_manifest_lines_with_missing_audio_are_skipped(tmp_path):
    good = tone(tmp_path / "good.wav", 1.0)
    lines = [{"audio_filepath": str(good), "duration": 1.0, "text": "a"},
             {"audio_filepath": str(tmp_path / "gone.wav"), "duration": 1.0, "text": "b"}]
    (tmp_path / "m.json").write_text("\n".join(json.dumps(x) for x in lines))
    batches = TrainBatches({"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 4}, salm_dataset())
    assert len(next(iter(batches))["ids"]) == 1
    assert batches.skipped["unreadable audio"] == 1


def noisy_speed_config(tmp_path, **keys):
    """Four tones as ASR conversations, NeMo's perturb_speed and noise keys (white noise, 10 dB)."""
    make_cuts(tmp_path, 4).to_file(tmp_path / "c.jsonl.gz")
    noise = np.random.default_rng(0).normal(0, 0.1, 48000).astype(np.float32)
    sf.write(tmp_path / "noise.wav", noise, 16000)
    (tmp_path / "noise.json").write_text(json.dumps({"audio_filepath": "noise.wav", "duration": 3}))
    entry = {"type": "lhotse_as_conversation", "cuts_path": str(tmp_path / "c.jsonl.gz")}
    return loader_defaults({"input_cfg": [entry], "perturb_speed": True, "seed": 1,
                            "noise_path": str(tmp_path / "noise.json"), "noise_snr": [10.0, 10.0],
                            "noise_mix_prob": 1.0, **keys})


def test_perturb_speed_and_noise_mixing_use_nemo_keys(tmp_path):
    cfg = noisy_speed_config(tmp_path)
    clean = {c.id: c for c in make_cuts(tmp_path, 4)}
    assert [i.id for i in read_inputs(cfg, train=False)] == [f"utt{i}" for i in range(4)]  # no aug
    items = {i.id: i for i in read_inputs(cfg, train=True)}
    assert sorted(items) == sorted(f"utt{i}{s}" for i in range(4) for s in ("", "_sp0.9", "_sp1.1"))
    for i in range(4):
        duration = clean[f"utt{i}"].duration
        for suffix, factor in (("", 1.0), ("_sp0.9", 0.9), ("_sp1.1", 1.1)):
            cut = items[f"utt{i}{suffix}"].audio_cuts[0]
            assert cut.duration == pytest.approx(duration / factor, abs=1e-3)
            assert cut.load_audio().shape[1] == round(cut.duration * 16000)
            assert items[f"utt{i}{suffix}"].turns[-1].text == f"word {i}"  # the noise adds no words
        mixed = items[f"utt{i}"].audio_cuts[0].load_audio()[0]
        signal = clean[f"utt{i}"].load_audio()[0]
        snr = 10 * np.log10(np.mean(signal**2) / np.mean((mixed - signal) ** 2))
        assert snr == pytest.approx(10.0, abs=0.5)


def test_augmented_stream_resumes_exactly(tmp_path):
    cfg = noisy_speed_config(tmp_path, batch_size=3, shuffle=True, noise_mix_prob=0.5,
                             noise_snr=[5.0, 20.0])
    full = iter(TrainBatches(cfg, salm_dataset()))
    reference = [next(full) for _ in range(9)]  # crosses two epochs of 12 conversations
    stream = iter(TrainBatches(cfg, salm_dataset(), skip=5))
    for expected in reference[5:]:
        batch = next(stream)
        assert batch["ids"] == expected["ids"] and torch.equal(batch["audios"], expected["audios"])
    first_epoch = {i for b in reference[:4] for i in b["ids"]}
    assert len(first_epoch) == 12 and any("_sp" in i for i in first_epoch)


def test_augmentation_refuses_what_it_would_break(tmp_path):
    duplex = {"input_cfg": [{"type": "duplex_demo", "shar_path": "assets/demo/qa_val"}],
              "perturb_speed": True}
    with pytest.raises(ValueError, match="out of step"):
        for _ in read_inputs(loader_defaults(duplex), train=True):
            pass
    (tmp_path / "m.jsonl").write_text("")
    entry = {"type": "multimodal_conversation", "manifest_filepath": str(tmp_path / "m.jsonl")}
    multimodal = {"input_cfg": [entry]}
    with pytest.raises(ValueError, match="cannot be augmented"):
        read_inputs(loader_defaults(dict(multimodal, perturb_speed=True)), train=True)


def test_noise_in_a_duplex_cut_leaves_the_agent_channel_in_place():
    conversation = next(iter(read_duplex_demo("assets/demo/qa_val")))
    cut = conversation.truncate(offset=0.5, duration=conversation.duration - 0.5)
    noise = conversation.truncate(duration=2.0)
    noise.custom = None
    noisy = cut.mix(noise, snr=10, preserve_id="left").truncate(duration=cut.duration,
                                                                 preserve_id=True)
    assert np.array_equal(load_target_audio(noisy, 16000), load_target_audio(cut, 16000))
    assert not np.array_equal(load_audio(noisy, 16000), load_audio(cut, 16000))
