"""SALM: prompt formats, placeholder replacement, freezing and LoRA, the loss, training and
generation.

Models are tiny and random (a 2-layer Llama or GPT-2, a 1-layer FastConformer) built from local
directories that the fixtures write, so every test runs offline in seconds.
"""

import copy
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import DynamicCache, GenerationConfig, GPT2Config

import salm
from checkpoint import nemo_named_parameters, to_nemo_name
from conftest import (CHAT_TEMPLATE, CORPUS, TAG, byte_level_tokenizer, tiny_llama_config,
                      write_llm_dir)
from data import right_pad
from manifests import Conversation, Turn, audio_file_cut
from prompts import make_prompt_formatter
from salm import SALM, load_tokenizer, splice, splice_index

SAMPLE_RATE = 16000
SHIPPED_LLM = Path(__file__).resolve().parents[1] / "assets" / "tiny-llm"
# Made by NeMo 3.0 itself: its prompt formats' output; a tiny SALM's weights, config, names, outputs
NEMO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nemo"
# NeMo's tests/collections/speechlm2/test_salm.py::test_salm_dataset, decoded with TinyLlama's
# tokenizer
NEMO_LLAMA2_PROMPT = ("<s> [INST] Repeat after me: <|audioplaceholder|>  [/INST] "
                      "Some text transcription. </s>")
NEMO_TURNS = [
    {"role": "user", "content": "Repeat after me:"},
    {"role": "user", "content": TAG},
    {"role": "assistant", "content": "Some text transcription."},
]
PERCEPTION = {
    "preprocessor": {"sample_rate": SAMPLE_RATE, "features": 80, "window_size": 0.025,
                     "window_stride": 0.01},
    "encoder": {"feat_in": 80, "n_layers": 1, "d_model": 32, "n_heads": 2,
                "subsampling": "dw_striding", "subsampling_factor": 8,
                "subsampling_conv_channels": 16, "conv_kernel_size": 9},
    "modality_adapter": {"feat_in": 32, "n_layers": 1, "d_model": 32, "n_heads": 2,
                         "subsampling_factor": 1, "conv_kernel_size": 9},
}
# (conversation, audio lengths in samples): several audios per prompt, system prompts, two
# answered turns
CONVERSATIONS = [
    (NEMO_TURNS, [8000]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {TAG} and"},
      {"role": "user", "content": TAG}, {"role": "assistant", "content": "the quick brown fox"}],
     [6000, 3500]),
    ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
      {"role": "user", "content": TAG}, {"role": "assistant", "content": "lazy dog"}], [10000]),
]


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """GPT-2 learns absolute positions: left padding is only invisible if position ids follow
    the mask."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                        eos_token_id=2)
    return write_llm_dir(tmp_path_factory.mktemp("gpt2"), byte_level_tokenizer(), config,
                         bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="session")
def sentencepiece_llm_dir(tmp_path_factory):
    """Laid out like TinyLlama's tokenizer.json: '▁' prepended to every piece of text between
    special tokens, no pad token (so <unk> pads), and no audio tag (it gets an id past the
    embedding)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    special = ["<unk>", "<s>", "</s>"] + byte_tokens
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400,
                                                              special_tokens=special))
    return write_llm_dir(tmp_path_factory.mktemp("sentencepiece"), tokenizer, tiny_llama_config(),
                         bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_cfg(llm_dir, **overrides) -> dict:
    cfg = {"pretrained_llm": str(llm_dir), "pretrained_asr": None, "pretrained_weights": False,
           "audio_locator_tag": TAG, "prompt_format": "llama2", "freeze_params": [],
           "prevent_freeze_params": [], "perception": copy.deepcopy(PERCEPTION)}
    return {**cfg, **overrides}


def make_model(llm_dir, **overrides) -> SALM:
    torch.manual_seed(0)
    return SALM(make_cfg(llm_dir, **overrides)).eval()


def make_batch(model: SALM, conversations=CONVERSATIONS) -> dict:
    """What data.py produces: left-padded ids and loss mask, zero-padded audio in placeholder
    order."""
    torch.manual_seed(1)
    encoded = [model.encode_dialog(turns) for turns, _ in conversations]
    lengths = [n for _, audio_lengths in conversations for n in audio_lengths]
    audios = torch.zeros(len(lengths), max(lengths, default=0))
    for i, n in enumerate(lengths):
        audios[i, :n] = 0.1 * torch.randn(n)
    left_pad = lambda rows, value: torch.nn.utils.rnn.pad_sequence(rows, True, value,
                                                                   padding_side="left")
    return {"audios": audios, "audio_lens": torch.tensor(lengths),
            "input_ids": left_pad([e["input_ids"] for e in encoded], model.text_pad_id),
            "loss_mask": left_pad([e["mask"] for e in encoded], False)}


def test_replace_placeholders_nemo_vector():
    # NeMo's tests/collections/speechlm2/test_audio_placeholders.py, values and assertions as
    # published
    PAD, AUDIO = 0, 100
    input_ids = torch.tensor([[7, AUDIO, 1, 2, AUDIO, 1], [PAD, PAD, 3, AUDIO, 4, 5]])
    loss_mask = torch.tensor([[False, False, False, False, False, True],
                              [False, False, False, False, True, True]])
    embeds = torch.ones(2, 6, 2)
    embeds[1, :2] = 0
    replacements = torch.stack([torch.full((4, 2), v) for v in (2.0, 3.0, 4.0)])  # (3, 4, 2)
    index, frames = splice_index([input_ids[0], input_ids[1, 2:]], [4, 3, 2], AUDIO, left=True)
    embeds_r = splice(embeds, replacements, index)
    targets_r = splice(input_ids.where(loss_mask, -100), torch.full((3, 4), -100), index, fill=-100)
    attention_mask_r = index != input_ids.numel() + 3 * frames  # not the padding entry
    assert embeds_r.shape == (2, 11, 2)
    assert (embeds_r[0, 0] == 1.0).all() and (embeds_r[0, 1:5] == 2.0).all()
    assert (embeds_r[0, 5:7] == 1.0).all()
    assert (embeds_r[0, 7:10] == 3.0).all() and (embeds_r[0, 10] == 1.0).all()
    assert (embeds_r[1, :6] == 0.0).all() and (embeds_r[1, 6:7] == 1.0).all()
    assert (embeds_r[1, 7:9] == 4.0).all() and (embeds_r[1, 9:] == 1.0).all()
    torch.testing.assert_close(targets_r, torch.tensor([[-100] * 10 + [1], [-100] * 9 + [4, 5]]))
    torch.testing.assert_close(attention_mask_r,
                               torch.tensor([[True] * 11, [False] * 6 + [True] * 5]))

    with pytest.raises(ValueError, match="3 audio locator tags but 2 audios"):
        splice_index([input_ids[0], input_ids[1, 2:]], [4, 3], AUDIO)


def test_llama2_matches_nemo_rendering(sentencepiece_llm_dir, llm_dir):
    # With TinyLlama's tokenizer layout the decoded prompt is NeMo's string, byte for byte.
    model = make_model(sentencepiece_llm_dir)
    assert model.text_pad_id == model.tokenizer.unk_token_id  # no pad token: <unk> pads, as in NeMo
    assert model.audio_locator_tag_id >= model.text_vocab_size  # the tag is never looked up
    encoded = model.encode_dialog(NEMO_TURNS)
    ids, mask = encoded["input_ids"], encoded["mask"]
    assert model.tokenizer.decode(ids) == NEMO_LLAMA2_PROMPT
    assert mask.sum() > 0 and mask[mask.nonzero()[0, 0]:].all()  # supervised: one run at the end
    assert model.tokenizer.decode(ids[~mask]) == \
        "<s> [INST] Repeat after me: <|audioplaceholder|>  [/INST]"
    assert model.tokenizer.decode(ids[mask]) == "Some text transcription. </s>"

    # A byte-level BPE has no '▁' prefix, so the same template reads without SentencePiece's
    # extra spaces.
    model = make_model(llm_dir)
    encoded = model.encode_dialog(NEMO_TURNS)
    assert model.tokenizer.decode(encoded["input_ids"]) == (
        "<s>[INST] Repeat after me: <|audioplaceholder|> [/INST]Some text transcription. </s>")
    assert model.tokenizer.decode(encoded["input_ids"][encoded["mask"]]) == \
        "Some text transcription. </s>"


def test_llama2_system_prompt_multi_turn_and_nemo_slots(llm_dir):
    model = make_model(llm_dir)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "world"}, {"role": "user", "content": "again"},
             {"role": "assistant", "content": "the fox"}]
    encoded = model.encode_dialog(turns)
    decode = model.tokenizer.decode
    assert decode(encoded["input_ids"]) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n"
                                            "hello [/INST]world </s>"
                                            "<s>[INST] again [/INST]the fox </s>")
    assert decode(encoded["input_ids"][encoded["mask"]]) == "world </s>the fox </s>"
    nemo_turns = [{"role": "system_and_user", "slots": {"system": "Be brief.", "message": "hello"}},
                  {"role": "assistant", "slots": {"message": "world"}},
                  {"role": "user", "slots": {"message": "again"}},
                  {"role": "assistant", "slots": {"message": "the fox"}}]
    assert torch.equal(model.encode_dialog(nemo_turns)["input_ids"], encoded["input_ids"])
    # for generation: ends after [/INST], nothing supervised
    prompt = model.encode_dialog(turns[:2])
    assert decode(prompt["input_ids"]).endswith("hello [/INST]") and not prompt["mask"].any()
    with pytest.raises(ValueError, match="unknown turn role"):
        model.encode_dialog([{"role": "User", "content": "hi"}])


