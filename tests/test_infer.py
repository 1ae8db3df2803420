"""Export and loading, the generate/evaluate commands, and the metrics (WER, BLEU, ASR-BLEU).

Models are tiny and random, built from configs/salm.yaml with small sizes and a copy of
assets/tiny-llm that a test can delete, to show that an export needs nothing outside its own
directory.
"""
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import soundfile
import torch
from lhotse import CutSet
from safetensors import safe_open

import infer
from config import load_config
from conftest import SMALL_PERCEPTION
from duplex_s2s import Transcriber, asr_bleu, resample
from metrics import bleu, metrics_by_dataset, normalize_text, wer, wer_details, word_errors
from salm import SALM
from train import build_model

ROOT = Path(__file__).resolve().parents[1]
ASR_VAL = ROOT / "assets" / "demo" / "asr_val"
LORA = "+model.lora={task_type: CAUSAL_LM, r: 4, lora_alpha: 8, lora_dropout: 0.0}"
PROMPT = "Repeat after me, typing in lowercase."


@pytest.fixture(scope="module")
def cuts():
    return list(CutSet.from_shar(in_dir=str(ASR_VAL)))[:3]


def make_checkpoint(tmp_path: Path, *overrides: str) -> tuple[SALM, Path]:
    """A random SALM whose LLM files live in a copy of assets/tiny-llm under tmp_path, saved as
    train.py does."""
    llm_dir = tmp_path / "tiny-llm"
    shutil.copytree(ROOT / "assets" / "tiny-llm", llm_dir)
    overrides = [*SMALL_PERCEPTION, f"model.pretrained_llm={llm_dir}", *overrides]
    cfg = load_config(str(ROOT / "configs" / "salm.yaml"), overrides, None)
    torch.manual_seed(0)
    model = SALM(cfg["model"]).eval()
    path = tmp_path / "step=2.ckpt"
    torch.save({"model": model.state_dict(), "config": cfg, "step": 2}, path)
    return model, path


def logits(model: SALM, cuts) -> torch.Tensor:
    batch = model.make_dataset({"train_ds": {}})[CutSet.from_cuts(cuts)]
    inputs = model.prepare_inputs(batch)
    return model(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]


def greedy(model: SALM, cuts, max_new_tokens: int = 6) -> torch.Tensor:
    audios = [torch.from_numpy(c.load_audio()[0]) for c in cuts]
    prompt = [{"role": "user", "content": f"{PROMPT} {model.audio_locator_tag}"}]
    return model.generate([prompt] * len(cuts),
                          audios=torch.nn.utils.rnn.pad_sequence(audios, batch_first=True),
                          audio_lens=torch.tensor([len(a) for a in audios]),
                          max_new_tokens=max_new_tokens)


# ---- save_pretrained / from_pretrained / export --------------------------------------------------

def test_save_load_round_trip_gives_identical_logits(tmp_path, cuts):
    model, _ = make_checkpoint(tmp_path)
    model.save_pretrained(tmp_path / "export")
    loaded = SALM.from_pretrained(tmp_path / "export")
    assert not loaded.training
    assert torch.equal(logits(loaded, cuts), logits(model, cuts))
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    # the tied LM head is stored once
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert "llm.model.embed_tokens.weight" in f.keys() and "llm.lm_head.weight" not in f.keys()


def test_load_is_strict(tmp_path):
    model, _ = make_checkpoint(tmp_path)
    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["perception"]["encoder"]["n_layers"] = 2  # the weights no longer cover the architecture
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match="does not fit the model.*missing.*perception.encoder.layers.1"):
        SALM.from_pretrained(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="neither an export directory"):
        SALM.from_pretrained(tmp_path)


