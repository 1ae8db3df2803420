"""What several test files share: offline settings, the --runslow switch, small model sizes, audio
and dataset helpers, and the tiny LLM directory fixture. Test files import helpers from here, never
from each other."""
import os

# Nothing in the test suite may reach a model hub (set before huggingface_hub reads them at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

import manifests
from data import SALMDataset

ROOT = Path(__file__).resolve().parents[1]
TAG = "<|audioplaceholder|>"
# A SALM perception small enough for many short runs (override lines for configs/salm.yaml) ...
SMALL_PERCEPTION = [
    "model.perception.encoder.n_layers=1", "model.perception.encoder.d_model=32",
    "model.perception.encoder.n_heads=2", "model.perception.encoder.subsampling_conv_channels=16",
    "model.perception.modality_adapter.feat_in=32", "model.perception.modality_adapter.d_model=32",
    "model.perception.modality_adapter.n_heads=2",
]
# ... and a whole run of it with every dropout, dither and augmentation off, so that runs compare.
SMALL = SMALL_PERCEPTION + [
    "data.train_ds.perturb_speed=false",
    "model.perception.encoder.dropout=0", "model.perception.encoder.dropout_pre_encoder=0",
    "model.perception.encoder.dropout_att=0", "model.perception.modality_adapter.dropout=0",
    "model.perception.preprocessor.dither=0",
    "model.perception.encoder.conv_norm_type=layer_norm",
    "model.perception.modality_adapter.conv_norm_type=layer_norm",
    "data.train_ds.batch_size=4", "data.train_ds.num_workers=0", "data.validation_ds.batch_size=8",
    "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
# Text the tiny test tokenizers are trained on: SALM prompts and the duplex tests' words.
WORDS = ("what is two plus three five comes after four the sky blue color hello okay hi ok yes no "
         "one six seven eight nine ten red green").split()
CORPUS = ["Repeat after me: Some text transcription.",
          "hello world, the quick brown fox jumps over the lazy dog",
          "[INST] <<SYS>> Be brief. <</SYS>> [/INST]", " ".join(WORDS)] * 20
# TinyLlama-chat's template layout
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread is faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The first few unreadable items of a process are named in warnings; start with none named."""
    monkeypatch.setattr(manifests, "_warned", set())


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (<unk> 0, <s> 1, </s> 2, <pad> 3, the audio tag
    4) and a chat template."""
    return write_llm_dir(tmp_path_factory.mktemp("llama"), byte_level_tokenizer(),
                         tiny_llama_config(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>")


def write_llm_dir(path, tokenizer: Tokenizer, llm_config, **special_tokens):
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    llm_config.vocab_size = len(fast)
    llm_config.save_pretrained(path)
    return path


def byte_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>", TAG],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)


def tone(path, seconds, rate=16000, freq=440.0):
    """A sine tone written to `path` (any format soundfile knows by the suffix)."""
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def fake_encode(turns):
    """A stand-in prompt formatter: one token per turn + one per word; assistant tokens are
    supervised."""
    ids, mask = [], []
    for turn in turns:
        n = 1 + len(turn["content"].split())
        ids += [len(turn["content"]) % 50 + 3] * n
        mask += [turn["role"] == "assistant"] * n
    return {"input_ids": torch.tensor(ids), "mask": torch.tensor(mask)}


def salm_dataset(**kwargs):
    return SALMDataset(fake_encode, pad_id=0, sample_rate=16000, audio_locator_tag=TAG, **kwargs)