def test_chat_template_formatter(llm_dir):
    model = make_model(llm_dir, prompt_format="chat_template")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat:"},
             {"role": "user", "content": TAG}, {"role": "assistant", "content": "hello world"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "fox"}]
    encoded = model.encode_dialog(turns)
    merged = turns[:1] + [{"role": "user", "content": f"Repeat: {TAG}"}] + turns[3:]
    assert model.tokenizer.decode(encoded["input_ids"]) == \
        model.tokenizer.apply_chat_template(merged, tokenize=False)
    assert model.tokenizer.decode(encoded["input_ids"][encoded["mask"]]) == \
        "hello world</s>\nfox</s>\n"
    prompt = model.encode_dialog(turns[:5])
    assert model.tokenizer.decode(prompt["input_ids"]).endswith(
        "<|user|>\nagain</s>\n<|assistant|>\n")
    assert model.tokenizer.decode(prompt["input_ids"][prompt["mask"]]) == "hello world</s>\n"

    model.tokenizer.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE
    with pytest.raises(ValueError, match="differently from its prefixes"):
        model.encode_dialog(turns)


def test_config_errors(llm_dir):
    with pytest.raises(ValueError, match="unknown prompt_format 'qwen2': use one of llama2, "):
        make_model(llm_dir, prompt_format="qwen2")
    with pytest.raises(ValueError, match=r"prompt_format qwen needs <\|im_start\|>, <\|im_end\|>"):
        make_model(llm_dir, prompt_format="qwen")