def test_checkpoint_export_is_self_contained_and_generates_offline(tmp_path, cuts, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, checkpoint = make_checkpoint(tmp_path)
    expected = greedy(model, cuts)
    infer.main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "export")])
    assert "exported SALM" in capsys.readouterr().out
    # nothing of the training setup is left: the LLM directory it named is gone, and the export
    # has moved
    shutil.rmtree(tmp_path / "tiny-llm")
    moved = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "salm")
    shutil.rmtree(tmp_path / "export")
    config = json.loads((moved / "config.json").read_text())
    assert config["pretrained_llm"] == "llm" and config["pretrained_weights"] is False
    assert str(tmp_path) not in (moved / "config.json").read_text()
    loaded = SALM.from_pretrained(moved)
    assert torch.equal(greedy(loaded, cuts), expected)


def test_bfloat16_export_keeps_the_mel_frontend_in_fp32(tmp_path, cuts):
    model, checkpoint = make_checkpoint(tmp_path)
    infer.main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "bf16"),
                "--dtype", "bfloat16"])
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert {d for n, d in dtypes.items() if n.startswith("perception.preprocessor.")} == {"F32"}
    assert {d for n, d in dtypes.items()
            if not n.startswith("perception.preprocessor.")} == {"BF16", "I64"}
    # counters stay integers
    assert all(n.endswith("num_batches_tracked") for n, d in dtypes.items() if d == "I64")
    loaded = SALM.from_pretrained(tmp_path / "bf16")
    assert loaded.llm.dtype == torch.bfloat16
    assert loaded.perception.preprocessor.featurizer.fb.dtype == torch.float32
    torch.testing.assert_close(logits(loaded, cuts).float(), logits(model, cuts), atol=0.05,
                               rtol=0.05)
    assert SALM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).llm.dtype == torch.float32


def test_merged_lora_export_generates_the_same_tokens(tmp_path, cuts):
    model, _ = make_checkpoint(tmp_path, LORA)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
            param.data.normal_(0, 0.3)
    checkpoint = tmp_path / "lora.ckpt"
    config = torch.load(tmp_path / "step=2.ckpt")["config"]
    torch.save({"model": model.state_dict(), "config": config}, checkpoint)
    expected = greedy(model, cuts, max_new_tokens=10)
    with model.llm.disable_adapter():  # the adapter matters
        assert not torch.equal(greedy(model, cuts, max_new_tokens=10), expected)

    infer.main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "merged"),
                "--merge-lora"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "lora" not in config
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert not [n for n in f.keys() if "lora_" in n or "base_model" in n]
    merged = SALM.from_pretrained(tmp_path / "merged")
    assert type(merged.llm).__name__ == "LlamaForCausalLM"
    assert torch.equal(greedy(merged, cuts, max_new_tokens=10), expected)
    torch.testing.assert_close(logits(merged, cuts), logits(model, cuts), atol=1e-4, rtol=1e-4)

    # unmerged round trip
    infer.main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "adapters")])
    adapters = SALM.from_pretrained(tmp_path / "adapters")
    assert torch.equal(greedy(adapters, cuts, max_new_tokens=10), expected)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        infer.export(tmp_path / "merged", tmp_path / "again", merge_lora=True)


@pytest.mark.parametrize("config", ["s2s_duplex.yaml", "s2s_duplex_speech_decoder.yaml"])
def test_duplex_round_trip_gives_identical_outputs(tmp_path, config):
    for name in ("tiny-llm", "tiny-mimi"):
        shutil.copytree(ROOT / "assets" / name, tmp_path / name)
    cfg = load_config(str(ROOT / "configs" / config),
                      [f"model.pretrained_llm={tmp_path / 'tiny-llm'}",
                       f"model.pretrained_audio_codec={tmp_path / 'tiny-mimi'}"], None)
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    model.save_pretrained(tmp_path / "export")
    shutil.rmtree(tmp_path / "tiny-llm")
    shutil.rmtree(tmp_path / "tiny-mimi")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["pretrained_audio_codec"] == "codec"
    loaded = type(model).from_pretrained(tmp_path / "export")

    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    question = next(iter(CutSet.from_shar(in_dir=str(ROOT / "assets" / "demo" / "qa_val"))))
    audio = torch.from_numpy(question.load_audio())  # (1, T) at 16 kHz
    lens = torch.tensor([audio.shape[1]])
    user_embeds, _ = model.perception(audio, lens)
    T = user_embeds.shape[1]
    text_ids = torch.randint(model.text_pad_id + 1, 200, (1, T))
    audio_ids = torch.randint(0, model.speech_vocab_size, (1, T, model.num_codebooks))
    expected = model(user_embeds, text_ids, audio_ids)
    got = loaded(user_embeds, text_ids, audio_ids)
    for key in ("text_logits", "audio_logits"):
        assert torch.equal(got[key], expected[key])
    expected, got = model.offline_inference(audio, lens), loaded.offline_inference(audio, lens)
    for key in ("tokens_text", "tokens_audio", "audio"):
        assert torch.equal(got[key], expected[key]), key


