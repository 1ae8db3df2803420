"""The shipped offline assets: demo speech (assets/demo) and the tiny LLM directory
(assets/tiny-llm)."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lhotse import CutSet
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
TINY_LLM = REPO / "assets" / "tiny-llm"
SPLITS = ("asr_train", "asr_val", "qa_train", "qa_val")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|audioplaceholder|>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script("make_demo_data")


@pytest.fixture(scope="module")
def demo() -> dict[str, CutSet]:
    return {name: CutSet.from_shar(in_dir=DEMO / name).to_eager() for name in SPLITS}


@pytest.fixture(scope="module")
def readme() -> str:
    return (DEMO / "README.md").read_text()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_LLM)


def texts(cuts: CutSet) -> list[str]:
    return [cut.supervisions[0].text for cut in cuts]


def int16_samples(cut) -> np.ndarray:
    return np.round(cut.load_audio()[0] * 32768).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Demo speech


def test_demo_counts_and_durations_match_script_and_readme(demo, script, readme):
    expected = {"asr_train": script.NUM_ASR["train"] + script.NUM_ASR_TRAIN_EXTRA,
                "asr_val": script.NUM_ASR["val"],
                "qa_train": 2 * script.NUM_QA["train"], "qa_val": 2 * script.NUM_QA["val"]}
    rows = {m[1]: (int(m[2]), float(m[3]))
            for m in re.finditer(r"^\| (\w+) \| (\d+) \| ([\d.]+) \|", readme, re.M)}
    for name, cuts in demo.items():
        durations = [cut.duration for cut in cuts]
        assert len(cuts) == expected[name] == rows[name][0]
        assert sum(durations) == pytest.approx(rows[name][1], abs=0.06)
        assert 0.3 <= min(durations) and max(durations) <= 6.0
        assert {cut.sampling_rate for cut in cuts} == {16000}
        assert len({cut.id for cut in cuts}) == len(cuts)
    total_hours = float(re.search(r"= ([\d.]+) h", readme)[1])
    assert sum(c.duration for cuts in demo.values() for c in cuts) / 3600 == \
        pytest.approx(total_hours, abs=1e-4)


def test_demo_size_budget():
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 10_000_000, f"assets/demo is {size} bytes"


def test_transcripts_use_only_the_grammar(demo, script):
    grammar = {w for sentences in script.asr_templates().values()
               for s in sentences for w in s.split()}
    grammar |= {w for pair in script.qa_pairs() for s in pair for w in s.split()}
    for name, cuts in demo.items():
        for cut in cuts:
            (sup,) = cut.supervisions
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", sup.text), sup.text
            assert set(sup.text.split()) <= grammar, sup.text
            assert sup.language == "en" and sup.start == 0
            assert sup.duration == pytest.approx(cut.duration)
            if name.startswith("asr"):
                assert sup.speaker in script.USER_VOICES


def test_train_and_validation_share_no_sentence(demo, script):
    for kind in ("asr", "qa"):
        assert not set(texts(demo[f"{kind}_train"])) & set(texts(demo[f"{kind}_val"]))
    train = set(texts(demo["asr_train"])) | set(texts(demo["qa_train"]))
    val = set(texts(demo["asr_val"])) | set(texts(demo["qa_val"]))
    assert not train & val
    # the first train utterances are distinct sentences, the extra ones speak them and more again
    distinct = texts(demo["asr_train"])[: script.NUM_ASR["train"]]
    assert len(set(distinct)) == len(distinct)
    assert len(set(texts(demo["asr_train"]))) > 4 * len(distinct)
    train_words = {w for t in train for w in t.split()}
    assert {w for t in val for w in t.split()} <= train_words


def test_qa_pairs_are_complete_and_answers_are_right(demo, script):
    value = {word: i for i, word in enumerate(NUMBER_WORDS)}
    for split in ("train", "val"):
        pairs = {}
        for cut in demo[f"qa_{split}"]:
            assert cut.custom["pair_id"].startswith(f"qa-{split}-")
            assert cut.supervisions[0].speaker == cut.custom["role"]
            pairs.setdefault(cut.custom["pair_id"], {})[cut.custom["role"]] = cut
        assert all(set(roles) == {"user", "agent"} for roles in pairs.values())
        assert len(pairs) == script.NUM_QA[split]
        assert {p["agent"].custom["voice"] for p in pairs.values()} == {script.AGENT_VOICE}
        assert {p["user"].custom["voice"] for p in pairs.values()} <= set(script.USER_VOICES)
        for roles in pairs.values():
            question = roles["user"].supervisions[0].text
            answer = roles["agent"].supervisions[0].text
            if m := re.fullmatch(r"what is (\w+) (plus|minus|times) (\w+)", question):
                a, op, b = value[m[1]], m[2], value[m[3]]
                result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
                assert answer == f"{m[1]} {op} {m[3]} is {NUMBER_WORDS[result]}"
            elif m := re.fullmatch(r"what number comes after (\w+)", question):
                assert answer == f"{NUMBER_WORDS[value[m[1]] + 1]} comes after {m[1]}"
    user_voices = {c.custom["voice"] for c in demo["qa_train"] if c.custom["role"] == "user"}
    assert len(user_voices) > 5


def test_audio_is_opus_trimmed_and_normalised(demo):
    for cuts in demo.values():
        for cut in list(cuts)[:5]:
            payload = cut.recording.sources[0].source
            assert payload[:4] == b"OggS" and b"OpusHead" in payload[:64]
            samples = int16_samples(cut)
            assert len(samples) == cut.num_samples
            assert 0.7 <= np.abs(samples).max() / 32768 <= 1.0  # Opus moves the peak a little
            loud = np.flatnonzero(np.abs(samples) > 0.01 * 32768)
            assert loud[0] < 0.15 * 16000 and len(samples) - loud[-1] < 0.15 * 16000


def test_script_plans_every_shipped_transcript(demo, script):
    # Sentence and voice choices need no espeak-ng, so every split is compared in full.
    for name, utterances in script.build_splits().items():
        planned = [(u.cut_id, u.text, u.speaker) for u in utterances]
        assert planned == [(c.id, c.supervisions[0].text, c.supervisions[0].speaker)
                           for c in demo[name]]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_script_regenerates_the_shipped_data(demo, readme, tmp_path):
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    shipped_version = re.search(r"espeak-ng ([\d.]*\d)", readme)[1]
    if f"text-to-speech: {shipped_version} " not in version:
        pytest.skip(f"espeak-ng differs from {shipped_version}, which made the shipped audio")
    limit = 3
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"),
                    "--out", str(tmp_path), "--limit", str(limit)], check=True, capture_output=True)
    for name in SPLITS:
        regenerated = CutSet.from_shar(in_dir=tmp_path / name).to_eager()
        shipped = list(demo[name])[: len(regenerated)]
        assert len(regenerated) == limit * (2 if name.startswith("qa") else 1)
        for new, old in zip(regenerated, shipped):
            assert (new.id, new.supervisions[0].text, new.supervisions[0].speaker) == (
                old.id, old.supervisions[0].text, old.supervisions[0].speaker)
            # The same speech; a float Opus encoder on another CPU may round a little differently.
            new_samples, old_samples = int16_samples(new), int16_samples(old)
            assert len(new_samples) == len(old_samples), new.id
            error = np.sum((new_samples - old_samples) ** 2.0) + 1.0
            assert 10 * np.log10(np.sum(old_samples ** 2.0) / error) > 40, new.id


# ------------------------------------------------------------------------------------------------
# Tiny LLM


def test_tiny_llm_loads_offline_and_runs(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = AutoConfig.from_pretrained(TINY_LLM)
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert not list(TINY_LLM.glob("*.safetensors")) and not list(TINY_LLM.glob("*.bin"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    input_ids = torch.tensor([tokenizer("turn on the red light").input_ids])
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (1, input_ids.shape[1], config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and max(ids) < len(tokenizer)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id] == ids[:4]
    tag_id = ids[4]
    assert tokenizer("Listen: <|audioplaceholder|> now").input_ids.count(tag_id) == 1
    plain = tokenizer("two plus three is five").input_ids  # no BOS/EOS unless a template adds them
    assert not set(plain) & set(ids)


def test_tokenizer_round_trips_text(tokenizer, demo):
    samples = sorted({t for cuts in demo.values() for t in texts(cuts)})
    samples += ["Hello, World! It's 7:30 p.m.", "Grüße aus Köln: 42 € (ca.)",
                "  two  spaces\tand a tab\n"]
    for text in samples:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    words = {w for t in samples[:-3] for w in t.split()}
    single = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    assert len(single) >= 0.8 * len(words)  # the demo vocabulary is mostly whole-word tokens


def test_chat_template_ends_assistant_turns_with_eos(tokenizer):
    def ids_of(token):
        return tokenizer.convert_tokens_to_ids(token)

    turns = [{"role": "system", "content": "You are helpful."},
             {"role": "user", "content": "what is two plus three <|audioplaceholder|>"},
             {"role": "assistant", "content": "two plus three is five"},
             {"role": "user", "content": "thanks"},
             {"role": "assistant", "content": "you are welcome"}]
    ids = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False)
    assert ids[0] == ids_of("<|system|>") and tokenizer.bos_token_id not in ids
    assert ids.count(tokenizer.eos_token_id) == 2 and ids[-1] == tokenizer.eos_token_id
    assert ids.count(ids_of("<|audioplaceholder|>")) == 1
    starts = [i + 1 for i, t in enumerate(ids) if t == ids_of("<|assistant|>")]
    ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    for start, end, turn in zip(starts, ends, turns[2::2]):
        assert ids[start:end] == tokenizer.encode(turn["content"], add_special_tokens=False)
    prompt = tokenizer.apply_chat_template(turns[:2], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    assert prompt[-1] == ids_of("<|assistant|>") and tokenizer.eos_token_id not in prompt
    assert ids[: len(prompt)] == prompt
    text = tokenizer.apply_chat_template(turns[1:3], tokenize=False)
    assert text.startswith("<|user|>what is two plus three")
    assert text.endswith("two plus three is five</s>")


def test_tiny_llm_script_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_llm.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)

    def contents(directory: Path) -> dict:
        tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
        config = json.loads((directory / "config.json").read_text())
        config.pop("transformers_version")
        return {"model": tokenizer_json["model"], "added_tokens": tokenizer_json["added_tokens"],
                "config": config,
                "chat_template": (directory / "chat_template.jinja").read_text()}

    assert contents(tmp_path) == contents(TINY_LLM)