def test_pretrained_llm_mistakes_say_what_is_wrong(llm_dir, tmp_path, monkeypatch):
    def message(load, name):
        with pytest.raises(FileNotFoundError) as err:
            load(str(name))
        assert "\n" not in str(err.value)
        return str(err.value).removeprefix(f"cannot load pretrained_llm '{name}': ")

    tokenizer = lambda name: salm.load_tokenizer(name, TAG)
    llm = lambda name: salm.load_llm(name, pretrained_weights=True)
    monkeypatch.chdir(tmp_path)
    assert message(tokenizer, "/no/such/llm").startswith("no such directory. Pass a local")
    assert message(llm, "./llm").startswith("no such directory. ")
    # a typo in a relative path reads as a hub name too; offline, hub names need the local cache
    assert message(llm, "assets/tiny_llm").startswith(
        "no such directory, and as a hub name it is not in the local Hugging Face cache (offline, "
        "HF_HUB_OFFLINE=1")
    assert "pretrained_weights: false" in message(llm, "some-org/not-in-the-cache")
    (tmp_path / "empty").mkdir()
    both = ("the directory has no config.json and no tokenizer files (tokenizer.json / "
            "tokenizer.model / vocab.json)")
    assert message(tokenizer, "empty") == message(llm, "empty") == both
    (tmp_path / "config_only").mkdir()
    shutil.copy(llm_dir / "config.json", tmp_path / "config_only")
    assert message(tokenizer, "config_only").startswith("the directory has no tokenizer files (")
    shutil.copytree(llm_dir, tmp_path / "no_config", ignore=shutil.ignore_patterns("config.json"))
    assert message(llm, "no_config") == "the directory has no config.json"


def test_freeze_and_prevent_on_the_salm_tree(llm_dir, capsys):
    nemo_defaults = [r"^llm\..+$", r"^embed_tokens\..+$", r"^perception\.preprocessor\..+$",
                     r"^perception\.encoder\..+$"]
    model = make_model(llm_dir, freeze_params=nemo_defaults)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("perception.modality_adapter.", "perception.proj."))
                             for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith("perception.proj.")} <= trainable
    num_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    total = sum(p.numel() for p in model.parameters())
    assert (f"Parameters | trainable={num_trainable:,} ({100 * num_trainable / total:.2f}%) | "
            f"total={total:,}") in capsys.readouterr().out

    model = make_model(llm_dir, freeze_params=nemo_defaults[:1],
                       prevent_freeze_params=[r"^llm\.lm_head\."])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith("llm.") and "lm_head" not in n and "embed_tokens" not in n}
    assert model.llm.lm_head.weight.requires_grad  # prevent wins


def frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_patterns_act_on_the_tensors_they_name_in_nemo(llm_dir):
    # NeMo keeps the embedding outside the LLM, as `embed_tokens.weight`; untied (llm_dir): alone
    embedding_only = make_model(llm_dir, freeze_params=[r"^embed_tokens\..+$"])
    assert frozen(embedding_only) == {"llm.model.embed_tokens.weight"}
    llm_frozen = frozen(make_model(llm_dir, freeze_params=[r"^llm\..+$"]))
    assert "llm.lm_head.weight" in llm_frozen and "llm.model.embed_tokens.weight" not in llm_frozen
    # tied (NeMo's tiny SALM): NeMo lists the shared tensor once, as llm.lm_head.weight
    with pytest.warns(UserWarning, match=r"\^embed_tokens.*matches no parameter"):
        assert frozen(nemo_tiny_salm(freeze_params=[r"^embed_tokens\..+$"])) == set()
    model = nemo_tiny_salm(freeze_params=[r"^llm\..+$"])
    assert not model.embed_tokens.weight.requires_grad
    assert frozen(model) == {n for n, _ in model.named_parameters() if n.startswith("llm.")}

    # the names the patterns see are the names of NeMo's SALM.named_parameters()
    record = nemo_fixture("nemo_salm_state_dict.json")
    plain, lora = record["plain"], record["lora"]
    state_names = set(plain["state_dict (name: shape if float32 else [shape, dtype])"])
    buffers = set(plain["buffers_in_state_dict"])
    parameters = state_names - buffers - {"embed_tokens.weight"}  # the tied embedding: listed once
    assert {n for n, _ in nemo_named_parameters(nemo_tiny_salm())} == parameters
    model = nemo_tiny_salm(lora=lora["cfg_lora"])
    names = {to_nemo_name(n) for n in model.state_dict()}
    llm_names = {n for n in names if n.startswith("llm.")}
    key = "state_dict_llm_entries (all non-llm.* entries identical to plain)"
    assert llm_names == set(lora[key])
    assert names - llm_names == {n for n in state_names if not n.startswith("llm.")}
    untrained = {n for n, p in nemo_named_parameters(model) if not p.requires_grad}
    assert untrained == set(lora["requires_grad_false_after_init"])