# ---- generate / evaluate -------------------------------------------------------------------------

def test_generate_on_the_demo_validation_set(tmp_path, capsys):
    _, checkpoint = make_checkpoint(tmp_path)
    infer.main(["generate", "--model", str(checkpoint), "--inputs", str(ASR_VAL), "--output-dir",
                str(tmp_path / "out"), "--max-new-tokens", "4", "--batch-size", "32"])
    lines = (tmp_path / "out" / "asr_val.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    demo = {c.id: c for c in CutSet.from_shar(in_dir=str(ASR_VAL))}
    assert len(rows) == len(demo) == 60 and {r["id"] for r in rows} == set(demo)
    assert all(set(r) == {"id", "duration", "text", "pred_text", "prompt"} for r in rows)
    assert all(r["prompt"] == f"<s>[INST] {PROMPT} <|audioplaceholder|> [/INST]" for r in rows)
    assert all(r["text"] == demo[r["id"]].supervisions[0].text for r in rows)
    assert [r["duration"] for r in rows] == sorted((r["duration"] for r in rows), reverse=True)
    out = capsys.readouterr().out
    assert "asr_val: 60 items" in out and "tokens/s" in out and "RTFx" in out


def test_conversations_audio_files_and_prompts(tmp_path, cuts, capsys):
    _, checkpoint = make_checkpoint(tmp_path)
    paths = []
    for cut in cuts:
        paths.append(tmp_path / f"{cut.id}.wav")
        soundfile.write(paths[-1], cut.load_audio()[0], cut.sampling_rate)
    manifest = tmp_path / "chat.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "conversations": [
        {"from": "User", "type": "text", "value": "What is said here?"},
        {"from": "User", "type": "audio", "value": p.name, "duration": cut.duration},
        {"from": "Assistant", "type": "text", "value": cut.supervisions[0].text}]}) + "\n"
        for i, (p, cut) in enumerate(zip(paths, cuts))))
    infer.main(["generate", "--model", str(checkpoint), "--inputs", str(manifest),
                *map(str, paths[:2]), "--output-dir", str(tmp_path / "out"),
                "--max-new-tokens", "3", "--system-prompt", "Be brief."])
    read_rows = lambda name: [json.loads(line)
                              for line in (tmp_path / "out" / name).read_text().splitlines()]
    chats = read_rows("chat.jsonl")
    assert sorted(c["id"] for c in chats) == ["c0", "c1", "c2"]
    for chat in chats:
        roles = [(t["from"], t["type"]) for t in chat["conversations"]]
        assert roles == [("System", "text"), ("User", "text"), ("User", "audio"),
                         ("Assistant", "text")]
        assert chat["conversations"][0]["value"] == "Be brief."
        assert chat["conversations"][2]["value"] in {str(p) for p in paths}
    audio = read_rows("audio.jsonl")
    assert sorted(r["id"] for r in audio) == sorted(p.stem for p in paths[:2])
    assert all(r["text"] == "" for r in audio)


