import bisect
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import MonoCut
from lhotse.testing.dummies import dummy_cut

from config import loader_defaults
from conftest import TAG, salm_dataset, tone
from data import (TrainBatches, check_data_paths, left_pad, load_audio, load_audio_files,
                  load_target_audio, make_sampler, make_val_loaders, right_pad)
from manifests import (Conversation, Turn, audio_file_cut, cut_to_conversation,
                       expand_sharded_paths, read_duplex_demo, read_inputs)


def make_cuts(tmp_path, n=12, rate=16000, prefix="utt"):
    cuts = []
    for i in range(n):
        path = tone(tmp_path / f"{prefix}{i}.flac", 0.5 + 0.1 * i, rate, freq=200 + 50 * i)
        rec = Recording.from_file(path, recording_id=f"{prefix}{i}")
        cut = MonoCut(f"{prefix}{i}", start=0, duration=rec.duration, channel=0, recording=rec)
        cut.supervisions = [SupervisionSegment(cut.id, cut.id, 0, rec.duration, text=f"word {i}")]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def test_conversation_turns_merge_same_role():
    cuts = CutSet.from_cuts([MonoCut("a", 0, 1.0, 0)])
    conv = Conversation("x", [Turn("user", text="Repeat after me:"), Turn("user", audio=cuts[0]),
                              Turn("assistant", text="Some text.")])
    assert conv.prompt_turns(TAG) == [{"role": "user", "content": f"Repeat after me: {TAG}"},
                                      {"role": "assistant", "content": "Some text."}]
    assert conv.duration == 1.0


def test_lhotse_as_conversation_with_tags(tmp_path):
    make_cuts(tmp_path, 3).to_file(tmp_path / "cuts.jsonl.gz")
    entry = {"type": "lhotse_as_conversation", "cuts_path": str(tmp_path / "cuts.jsonl.gz"),
             "tags": {"context": "Repeat after me.", "system_prompt": "Be brief."}}
    items = list(read_inputs({"input_cfg": [entry]}, train=False))
    assert [type(i) for i in items] == [Conversation] * 3
    turns = items[1].prompt_turns(TAG)
    assert turns == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": f"Repeat after me. {TAG}"},
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
    lines = [json.dumps({"audio_filepath": str(tone(tmp_path / f"a{i}.wav", 1.0, rate=8000)),
                         "duration": 1.0, "text": f"hello {i}"}) for i in range(3)]
    (tmp_path / "m.json").write_text("\n".join(lines))
    cfg = {"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 2}
    loaders = make_val_loaders(cfg, salm_dataset())
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
        {"id": "ex-1", "conversations": [{"from": "User", "type": "text", "value": "x"}],
         "custom": {"_skipme": True}},
    ]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    entry = {"type": "multimodal_conversation", "manifest_filepath": str(tmp_path / "conv.jsonl")}
    items = list(read_inputs({"input_cfg": [entry]}, train=False))
    assert len(items) == 1 and items[0].id == "ex-0"  # _skipme honoured
    assert items[0].prompt_turns(TAG)[0]["content"] == f"Compare: {TAG} {TAG}"
    assert items[0].duration == pytest.approx(1.5)
    batch = salm_dataset()[CutSet(items)]
    assert batch["audios"].shape == (2, 16000) and batch["audio_lens"].tolist() == [16000, 8000]


def test_validation_sets_inherit_shared_keys(tmp_path):
    make_cuts(tmp_path, 5, prefix="a").to_file(tmp_path / "a.jsonl.gz")
    make_cuts(tmp_path, 3, prefix="b").to_file(tmp_path / "b.jsonl.gz")
    val_cfg = {"batch_size": 2,
               "datasets": {"set_a": {"cuts_path": str(tmp_path / "a.jsonl.gz")},
                            "set_b": {"cuts_path": str(tmp_path / "b.jsonl.gz"), "batch_size": 3}}}
    loaders = make_val_loaders(val_cfg, salm_dataset())
    assert [len(b["ids"]) for b in loaders["set_a"]] == [2, 2, 1]
    assert [len(b["ids"]) for b in loaders["set_b"]] == [3]
    assert [i for b in loaders["set_a"] for i in b["ids"]] == [f"a{i}" for i in range(5)]  # ordered


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