def test_prevent_freeze_params_never_unfreezes_as_in_nemo(llm_dir):
    # NeMo's prevent_freeze_params only shields from freeze_params: peft's frozen base stays frozen
    model = make_model(llm_dir, lora={"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8},
                       freeze_params=[r"^llm\..+$"], prevent_freeze_params=[r"^llm\..+$"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")}
    assert trained == {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_lora_keeps_only_lora_and_unfrozen_parameters_trainable(llm_dir):
    lora = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    model = make_model(llm_dir, lora=lora, freeze_params=[r"^perception\.encoder\..+$"])
    names = [n for n, _ in model.named_parameters()]
    lora_names = [n for n in names if ".lora_" in n]
    assert len(lora_names) == 2 * 2 * 2  # lora_A and lora_B on q_proj and v_proj of 2 layers
    assert all(n.startswith("llm.base_model.model.model.layers.") for n in lora_names)
    expected = set(lora_names) | {n for n in names
                                  if n.startswith("perception.") and ".encoder." not in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    # `.lora_` survives a broad freeze
    model = make_model(llm_dir, lora=lora, freeze_params=[r"^llm\..+$"])
    model.train()
    model.training_step(make_batch(model))["loss"].backward()
    assert {n for n, p in model.named_parameters()
            if n.startswith("llm.") and p.grad is not None} == set(lora_names)


def reference_loss_and_accuracy(model: SALM, conversations=CONVERSATIONS):
    """Each conversation alone, unpadded, assembled by hand and run through the HF LLM itself."""
    batch = make_batch(model, conversations)
    clips = iter([])
    if len(batch["audios"]):
        audio_embeds, audio_embed_lens = model.perception(batch["audios"], batch["audio_lens"])
        clips = iter([e[:n] for e, n in zip(audio_embeds, audio_embed_lens)])
    embedding = model.llm.get_input_embeddings().weight
    nll, correct, count, positions = 0.0, 0, 0, 0
    for turns, _ in conversations:
        encoded = model.encode_dialog(turns)
        pieces, labels = [], []
        for token, supervised in zip(encoded["input_ids"].tolist(), encoded["mask"].tolist()):
            if token == model.audio_locator_tag_id:
                clip = next(clips)
                pieces.append(clip)
                labels += [None] * len(clip)
            else:
                pieces.append(embedding[token][None])
                labels.append(token if supervised else None)
        log_probs = model.llm(inputs_embeds=torch.cat(pieces)[None]).logits[0].log_softmax(-1)
        for t in range(1, len(labels)):
            if labels[t] is not None:
                nll -= log_probs[t - 1, labels[t]]
                correct += int(log_probs[t - 1].argmax() == labels[t])
                count += 1
        positions += len(labels) - 1
    return batch, nll / count, correct, count, positions


@pytest.mark.parametrize("llm", ["llm_dir", "gpt2_dir"])
def test_training_and_validation_step_equal_hand_computation(llm, request):
    model = make_model(request.getfixturevalue(llm))
    with torch.no_grad():
        batch, loss, correct, count, positions = reference_loss_and_accuracy(model)
        out = model.training_step(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    torch.testing.assert_close(out["loss"], loss, atol=1e-5, rtol=1e-5)
    assert out["count"] == count
    assert out["num_tokens"] == positions

    val = model.validation_step(batch)
    assert val["count"] == count and val["correct"] == correct
    assert val["loss_sum"] / val["count"] == pytest.approx(float(loss), rel=1e-5)


def test_a_few_steps_on_one_batch_drive_the_loss_down(llm_dir):
    model = make_model(llm_dir).train()
    batch = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.training_step(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_validation_with_generation_scores_the_last_answer(llm_dir, monkeypatch):
    model = make_model(llm_dir)
    with torch.no_grad():
        batch, loss, correct, count, _ = reference_loss_and_accuracy(model)
    answers = ["Some text transcription.", "the quick red fox", ""]  # 0, 1 and 2 word errors
    encode = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [torch.tensor(encode(text) + [model.text_eos_id]) for text in answers]
    answer_ids = right_pad(rows, model.text_pad_id)[0]
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: answer_ids)
    out = model.validation_step(batch, generate=True)
    references = ["Some text transcription.", "the quick brown fox", "lazy dog"]
    assert out["pairs"] == list(zip(references, answers))
    summary = SALM.validation_summary(out)
    assert summary["loss"] == pytest.approx(float(loss), rel=1e-5)  # conversation by conversation
    assert summary["acc"] == correct / count
    assert summary["wer"] == pytest.approx(3 / 9)  # red for brown, no "lazy dog"; of 9 words


def write_audio(path, samples: np.ndarray, sample_rate: int, subtype: str) -> np.ndarray:
    soundfile.write(path, samples, sample_rate, subtype=subtype)
    return soundfile.read(path, dtype="float32")[0]  # what the file holds after quantisation


def test_generate_from_paths_tensors_and_token_ids(llm_dir, tmp_path):
    model = make_model(llm_dir)
    rng = np.random.default_rng(0)
    wav = write_audio(tmp_path / "a.wav", 0.1 * rng.standard_normal(16000), SAMPLE_RATE, "FLOAT")
    flac = write_audio(tmp_path / "b.flac", 0.1 * rng.standard_normal(9000), SAMPLE_RATE, "PCM_16")
    prompts = [[{"role": "user", "content": f"Repeat after me: {TAG}",
                 "audio": str(tmp_path / "a.wav")}],
               [{"role": "user", "content": f"{TAG} then", "audio": [tmp_path / "b.flac"]},
                {"role": "user", "content": TAG, "audio": str(tmp_path / "a.wav")}]]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6}  # Hugging Face arguments pass through
    from_paths = model.generate(prompts, **kwargs)
    assert from_paths.shape == (2, 6) and from_paths.dtype == torch.long
    assert ((0 <= from_paths) & (from_paths < model.text_vocab_size)).all()
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(model.generate(prompts, generation_config=config), from_paths)

    audios = torch.zeros(3, 16000)
    audios[0], audios[1, :9000] = torch.from_numpy(wav), torch.from_numpy(flac)
    audios[2] = torch.from_numpy(wav)
    no_paths = [[{k: v for k, v in turn.items() if k != "audio"} for turn in prompt]
                for prompt in prompts]
    from_tensors = model.generate(no_paths, audios=audios,
                                  audio_lens=torch.tensor([16000, 9000, 16000]), **kwargs)
    assert torch.equal(from_tensors, from_paths)

    # (1, L) already in the prompt format
    token_ids = model.encode_dialog(no_paths[1])["input_ids"][None]
    from_ids = model.generate(token_ids, audios=audios[1:, :],
                              audio_lens=torch.tensor([9000, 16000]), **kwargs)
    assert torch.equal(from_ids, model.generate(prompts[1:], **kwargs))

    with pytest.raises(ValueError, match="2 audio locator tags but 1 audios"):
        model.generate(no_paths[1:], audios=audios[:1], audio_lens=torch.tensor([16000]))
    with pytest.raises(ValueError, match="not both"):
        model.generate(prompts, audios=audios, audio_lens=torch.tensor([16000, 9000, 16000]))
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        model.generate([[{"role": "user", "content": TAG, "audio": str(tmp_path / "missing.wav")}]])


@pytest.mark.parametrize("llm", ["llm_dir", "gpt2_dir"])
def test_batched_generation_equals_one_by_one(llm, request):
    """The same tokens and scores in a left-padded batch as alone: padding is invisible to attention
    (the mask) and, for GPT-2's learned absolute positions, to the position ids."""
    model = make_model(request.getfixturevalue(llm))
    with torch.no_grad():  # larger weights: at init scale a random LLM repeats one token for all
        torch.manual_seed(3)
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    torch.manual_seed(2)
    cases = [([{"role": "user", "content": f"Repeat after me, please: {TAG}"}],
              [torch.randn(24000) * 0.1]),
             ([{"role": "user", "content": "hello"}], []),
             ([{"role": "system", "content": "Be brief."},
               {"role": "user", "content": f"{TAG} and {TAG}"}],
              [torch.randn(6000) * 0.1, torch.randn(11000) * 0.1])]
    clips = [clip for _, clips in cases for clip in clips]
    audios = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    audio_lens = torch.tensor([len(c) for c in clips])
    scored = dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    batched = model.generate([turns for turns, _ in cases], audios, audio_lens, **scored)
    assert len(batched.sequences.unique()) >= 12  # answers vary from step to step and row to row
    for i, (turns, clips) in enumerate(cases):
        audio = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True) if clips else None
        alone = model.generate([turns], audio, torch.tensor([len(c) for c in clips]), **scored)
        n = alone.sequences.shape[1]
        assert torch.equal(batched.sequences[i, :n], alone.sequences[0])
        assert (batched.sequences[i, n:] == model.text_pad_id).all()
        for step in range(n):  # every step's scores, not only their argmax
            torch.testing.assert_close(batched.scores[step][i], alone.scores[step][0], atol=1e-4,
                                       rtol=1e-4)


def test_generate_equals_greedy_decoding_with_forward(llm_dir):
    model = make_model(llm_dir)
    turns = [{"role": "user", "content": f"Repeat after me: {TAG}"}]
    audios, audio_lens = 0.1 * torch.randn(1, 16000), torch.tensor([16000])
    generated = model.generate([turns], audios, audio_lens, max_new_tokens=6, min_new_tokens=6)[0]

    input_ids = model.encode_dialog(turns)["input_ids"][None]  # (1, L)
    tag_id = model.audio_locator_tag_id
    with torch.no_grad():
        audio_embeds, audio_embed_lens = model.perception(audios, audio_lens)
        text_embeds = model.embed_tokens(input_ids.masked_fill(input_ids == tag_id, 0))
        tag = int((input_ids[0] == tag_id).nonzero())  # the one clip's frames go where its tag is
        clip = audio_embeds[:, : audio_embed_lens[0]]
        prompt_embeds = torch.cat([text_embeds[:, :tag], clip, text_embeds[:, tag + 1 :]], 1)
        prompt_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool)

        # no cache: the whole sequence at every step
        embeds, mask, tokens = prompt_embeds, prompt_mask, []
        for _ in range(6):
            token = model(embeds, attention_mask=mask)["logits"][0, -1].argmax()
            tokens.append(int(token))
            embeds = torch.cat([embeds, model.embed_tokens(token)[None, None]], 1)
            mask = torch.cat([mask, mask[:, -1:]], 1)
        assert tokens == generated.tolist()

        # with a KV cache, one position at a time
        cache, step_embeds, mask, tokens = DynamicCache(), prompt_embeds, prompt_mask, []
        for _ in range(6):
            out = model(step_embeds, attention_mask=mask, cache=cache)
            token = out["logits"][0, -1].argmax()
            tokens.append(int(token))
            cache, step_embeds = out["cache"], model.embed_tokens(token)[None, None]
            mask = torch.cat([mask, mask[:, -1:]], 1)
        assert tokens == generated.tolist()


def test_text_only_batches_and_any_llm_directory(sentencepiece_llm_dir):
    # A directory without a pad token or audio tag; text-only conversations mixed with audio ones,
    # or alone.
    model = make_model(sentencepiece_llm_dir)
    text_only = ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
                 [])
    assert model.tokenizer.decode(model.encode_dialog(text_only[0])["input_ids"]) == (
        "<s> [INST] hello [/INST] world </s>")
    for conversations in ([text_only, (NEMO_TURNS, [8000])], [text_only]):
        with torch.no_grad():
            batch, loss, _, count, _ = reference_loss_and_accuracy(model, conversations)
            out = model.training_step(batch)
        torch.testing.assert_close(out["loss"], loss, atol=1e-5, rtol=1e-5)
        assert out["count"] == count
        assert math.isfinite(model.validation_step(batch)["loss_sum"])


@pytest.mark.skipif(not (SHIPPED_LLM / "config.json").exists(),
                    reason="assets/tiny-llm not generated")
@pytest.mark.parametrize("prompt_format", ["llama2", "chat_template"])
def test_shipped_tiny_llm(prompt_format):
    model = make_model(SHIPPED_LLM, prompt_format=prompt_format)
    assert model.audio_locator_tag_id < model.text_vocab_size and model.text_pad_id is not None
    for turns, _ in CONVERSATIONS:
        encoded = model.encode_dialog(turns)
        ids, mask = encoded["input_ids"].tolist(), encoded["mask"].tolist()
        starts = [i for i in range(len(ids)) if mask[i] and (i == 0 or not mask[i - 1])]
        ends = [i + 1 for i in range(len(ids))
                if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
        # one run per assistant turn, each closed by EOS
        runs = [ids[a:b] for a, b in zip(starts, ends)]
        assert [model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs] == (
            [t["content"] for t in turns if t["role"] == "assistant"])
        assert all(r[-1] == model.text_eos_id for r in runs)
    out = model.training_step(make_batch(model))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0


def test_ctc_loss_weight_adds_ctc_of_single_clip_conversations(llm_dir):
    model = make_model(llm_dir, ctc_loss_weight=0.5)
    with torch.no_grad():
        batch, ce_loss, _, count, _ = reference_loss_and_accuracy(model)
        out = model.training_step(batch)
        ctc_sum, num_targets, clip = 0.0, 0, 0
        for (turns, audio_lengths) in CONVERSATIONS:
            clips = range(clip, clip + len(audio_lengths))
            clip += len(audio_lengths)
            if len(audio_lengths) != 1:
                continue  # a transcript cannot be split between two clips
            n = audio_lengths[0]
            embeds, embed_lens = model.perception(batch["audios"][clips[0], :n][None],
                                                  torch.tensor([n]))
            head = model.llm.get_output_embeddings()
            log_probs = head(embeds[0, : embed_lens[0]]).log_softmax(-1)
            encoded = model.encode_dialog(turns)
            target = encoded["input_ids"][encoded["mask"]]
            target = target[target != model.text_eos_id]
            ctc_sum += F.ctc_loss(log_probs[:, None], target[None], embed_lens,
                                  torch.tensor([len(target)]), blank=model.text_pad_id,
                                  reduction="sum")
            num_targets += len(target)
    # both terms share CE's normaliser, the supervised tokens, so losses of micro-batches add up
    # exactly
    torch.testing.assert_close(out["loss"], ce_loss + 0.5 * ctc_sum / count, atol=1e-4, rtol=1e-5)
    assert out["log"]["ctc_loss"] == pytest.approx(float(ctc_sum) / num_targets, rel=1e-5)


# ---- NeMo's prompt formats ---------------------------------------------------------------------

def nemo_fixture(name: str) -> dict:
    return json.loads((NEMO_FIXTURES / name).read_text())


NEMO_PROMPTS = nemo_fixture("prompt_formats.json")  # NeMo's encode_dialog of one conversation
NEMO_FORMATS = ["llama2", "llama3", "qwen", "qwen3", "gemma", "mistral", "plain", "phi2_qa",
                "phi2_chat", "phi2_code", "nemotron-h"]


@pytest.fixture(scope="module")
def nemo_tokenizer():
    """assets/tiny-llm's tokenizer with the special tokens NeMo's formats use (ids 1000-1013)."""
    return load_tokenizer(str(NEMO_FIXTURES / "tokenizer"), TAG)


def nemo_conversation(with_system: bool) -> list[dict]:
    conversation = NEMO_PROMPTS["conversation"]
    system = [{"role": "system", "content": conversation["system"]}] if with_system else []
    return system + [{"role": role, "content": text} for role, text in conversation["turns"]]


def mask_string(mask: torch.Tensor) -> str:
    return "".join("01"[m] for m in mask.tolist())


@pytest.mark.parametrize("name", NEMO_FORMATS)
def test_prompt_formats_match_nemo(name, nemo_tokenizer):
    nemo = NEMO_PROMPTS["formats"][name]
    formatter = make_prompt_formatter(name, nemo_tokenizer)
    has_system = "with_system_error" not in nemo  # NeMo's format has a system role
    turns = nemo_conversation(has_system)
    seed = nemo["train"].get("python_random_seed")  # qwen3 places /no_think by `random`
    train = formatter.encode_dialog(turns, rng=random.Random(seed) if seed is not None else None)
    assert train["input_ids"].tolist() == nemo["train"]["input_ids"]
    assert mask_string(train["mask"]) == nemo["train"]["mask"]
    inference = formatter.encode_dialog(turns[:-1])
    assert inference["input_ids"].tolist() == nemo["inference"]["input_ids"]
    assert nemo_tokenizer.decode(inference["input_ids"]) == nemo["inference"]["text"]
    if not has_system:  # NeMo asserts; we say why
        with pytest.raises(ValueError, match=f"prompt_format {name} has no system role"):
            formatter.encode_dialog(nemo_conversation(True))


@pytest.mark.parametrize("case", ["train_with_think_blocks_seed0", "train_with_empty_think_seed1",
                                  "train_seed2"])
def test_qwen3_thinking_matches_nemo(case, nemo_tokenizer):
    nemo = NEMO_PROMPTS["extra_qwen3"][case]
    turns = nemo["turns"] if isinstance(nemo["turns"], list) else nemo_conversation(True)
    turns = [{"role": t["role"], "content": t.get("content") or t["slots"]["message"]}
             for t in turns]
    encoded = make_prompt_formatter("qwen3", nemo_tokenizer).encode_dialog(
        turns, rng=random.Random(nemo["python_random_seed"]))
    assert encoded["input_ids"].tolist() == nemo["input_ids"]
    assert mask_string(encoded["mask"]) == nemo["mask"]


def test_qwen3_tags_follow_the_conversation_not_the_global_rng(nemo_tokenizer):
    formatter = make_prompt_formatter("qwen3", nemo_tokenizer)
    texts = []
    for i in range(12):
        turns = [{"role": "user", "content": f"Say {i}: {TAG}"},
                 {"role": "assistant", "content": "ok"}]
        random.seed(i)
        first = formatter.encode_dialog(turns)["input_ids"]
        random.seed(i + 100)  # a resumed run, a worker process: another global state, same prompt
        assert torch.equal(formatter.encode_dialog(turns)["input_ids"], first)
        texts.append(nemo_tokenizer.decode(first))
    assert any("/no_think Say" in t for t in texts) and any(f"{TAG} /no_think" in t for t in texts)


def test_prompt_formats_name_the_tokens_the_tokenizer_lacks():
    with pytest.raises(ValueError, match=r"llama3 needs <\|begin_of_text\|>, <\|start_header_id"):
        make_model(SHIPPED_LLM, prompt_format="llama3")
    model = make_model(SHIPPED_LLM, prompt_format="plain")  # plain text needs nothing special
    assert model.tokenizer.decode(model.encode_dialog(NEMO_TURNS)["input_ids"]) == (
        "Repeat after me: <|audioplaceholder|>Some text transcription.")


# ---- NeMo checkpoints ----------------------------------------------------------------------------

NEMO_STATE_NAMES = "state_dict (name: shape if float32 else [shape, dtype])"  # a fixture key


def nemo_salm_cfg(**overrides) -> dict:
    """The config NeMo's tiny SALM was built from, its LLM and tokenizer paths made absolute."""
    cfg = nemo_fixture("nemo_salm_tiny_generate.json")["salm_cfg"]
    return {**cfg, "pretrained_llm": str(NEMO_FIXTURES / cfg["pretrained_llm"]),
            "tokenizer_path": str(NEMO_FIXTURES / cfg["tokenizer_path"]), **overrides}


def nemo_tiny_salm(**overrides) -> SALM:
    torch.manual_seed(0)
    return SALM(nemo_salm_cfg(**overrides)).eval()


def write_nemo_export(path: Path, cfg: dict, state: dict) -> Path:
    """A directory as NeMo's SALM.save_pretrained writes it: config.json (the SALM config and
    two keys) and model.safetensors under NeMo's names."""
    path.mkdir(parents=True)
    nemo_keys = {"model_type": "nemo_speechlm",
                 "architectures": ["NeMoSpeechLMForConditionalGeneration"]}
    (path / "config.json").write_text(json.dumps({**cfg, **nemo_keys}))
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    return path


def write_nemo_lightning_checkpoint(path: Path, cfg: dict, state: dict) -> Path:
    """A file laid out as Lightning's trainer.save_checkpoint writes NeMo's SALM."""
    torch.save({"epoch": 1, "global_step": 1, "pytorch-lightning_version": "2.4.0",
                "state_dict": state, "loops": {}, "callbacks": {}, "optimizer_states": [],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"cfg": cfg}},
               path)
    return path


@pytest.mark.parametrize("source", ["export", "lightning"])
def test_nemo_trained_salm_gives_nemo_outputs(source, tmp_path):
    record = nemo_fixture("nemo_salm_tiny_generate.json")
    # NeMo's names, the tied LM head stored once (as embed_tokens), the mel buffers left out
    state = load_file(NEMO_FIXTURES / "nemo_salm_tiny.safetensors")
    if source == "export":
        model = SALM.from_pretrained(write_nemo_export(tmp_path / "nemo", nemo_salm_cfg(), state))
    else:
        state["llm.lm_head.weight"] = state["embed_tokens.weight"]  # Lightning keeps both names
        names = nemo_fixture("nemo_salm_state_dict.json")["plain"][NEMO_STATE_NAMES]
        mel = {"perception.preprocessor.featurizer.window", "perception.preprocessor.featurizer.fb"}
        assert set(state) == set(names) - mel  # the mel buffers come from the config
        checkpoint = write_nemo_lightning_checkpoint(tmp_path / "a.ckpt", nemo_salm_cfg(), state)
        model = SALM.from_pretrained(checkpoint)

    nemo = record["generate"]
    torch.manual_seed(1)
    audio, audio_lens = 0.1 * torch.randn(1, 16000), torch.tensor([16000])
    with torch.no_grad():
        embeds, _ = model.perception(audio, audio_lens)
    assert list(embeds.shape) == nemo["perception_out_shape"]
    assert float(embeds.sum()) == pytest.approx(nemo["perception_out_sum"], rel=1e-5)
    prompt_ids = model.encode_dialog(nemo["prompts"][0])["input_ids"].tolist()
    assert prompt_ids == nemo["prompt_input_ids(llama2)"]
    answer = model.generate(nemo["prompts"], audios=audio, audio_lens=audio_lens, max_new_tokens=6)
    assert answer.tolist() == nemo["output_ids"]
    text_only = nemo["text_only"]
    prompt = model.encode_dialog(text_only["prompts"][0])["input_ids"].tolist()
    new_tokens = model.generate(text_only["prompts"], max_new_tokens=6)[0].tolist()
    key = "output_ids (HF returns prompt+new tokens when input_ids are given)"
    assert [prompt + new_tokens] == text_only[key]  # NeMo returns prompt + new tokens here

    # NeMo's teacher-forced batch, from our data pipeline: the same ids, mask, loss and accuracy
    teacher_forced = record["teacher_forced_batch"]
    torch.manual_seed(2)
    clips = [0.1 * torch.randn(16000), 0.1 * torch.randn(8000)]
    for i, clip in enumerate(clips):  # float WAV: the samples come back exactly
        write_audio(tmp_path / f"a{i}.wav", clip.numpy(), SAMPLE_RATE, "FLOAT")
    cuts = [audio_file_cut(tmp_path / f"a{i}.wav") for i in range(2)]
    first = [Turn("user", "Transcribe this:"), Turn("user", audio=cuts[0]),
             Turn("assistant", "the cat sat")]
    conversations = [Conversation("1", first),
                     Conversation("2", [Turn("user", audio=cuts[1]), Turn("assistant", "a dog")])]
    batch = model.make_dataset({"train_ds": {}})[conversations]
    assert batch["input_ids"].tolist() == teacher_forced["batch_input_ids"]
    assert batch["loss_mask"].long().tolist() == teacher_forced["batch_loss_mask"]
    out = model.validation_step(batch)
    assert out["batch_loss"] == pytest.approx(teacher_forced["loss"], rel=1e-5)
    assert out["batch_acc"] == teacher_forced["acc"]


LORA_CFG = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("lora", [None, LORA_CFG])
def test_nemo_named_weights_load_and_generate_as_ours(lora, llm_dir, tmp_path):
    cfg = make_cfg(llm_dir, **({"lora": lora} if lora else {}))
    torch.manual_seed(0)
    model = SALM(copy.deepcopy(cfg)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
            param.data.normal_(0, 0.3)
    prompts = [[{"role": "user", "content": f"Repeat after me: {TAG}"}]]
    audio, audio_lens = 0.1 * torch.randn(1, 12000), torch.tensor([12000])
    expected = model.generate(prompts, audio, audio_lens, max_new_tokens=8, min_new_tokens=8)
    # NeMo's SALM keeps the embedding at the top level (self.embed_tokens = llm.model.embed_tokens)
    llm = "llm.base_model.model." if lora else "llm."
    state = {("embed_tokens.weight" if k == f"{llm}model.embed_tokens.weight" else k): v
             for k, v in model.state_dict().items()}
    assert f"{llm}lm_head.weight" in state  # untied (llm_dir): its own tensor
    export = write_nemo_export(tmp_path / "nemo", cfg, state)
    checkpoint = write_nemo_lightning_checkpoint(tmp_path / "nemo.ckpt", cfg, state)
    for path in (export, checkpoint):
        loaded = SALM.from_pretrained(path)
        generated = loaded.generate(prompts, audio, audio_lens, max_new_tokens=8, min_new_tokens=8)
        assert torch.equal(generated, expected)
    state.pop(f"{llm}model.norm.weight")
    with pytest.raises(ValueError, match="does not fit the model"):  # still checked strictly
        SALM.from_pretrained(write_nemo_export(tmp_path / "broken", cfg, state))


def test_nemo_config_without_the_asr_sections_is_refused(tmp_path):
    cfg = nemo_salm_cfg(pretrained_asr="nvidia/canary-1b-flash")
    for section in ("preprocessor", "encoder"):  # NeMo fills them in from pretrained_asr
        del cfg["perception"][section]
    checkpoint = write_nemo_lightning_checkpoint(tmp_path / "x.ckpt", cfg, {})
    with pytest.raises(ValueError, match="no perception.preprocessor / encoder .*save_pretrained"):
        SALM.from_pretrained(checkpoint)


# ---- validation as NeMo averages it; data keys the model defines --------------------------------

def test_validation_loss_is_the_mean_of_batch_means_as_in_nemo(llm_dir):
    model = make_model(llm_dir)
    outs = [model.validation_step(make_batch(model, CONVERSATIONS[:1])),
            model.validation_step(make_batch(model, CONVERSATIONS[1:]))]
    totals = {k: sum(o[k] for o in outs) for k in outs[0]}
    summary = SALM.validation_summary(totals)
    assert summary["loss"] == pytest.approx(sum(o["loss_sum"] / o["count"] for o in outs) / 2)
    assert summary["acc"] == pytest.approx(sum(o["correct"] / o["count"] for o in outs) / 2)
    assert outs[0]["count"] != outs[1]["count"]  # so the token-weighted mean is another number
    assert summary["loss"] != pytest.approx(totals["loss_sum"] / totals["count"])


def test_data_keys_the_model_defines_must_agree_with_it(llm_dir):
    model = make_model(llm_dir)
    model.make_dataset({"train_ds": {"token_equivalent_duration": 0.08,
                                     "input_cfg": [{"audio_locator_tag": TAG}]}})
    with pytest.raises(ValueError, match="train_ds: token_equivalent_duration 0.04 is not the mo"):
        model.make_dataset({"train_ds": {"token_equivalent_duration": 0.04}})
    with pytest.raises(ValueError, match="train_ds: prompt_format 'qwen' is not the model's"):
        model.make_dataset({"train_ds": {"prompt_format": "qwen"}})
    nested = {"input_cfg": [{"input_cfg": [{"audio_locator_tag": "<audio>"}]}]}
    with pytest.raises(ValueError, match="validation_ds: audio_locator_tag '<audio>' is not the"):
        model.make_dataset({"train_ds": {}, "validation_ds": nested})