def test_generated_rows_show_the_prompt_each_line_became(tmp_path, cuts):
    _, checkpoint = make_checkpoint(tmp_path)
    for i, cut in enumerate(cuts[:2]):
        soundfile.write(tmp_path / f"{i}.wav", cut.load_audio()[0], 16000)
    contexts = ["Write down what you hear.", "Spell it out:"]
    manifest = tmp_path / "asr.json"  # NeMo ASR lines with their own prompts
    lines = [{"audio_filepath": f"{i}.wav", "duration": cuts[i].duration, "text": "x", "context": c}
             for i, c in enumerate(contexts)]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    chats = tmp_path / "chats.jsonl"  # a conversation whose system prompt comes from its tags
    turns = [{"from": "User", "type": "audio", "value": "0.wav"},
             {"from": "Assistant", "type": "text", "value": "x"}]
    chats.write_text(json.dumps({"id": "c0", "conversations": turns}))
    inputs = tmp_path / "chats.yaml"
    inputs.write_text(f"- type: multimodal_conversation\n  manifest_filepath: {chats}\n"
                      "  tags: {system_prompt: You are a careful listener.}\n")
    infer.main(["generate", "--model", str(checkpoint), "--inputs", str(manifest), str(inputs),
                "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2"])
    lines = (tmp_path / "out" / "asr.jsonl").read_text().splitlines()
    rows = {r["duration"]: r for r in map(json.loads, lines)}
    for i, context in enumerate(contexts):
        prompt = rows[round(cuts[i].duration, 3)]["prompt"]
        assert prompt == f"<s>[INST] {context} <|audioplaceholder|> [/INST]"
    chat = json.loads((tmp_path / "out" / "chats.jsonl").read_text())
    assert chat["prompt"] == ("<s>[INST] <<SYS>>\nYou are a careful listener.\n<</SYS>>\n\n"
                              "<|audioplaceholder|> [/INST]")
    system = {"from": "System", "type": "text", "value": "You are a careful listener."}
    assert chat["conversations"][0] == system


def test_prompts_around_the_audio(cuts):
    cut = cuts[0]
    conversation, reference = infer.prompt_and_reference(cut, None, None)
    assert reference == cut.supervisions[0].text
    assert conversation.prompt_turns("<a>") == [{"role": "user", "content": f"{PROMPT} <a>"}]
    conversation, _ = infer.prompt_and_reference(cut, "Be brief.", "")
    assert conversation.prompt_turns("<a>") == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "<a>"}]
    # a cut's own context is its prompt, as in training
    cut = cut.with_custom("context", "Transcribe:")
    conversation, _ = infer.prompt_and_reference(cut, None, None)
    assert conversation.prompt_turns("<a>") == [{"role": "user", "content": "Transcribe: <a>"}]


def test_evaluate_scores_each_dataset_and_their_mean(tmp_path, capsys, monkeypatch):
    # a random model's answers are noise: known answers stand in for them to check the scoring
    # end to end
    def answers(text):
        return lambda model, prompts, audios, max_new_tokens: ([text] * len(prompts), 0)

    _, checkpoint = make_checkpoint(tmp_path)
    model = SALM.from_pretrained(checkpoint)
    cut = next(iter(CutSet.from_shar(in_dir=str(ASR_VAL))))
    soundfile.write(tmp_path / "a.wav", cut.load_audio()[0], 16000)
    nemo_manifest = tmp_path / "other.json"
    line = {"audio_filepath": "a.wav", "duration": cut.duration, "text": "One!"}
    nemo_manifest.write_text(json.dumps(line) + "\n")
    monkeypatch.setattr(infer, "answer", answers("how many red boxes"))
    results = infer.generate(model, infer.read_datasets([str(ASR_VAL)]), tmp_path / "out")
    monkeypatch.setattr(infer, "answer", answers("one"))
    results |= infer.generate(model, infer.read_datasets([str(nemo_manifest)]), tmp_path / "out")

    metrics = infer.evaluate(results, output_dir=tmp_path / "out")
    refs = [c.supervisions[0].text for c in CutSet.from_shar(in_dir=str(ASR_VAL))]
    assert metrics["wer_asr_val"] == pytest.approx(wer(refs, ["how many red boxes"] * len(refs)))
    assert metrics["wer_other"] == 0.0  # "One!" and "one" are the same words after the normalizer
    assert metrics["wer"] == pytest.approx(metrics["wer_asr_val"] / 2)
    out = capsys.readouterr().out
    assert "Whisper EnglishTextNormalizer (whisper-normalizer" in out
    assert "ins " in out and "del " in out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["wer"] == metrics["wer"]