def test_bucketing_groups_by_duration_and_caps_each_bucket():
    short = [0.5 + 0.05 * i for i in range(12)]  # 0.5 .. 1.05 s
    long = [2.1 + 0.1 * i for i in range(12)]  # 2.1 .. 3.2 s: two never fit in 4 s
    durations = [d for pair in zip(short, long) for d in pair]  # interleaved
    cuts = CutSet.from_cuts(dummy_cut(i, duration=d) for i, d in enumerate(durations))
    for bins in ([1.5], None):  # bucket edges given, or estimated from the data (num_buckets)
        cfg = loader_defaults({"batch_duration": 4.0, "use_bucketing": True, "num_buckets": 2,
                               "bucket_duration_bins": bins, "shuffle": True, "seed": 0})
        sampler = make_sampler(cuts, cfg, train=True)
        sampler.set_epoch(0)
        batches = [list(batch) for batch in sampler]
        assert sorted(c.id for b in batches for c in b) == sorted(c.id for c in cuts)  # each once
        edges = sampler.duration_bins  # a cut of duration d is in bucket bisect_left(edges, d)
        assert len(edges) == 1 and (bins is None or edges == bins)
        for batch in batches:
            assert len({bisect.bisect_left(edges, c.duration) for c in batch}) == 1  # one bucket
    # with the short and the long cuts in buckets of their own (the given edge), batch_duration
    # holds in each (lhotse stops a batch once one more of its longest cut would pass it), so
    # short batches take more cuts
    cfg = loader_defaults({"batch_duration": 4.0, "use_bucketing": True, "shuffle": True,
                           "bucket_duration_bins": [1.5]})
    sampler = make_sampler(cuts, cfg, train=True)
    sizes = {True: [], False: []}
    for batch in sampler:
        assert sum(c.duration for c in batch) <= 4.0
        sizes[batch[0].duration < 1.5].append(len(batch))
    assert max(sizes[True]) >= 4 and max(sizes[False]) == 1


def test_bad_audio_is_skipped_and_listed_with_its_reason(tmp_path):
    cuts = list(make_cuts(tmp_path, 4))
    (tmp_path / "utt1.flac").unlink()                          # missing
    (tmp_path / "utt2.flac").write_bytes(b"fLaC" + b"\0" * 20)  # corrupt
    dataset = salm_dataset()
    batch = dataset[CutSet.from_cuts(cuts)]
    assert batch["ids"] == ["utt0", "utt3"]
    assert [(reason, item) for reason, item, _ in batch["skipped"]] == [
        ("unreadable audio", "utt1"), ("unreadable audio", "utt2")]
    missing, corrupt = (warning for _, _, warning in batch["skipped"])
    utt1, utt2 = tmp_path / "utt1.flac", tmp_path / "utt2.flac"
    assert missing == f"cannot read audio of utt1 ({utt1}): file not found: {utt1}"
    assert corrupt.startswith(f"cannot read audio of utt2 ({utt2}): ") and "\n" not in corrupt
    empty = dataset[CutSet.from_cuts(cuts[1:3])]
    assert empty["empty"] and [item for _, item, _ in empty["skipped"]] == ["utt1", "utt2"]


def test_duration_filter_counts(tmp_path):
    make_cuts(tmp_path, 10).to_file(tmp_path / "c.jsonl.gz")  # durations 0.5 .. 1.4 s
    cfg = {"cuts_path": str(tmp_path / "c.jsonl.gz"), "batch_size": 10, "max_duration": 1.0}
    batches = TrainBatches(cfg, salm_dataset())
    ids = next(iter(batches))["ids"]
    assert sorted(ids) == [f"utt{i}" for i in range(6)]
    assert batches.skipped.counts() == {"longer than max_duration": 4}


def test_empty_transcript_and_max_tokens(tmp_path):
    cuts = list(make_cuts(tmp_path, 3))
    cuts[0].supervisions[0].text = ""
    batch = salm_dataset(max_tokens=20)[CutSet.from_cuts(cuts)]
    assert batch["skipped"] == [("empty transcript", "utt0", None)]
    long_batch = salm_dataset(max_tokens=8)[CutSet.from_cuts(cuts[1:])]
    assert long_batch["skipped"] == [("longer than max_tokens", "utt1", None),
                                     ("longer than max_tokens", "utt2", None)]
    # NeMo's count: the tokens with each audio tag as its clip's frames (utt1: 5 tokens, 8 frames)
    one = CutSet.from_cuts(cuts[1:2])
    assert salm_dataset(min_tokens=12, max_tokens=12)[one]["ids"] == ["utt1"]
    short = salm_dataset(min_tokens=13)[CutSet.from_cuts(cuts[1:2])]
    assert short["empty"] and short["skipped"] == [("shorter than min_tokens", "utt1", None)]