def test_evaluate_counts_every_item_it_drops(tmp_path, capsys, fresh_warnings):
    _, checkpoint = make_checkpoint(tmp_path)
    rows = []
    for cut in list(CutSet.from_shar(in_dir=str(ASR_VAL)))[:4]:
        soundfile.write(tmp_path / f"{cut.id}.flac", cut.load_audio()[0], 16000)
        rows.append({"audio_filepath": f"{cut.id}.flac", "duration": cut.duration,
                     "text": cut.supervisions[0].text})
    whole = (tmp_path / rows[0]["audio_filepath"]).read_bytes()
    (tmp_path / "corrupt.flac").write_bytes(whole[: len(whole) // 2])  # opens, fails when decoded
    rows += [{"audio_filepath": "missing.wav", "duration": 1.0, "text": "gone"},  # fails when read
             {"audio_filepath": "corrupt.flac", "duration": rows[0]["duration"], "text": "half"}]
    (tmp_path / "bad.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = infer.main(["evaluate", "--model", str(checkpoint), "--inputs",
                          str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "out"),
                          "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert "bad: 4 items (2 skipped: unreadable audio 2)," in out
    scored = r"bad: WER [\d.]+% .* over 4 items \(2 skipped: unreadable audio 2\), \d+ words"
    assert re.search(scored, out)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skipped_bad"] == written["skipped_bad"] == 2
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and "missing.wav" in warnings[0] and "corrupt.flac" in warnings[1]


def test_command_line_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "infer.py", "generate", "--model", str(tmp_path),
                          "--inputs", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "neither an export directory" in out.stderr


# ---- metrics -------------------------------------------------------------------------------------

def test_normalizer_known_answers():
    # Whisper's EnglishTextNormalizer, as its documentation describes it
    assert normalize_text("Mr. Smith paid $20 million, didn't he?") == \
        "mister smith paid $20000000 did not he"
    assert normalize_text("Twenty five colours!") == "25 colors"
    assert normalize_text("Um, hello   World.") == "hello world"


def test_wer_and_bleu_known_answers():
    refs = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine people"]
    assert wer(refs, refs) == 0.0 and bleu(refs, refs) == pytest.approx(100.0)
    assert wer(["a b c"], ["a b d"]) == pytest.approx(1 / 3)
    assert bleu(["a b c"], ["a b d"]) == 0.0  # NeMo's test pair: no 4-gram can match
    # corpus BLEU over all items (one reference stream), case and punctuation ignored
    assert bleu(["The cat sat on the mat.", "a b c d"],
                ["the cat sat on the mat", "a b c d"]) == pytest.approx(100)
    assert bleu(["a b c d"], ["e f g h"]) == 0.0
    # hand-counted: 1 insertion ("down"), 2 deletions ("a b"), 1 substitution (red -> blue),
    # 8 reference words
    details = wer_details(["The cat sat.", "a b", "the red box"],
                          ["the cat, sat down", "", "the blue box"])
    assert details == {"wer": pytest.approx(4 / 8), "ins": 1 / 8, "del": 2 / 8, "sub": 1 / 8,
                       "ref_words": 8}
    assert word_errors(["The cat sat.", "a b"], ["the cat, sat down", ""]) == {
        "substitutions": 0, "deletions": 2, "insertions": 1, "ref_words": 5}


def test_metrics_per_dataset_and_mean():
    same = [("the quick brown fox jumps over the lazy dog",) * 2]
    pairs = {"same": same, "diff": [("a b c", "a b d")]}
    assert metrics_by_dataset("wer", pairs) == {"wer_same": 0.0, "wer_diff": pytest.approx(1 / 3),
                                                "wer": pytest.approx(1 / 6)}
    assert metrics_by_dataset("txt_bleu", pairs) == {"txt_bleu_same": pytest.approx(100.0),
                                                     "txt_bleu_diff": 0.0,
                                                     "txt_bleu": pytest.approx(50.0)}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics_by_dataset("cer", pairs)


def test_asr_bleu_scores_what_the_asr_heard_against_the_references():
    class Hears(Transcriber):  # a scoring ASR that transcribes every clip as it is told
        def __init__(self, texts):
            self.texts = texts

        def transcribe(self, clips, sample_rate):
            return list(self.texts)

    clip = [np.zeros(2400, np.float32)]
    # by hand: each n-gram of the 5-word transcript is in the 6-word reference (precisions 1),
    # brevity penalty exp(1 - 6/5); case and punctuation are normalised away
    heard = Hears(["The cat sat on the."])
    score, transcripts = asr_bleu(["the cat sat on the mat"], clip, 24000, heard)
    assert transcripts == ["The cat sat on the."] and score == pytest.approx(100 * math.exp(-0.2))
    # the other way round: no brevity penalty; precisions 5/6, 4/5, 3/4, 2/3: geometric mean
    # (1/3) ** (1/4)
    score, _ = asr_bleu(["the cat sat on the"], clip, 24000, Hears(["the cat sat on the mat"]))
    assert score == pytest.approx(100 * (1 / 3) ** 0.25)


def test_asr_bleu_with_a_salm_export(tmp_path, cuts):
    model, _ = make_checkpoint(tmp_path)
    model.save_pretrained(tmp_path / "scorer")
    references = [c.supervisions[0].text for c in cuts]
    # e.g. a codec's output rate
    clips_24k = [resample(c.load_audio()[0], 16000, 24000) for c in cuts]
    score, transcripts = asr_bleu(references, clips_24k, 24000, str(tmp_path / "scorer"))
    assert len(transcripts) == len(cuts) and all(isinstance(t, str) for t in transcripts)
    assert score == sacrebleu.corpus_bleu([normalize_text(t) for t in transcripts],
                                          [[normalize_text(r) for r in references]]).score
    transcriber = Transcriber(tmp_path / "scorer")
    clips_16k = [resample(c, 24000, 16000) for c in clips_24k]
    # the same audio at the scorer's rate
    assert transcriber.transcribe(clips_16k, 16000) == transcripts
    with pytest.raises(ValueError, match="3 references but 2 audios"):
        asr_bleu(references, clips_24k[:2], 24000, transcriber)
    with pytest.raises(ValueError, match="neither a SALM of this project"):
        Transcriber(tmp_path / "no-such-model")


def test_asr_bleu_with_a_transformers_asr_model(tmp_path):
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForCTC, Wav2Vec2Processor)

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2,
             **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="<unk>",
                                     pad_token="<pad>")
    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=16000),
                                  tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    torch.manual_seed(0)
    asr = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32,
                                        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                                        num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=2)).eval()
    asr.save_pretrained(tmp_path)
    clips = [0.1 * torch.randn(24000), 0.1 * torch.randn(12000)]  # 1 s and 0.5 s at 24 kHz
    score, transcripts = asr_bleu(["hello there", "yes"], clips, 24000, str(tmp_path))
    assert len(transcripts) == 2 and all(isinstance(t, str) for t in transcripts)
    hypotheses = [normalize_text(t) for t in transcripts]
    assert score == sacrebleu.corpus_bleu(hypotheses, [["hello there", "yes"]]).score
    clip_16k = resample(clips[0].numpy(), 24000, 16000)  # the longest clip: no padding in the batch
    with torch.no_grad():  # by hand: CTC greedy decoding of the 16 kHz clip
        logits = asr(**processor(clip_16k, sampling_rate=16000, return_tensors="pt")).logits
    assert len(clip_16k) == 16000
    assert transcripts[0] == processor.batch_decode(logits.argmax(-1))[0].strip()