def test_left_and_right_pad():
    out = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], 0)
    assert out.tolist() == [[1, 2, 3], [0, 0, 4]]
    embeds = left_pad([torch.ones(1, 2), torch.full((2, 2), 2.0)], 0.0)  # (L_i, H) -> (B, L, H)
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
    mean_of_channels = 0.75 * expected[200:-200]
    assert np.abs(audios[1, 200:-200].numpy() - mean_of_channels).max() < 0.02
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio_files([tmp_path / "missing.wav"], 16000)


def test_cut_to_conversation_without_tags(tmp_path):
    cut = make_cuts(tmp_path, 1)[0]
    conv = cut_to_conversation(cut)
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.turns[1].text == "word 0"


def test_resampled_audio_keeps_its_content(tmp_path):
    path = tone(tmp_path / "t.wav", 1.0, rate=8000, freq=1000.0)
    line = {"audio_filepath": str(path), "duration": 1.0, "text": "x"}
    (tmp_path / "m.json").write_text(json.dumps(line))
    cfg = {"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 1}
    batch = next(iter(make_val_loaders(cfg, salm_dataset())["val"]))
    spectrum = np.abs(np.fft.rfft(batch["audios"][0].numpy()))
    assert np.argmax(spectrum) == pytest.approx(1000, abs=2)  # 1 kHz stays 1 kHz (1 Hz per bin)


def test_manifest_lines_with_missing_audio_are_skipped(tmp_path):
    good = tone(tmp_path / "good.wav", 1.0)
    lines = [{"audio_filepath": str(good), "duration": 1.0, "text": "a"},
             {"audio_filepath": str(tmp_path / "gone.wav"), "duration": 1.0, "text": "b"}]
    (tmp_path / "m.json").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = {"manifest_filepath": str(tmp_path / "m.json"), "batch_size": 4}
    batches = TrainBatches(cfg, salm_dataset())
    assert len(next(iter(batches))["ids"]) == 1
    assert batches.skipped.counts() == {"unreadable audio": 1}


# ---- NeMo's data fields, tarred data and input_cfg files ---------------------------------------

def read_one(entry: dict, **loader) -> list:
    return list(read_inputs({"input_cfg": [entry], **loader}, train=False))


def test_nemo_manifest_lines_keep_their_fields_and_prompts(tmp_path):
    (tmp_path / "audio").mkdir()
    tone(tmp_path / "audio" / "a.wav", 0.5)
    lines = [{"audio_filepath": "audio/a.wav", "duration": 0.5, "text": "one", "lang": "en",
              "context": "Say it:"},
             {"audio_filepath": str(tone(tmp_path / "b.wav", 0.5)), "duration": 0.5, "text": "two",
              "context": "Spell it:", "system_prompt": "Be brief.", "speaker": 7},
             {"audio_filepath": "audio/a.wav", "duration": 0.5, "text": "three", "_skipme": True}]
    (tmp_path / "m.json").write_text("\n".join(json.dumps(line) for line in lines))
    cuts = read_one({"type": "nemo", "manifest_filepath": str(tmp_path / "m.json")})
    assert len(cuts) == 2  # _skipme
    assert cuts[0].custom == {"text": "one", "lang": "en", "context": "Say it:"}  # as in NeMo
    assert cuts[0].supervisions[0].language == "en"
    assert cuts[1].custom["speaker"] == 7
    assert cut_to_conversation(cuts[0]).prompt_turns(TAG) == [
        {"role": "user", "content": f"Say it: {TAG}"}, {"role": "assistant", "content": "one"}]
    assert cut_to_conversation(cuts[1]).prompt_turns(TAG)[:2] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Spell it: {TAG}"}]
    tagged = read_one({"type": "lhotse_as_conversation", "tags": {"context": "Repeat:"},
                       "manifest_filepath": str(tmp_path / "m.json")})  # tags win, as in NeMo
    assert [c.prompt_turns(TAG)[-2]["content"] for c in tagged] == [f"Repeat: {TAG}"] * 2


def test_multimodal_conversation_tags_become_turns(tmp_path):
    tone(tmp_path / "a.wav", 0.5)

    def text(role, value):
        return {"from": role, "type": "text", "value": value}

    audio, answer = {"from": "User", "type": "audio", "value": "a.wav"}, text("Assistant", "hi")
    rows = [{"id": "audio-first", "conversations": [audio, answer]},
            {"id": "text-first", "conversations": [text("User", "Hear:"), audio, answer]},
            {"id": "own-system", "conversations": [text("System", "Mine."), audio, answer]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tags = {"system_prompt": "Be brief.", "context": "Transcribe:"}
    items = read_one({"type": "multimodal_conversation", "tags": tags,
                      "manifest_filepath": str(tmp_path / "c.jsonl")})
    turns = {c.id: c.prompt_turns(TAG) for c in items}
    system = {"role": "system", "content": "Be brief."}
    assert turns["audio-first"][:2] == [system, {"role": "user", "content": f"Transcribe: {TAG}"}]
    # the context goes only before a conversation's opening audio
    assert turns["text-first"][:2] == [system, {"role": "user", "content": f"Hear: {TAG}"}]
    assert turns["own-system"][0] == {"role": "system", "content": "Mine."}
    assert items[0].custom["system_prompt"] == "Be brief."  # tags are attached too, as in NeMo


def write_tarred(folder, shards: int, per_shard: int, rate=16000) -> dict:
    """A NeMo tarred set as NeMo's convert_to_tarred_audio_dataset.py writes it: audio_N.tar and
    sharded_manifests/manifest_N.json, audio_filepath the member; returns {member: samples}."""
    (folder / "sharded_manifests").mkdir(parents=True)
    samples = {}
    for shard in range(shards):
        lines = []
        with tarfile.open(folder / f"audio_{shard}.tar", "w") as tar:
            for i in range(per_shard):
                name = f"utt{shard}_{i}.wav"
                wave = 0.1 * np.sin(np.arange(rate // 2) * (i + 1 + shard) / 10)
                samples[name] = wave.astype(np.float32)
                buffer = io.BytesIO()
                sf.write(buffer, samples[name], rate, format="WAV", subtype="FLOAT")
                member = tarfile.TarInfo(name)
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)
                lines.append({"audio_filepath": name, "duration": 0.5, "text": f"text {name}",
                              "shard_id": shard, "context": f"ctx {shard}"})
        lines.append({"audio_filepath": f"utt{shard}_0-sub1.wav", "offset": 0.25, "duration": 0.25,
                      "text": "second half", "shard_id": shard})  # a second segment of one member
        (folder / "sharded_manifests" / f"manifest_{shard}.json").write_text(
            "\n".join(json.dumps(line) for line in lines))
    return samples


def test_nemo_tarred_input(tmp_path):
    folder = tmp_path / "tarred [v1]"  # brackets stay brackets (NeMo would make them braces)
    samples = write_tarred(folder, shards=3, per_shard=4)
    entry = {"type": "nemo_tarred",
             "manifest_filepath": str(folder / "sharded_manifests" / "manifest__OP_0..2_CL_.json"),
             "tarred_audio_filepaths": str(folder / "audio__OP_0..2_CL_.tar")}
    cuts = read_one(entry)
    assert len(cuts) == 15
    assert [c.id for c in cuts[:5]] == ["utt0_0-sub1.wav", "utt0_0.wav", "utt0_1.wav", "utt0_2.wav",
                                        "utt0_3.wav"]
    by_id = {c.id: c for c in cuts}
    np.testing.assert_array_equal(by_id["utt1_2.wav"].load_audio()[0], samples["utt1_2.wav"])
    second_half = samples["utt2_0.wav"][4000:]
    np.testing.assert_array_equal(by_id["utt2_0-sub1.wav"].load_audio()[0], second_half)
    assert by_id["utt1_2.wav"].supervisions[0].text == "text utt1_2.wav"
    turns = cut_to_conversation(by_id["utt1_2.wav"]).prompt_turns(TAG)
    assert turns[0]["content"] == f"ctx 1 {TAG}"
    batch = salm_dataset()[CutSet(cuts[:3])]  # audio in memory, no file to open
    assert batch["audio_lens"].tolist() == [4000, 8000, 8000]

    # one manifest with shard_id keys, as the loader's own keys; {a..b}; shards shuffled per pass
    one = folder / "all.json"
    one.write_text("".join((folder / "sharded_manifests" / f"manifest_{i}.json").read_text() + "\n"
                           for i in range(3)))
    loader = {"manifest_filepath": str(one),
              "tarred_audio_filepaths": str(folder / "audio_{0..2}.tar")}
    assert [c.id for c in read_inputs(loader, train=False)] == [c.id for c in cuts]
    shuffled = read_inputs({**loader, "shuffle": True, "seed": 3}, train=True)
    first, second = [c.id for c in shuffled], [c.id for c in shuffled]
    assert sorted(first) == sorted(c.id for c in cuts) and first != second  # a shard order per pass

    sliced = read_one(dict(entry, slice_length=2))  # two members from a random start in each shard
    members = {}
    for cut in sliced:
        members.setdefault(cut.id.split("_")[0], set()).add(int(cut.id.split("_")[1][0]))
    assert sorted(members) == ["utt0", "utt1", "utt2"]
    assert all(len(m) == 2 and max(m) - min(m) == 1 for m in members.values())  # consecutive
    with pytest.raises(FileNotFoundError, match=r"audio_\[0..2\].tar \(brackets are not expanded"):
        read_one(dict(entry, tarred_audio_filepaths=str(folder / "audio_[0..2].tar")))
    with pytest.raises(ValueError, match="shard numbers of the manifests"):
        read_one(dict(entry, tarred_audio_filepaths=str(folder / "audio__OP_0..1_CL_.tar")))


def test_sharded_path_expansion():
    assert expand_sharded_paths("a/_OP_0..2_CL_.tar") == ["a/0.tar", "a/1.tar", "a/2.tar"]
    assert expand_sharded_paths("m_{08..10}.json") == ["m_08.json", "m_09.json", "m_10.json"]
    assert expand_sharded_paths("{a,b}/x_{0..1}") == ["a/x_0", "a/x_1", "b/x_0", "b/x_1"]
    assert expand_sharded_paths("d(1)/[x]<y>.tar") == ["d(1)/[x]<y>.tar"]  # NeMo: d{1}/{x}{y}.tar
    assert expand_sharded_paths(["p_{0..1}"]) == ["p_{0..1}"]  # a list is taken as is, as in NeMo


def test_cut_manifest_audio_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "data" / "wav").mkdir(parents=True)
    cut = make_cuts(tmp_path / "data" / "wav", 1)[0]
    cut.recording.sources[0].source = "wav/utt0.flac"  # written relative to the manifest's folder
    CutSet.from_cuts([cut]).to_file(tmp_path / "data" / "cuts.jsonl.gz")
    cuts = read_one({"type": "lhotse", "cuts_path": str(tmp_path / "data" / "cuts.jsonl.gz")})
    assert cuts[0].recording.sources[0].source == str(tmp_path / "data" / "wav" / "utt0.flac")
    assert cuts[0].load_audio().shape[1] == 8000


def test_input_cfg_from_a_yaml_file_and_keys_nemo_does_not_act_on(tmp_path):
    make_cuts(tmp_path, 2).to_file(tmp_path / "c.jsonl.gz")
    (tmp_path / "inputs.yaml").write_text(f"- type: lhotse_as_conversation\n"
                                          f"  cuts_path: {tmp_path / 'c.jsonl.gz'}\n"
                                          "  tags: {context: 'Repeat:'}\n")
    items = list(read_inputs({"input_cfg": str(tmp_path / "inputs.yaml")}, train=False))
    assert [i.prompt_turns(TAG)[0]["content"] for i in items] == [f"Repeat: {TAG}"] * 2
    nested = [{"type": "group", "input_cfg": str(tmp_path / "inputs.yaml")}]
    assert len(list(read_inputs({"input_cfg": nested}, train=False))) == 2
    (tmp_path / "bad.yaml").write_text("- type: lhotse\n  cut_path: x\n")
    with pytest.raises(ValueError, match="unknown config key 'input_cfg.0.cut_path'"):
        read_inputs({"input_cfg": str(tmp_path / "bad.yaml")}, train=False)

    entry = {"type": "lhotse_as_conversation", "cuts_path": str(tmp_path / "c.jsonl.gz")}
    uses = {"system_prompt": "tags", "context": "tags", "shuffle_shards": "loader's shuffle"}
    for key, use in uses.items():
        with pytest.raises(ValueError, match=f"entry key {key} is not supported: .*{use}"):
            read_one({**entry, key: "x"})
    with pytest.raises(ValueError, match="slice_length applies to tarred NeMo data and lhotse_sh"):
        read_one(entry, slice_length=4)




def test_stereo_audio_is_averaged_from_every_source(tmp_path):
    """NeMo's rule (its SALM dataset downmixes with lhotse's mono_downmix): the mean of the
    channels, whether the file comes from a NeMo manifest, a conversation manifest or the command
    line."""
    t = np.arange(8000) / 16000
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 700 * t)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    mean = ((left + right) / 2).astype(np.float32)
    (tmp_path / "asr.json").write_text(json.dumps({"audio_filepath": "stereo.wav", "text": "x"}))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"id": "c", "conversations": [
        {"from": "User", "type": "audio", "value": "stereo.wav"},
        {"from": "Assistant", "value": "x"}]}))
    asr, = read_inputs({"manifest_filepath": str(tmp_path / "asr.json")}, train=False)
    chat_cfg = {"type": "multimodal_conversation",
                "manifest_filepath": str(tmp_path / "chat.jsonl")}
    chat, = read_inputs({"input_cfg": [chat_cfg]}, train=False)
    for cut in (asr, chat.audio_cuts[0], audio_file_cut(tmp_path / "stereo.wav")):
        np.testing.assert_allclose(load_audio(cut, 16000), mean, atol=1e-6)
    batch = salm_dataset()[CutSet.from_cuts([asr])]
    np.testing.assert_allclose(batch["audios"][0].numpy(), mean, atol=1e-6)


def test_a_list_of_nemo_manifests(tmp_path):
    """NeMo's list-valued manifest_filepath: paths or [path, weight] pairs; mixed when training (by
    default in proportion to their lines), read one after the other for validation."""
    manifests = []
    for name, n in (("a", 6), ("b", 2)):
        rows = [{"audio_filepath": str(tone(tmp_path / f"{name}{i}.wav", 0.5)), "text": f"{i}"}
                for i in range(n)]
        manifests.append(tmp_path / f"{name}.json")
        manifests[-1].write_text("\n".join(json.dumps(row) for row in rows))
    a, b = map(str, manifests)
    val = make_val_loaders({"manifest_filepath": [a, [b]], "batch_size": 3}, salm_dataset())["val"]
    everything = [f"a-{i}" for i in range(6)] + ["b-0", "b-1"]
    assert [i for batch in val for i in batch["ids"]] == everything
    for paths in ([a, b], [[a, 1.0], [b, 1.0]]):
        cfg = {"input_cfg": [{"type": "nemo", "manifest_filepath": paths}], "batch_size": 2,
               "shuffle": True}
        stream = iter(TrainBatches(cfg, salm_dataset()))
        ids = [i for _ in range(4) for i in next(stream)["ids"]]  # one epoch of 8 items
        assert sorted(ids) == sorted([f"a-{i}" for i in range(6)] + ["b-0", "b-1"])


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
    with pytest.raises(ValueError, match="cannot be augmented"):  # before the model is built
        check_data_paths({"train_ds": dict(multimodal, perturb_speed=True)})
    check_data_paths({"train_ds": multimodal})


def test_noise_in_a_duplex_cut_leaves_the_agent_channel_in_place():
    conversation = next(iter(read_duplex_demo("assets/demo/qa_val")))
    cut = conversation.truncate(offset=0.5, duration=conversation.duration - 0.5)
    noise = conversation.truncate(duration=2.0)
    noise.custom = None
    noisy = cut.mix(noise, snr=10, preserve_id="left").truncate(duration=cut.duration,
                                                                 preserve_id=True)
    assert np.array_equal(load_target_audio(noisy, 16000), load_target_audio(cut, 16000))
    assert not np.array_equal(load_audio(noisy, 16000), load_audio(cut, 16000))
