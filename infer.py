"""Use a trained model: export it, generate with it, score it.

    python infer.py export   --model runs/salm/checkpoints/last.ckpt --out exports/salm [--dtype bfloat16] [--merge-lora]
    python infer.py generate --model exports/salm --inputs assets/demo/asr_val [--user-prompt ...] [--system-prompt ...]
    python infer.py evaluate --model runs/salm/checkpoints/last.ckpt --inputs assets/demo/asr_val more.jsonl

--model: an export directory (save_pretrained) or a train.py checkpoint (a .ckpt file, or the run directory).
--inputs, each one dataset named after its file or directory: lhotse Shar directories, lhotse cut manifests
(.jsonl.gz), NeMo ASR manifests ({"audio_filepath", "duration", "text"} lines), NeMo multimodal conversation
manifests ({"id", "conversations"} lines), YAML files holding an `input_cfg` list, or audio files (together the
dataset "audio"). ASR items are written as {"id", "duration", "text", "pred_text"} lines and are prompted with
their `context` or, without one, with NeMo salm_eval's "Repeat after me, typing in lowercase." (--user-prompt
replaces it; '' for none); conversations are written back with the generated assistant turn in place of the last
one. generate and evaluate run SALM; export takes every model class.

Metrics: WER (jiwer) and BLEU (sacreBLEU corpus BLEU), both after Whisper's EnglishTextNormalizer (the
whisper-normalizer package; its version is printed with every result), per dataset and as the mean over datasets,
keyed as NeMo logs them (`wer_{name}`, `wer`, `txt_bleu_{name}`, `txt_bleu`). ASR-BLEU for speech output:
`asr_bleu(references, audios, sample_rate, scoring_asr)`.
"""
import argparse
import copy
import gzip
import json
import math
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jiwer
import numpy as np
import sacrebleu
import torch
import yaml
from lhotse.cut import Cut
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig
from whisper_normalizer.english import EnglishTextNormalizer

from data import (AudioError, Conversation, Turn, audio_file_cut, cut_to_conversation, load_audio, read_inputs,
                  right_pad)
from train import build_model, load_checkpoint

DEFAULT_ASR_PROMPT = "Repeat after me, typing in lowercase."  # NeMo salm_eval's; configs/salm.yaml trains with it
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".sph")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORMALIZER = f"Whisper EnglishTextNormalizer (whisper-normalizer {version('whisper-normalizer')})"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"  # an export directory, as Hugging Face lays it out
LLM_DIR, CODEC_DIR = "llm", "codec"  # the export's copies of the tokenizer + LLM config, and of the audio codec
_normalizer = EnglishTextNormalizer()


def main(argv: list[str] | None = None) -> dict | None:
    """Run a subcommand; returns evaluate's metrics (for tests and notebooks)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export_cmd = commands.add_parser("export", help="checkpoint -> self-contained export directory")
    export_cmd.add_argument("--model", required=True, help="train.py checkpoint (.ckpt or run dir) or export dir")
    export_cmd.add_argument("--out", required=True, help="the export directory to write")
    export_cmd.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: float32)")
    export_cmd.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the LLM weights")
    for name in ("generate", "evaluate"):
        cmd = commands.add_parser(name, help="SALM answers to every input" + (" + WER or BLEU" if name[0] == "e" else ""))
        cmd.add_argument("--model", required=True, help="export directory or train.py checkpoint (.ckpt or run dir)")
        cmd.add_argument("--inputs", required=True, nargs="+", help="datasets: Shar dirs, manifests, audio files")
        cmd.add_argument("--output-dir", default="generations", help="one <dataset>.jsonl per dataset goes here")
        cmd.add_argument("--system-prompt", help="a system turn put first in every conversation")
        cmd.add_argument("--user-prompt", help=f"user text before the audio (ASR default: '{DEFAULT_ASR_PROMPT}')")
        cmd.add_argument("--batch-size", type=int, default=16, help="items per batch (sorted by duration)")
        cmd.add_argument("--max-new-tokens", type=int, default=128)
        cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        cmd.add_argument("--dtype", choices=DTYPES, help="inference dtype (default: as saved)")
        if name == "evaluate":
            cmd.add_argument("--metric", choices=("auto", "wer", "bleu"), default="auto",
                             help="auto: WER for ASR inputs, BLEU for conversations")
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.dtype)

    if args.command == "export":
        export(args.model, args.out, dtype, args.merge_lora)
        return None
    from salm import SALM  # not at the top: salm.py imports this module

    model = load_model(args.model, args.device, dtype)
    if not isinstance(model, SALM):
        raise ValueError(f"{args.model} is a {type(model).__name__}; generate and evaluate run SALM (duplex models "
                         "answer with duplex_s2s.py)")
    datasets = read_datasets(args.inputs)
    results = generate(model, datasets, args.output_dir, args.system_prompt, args.user_prompt, args.batch_size,
                       args.max_new_tokens)
    if args.command == "evaluate":
        return evaluate(results, args.metric, Path(args.output_dir))
    return None


# ---------------------------------------------------------------------------------------------------------------
# loading and export

class PretrainedMixin:
    """`save_pretrained(dir)` / `from_pretrained(dir)` for the models of this project (NeMo's HFHubMixin, offline).

    An export directory holds everything needed to rebuild the model without the training setup or a network:
      config.json        the resolved model config; pretrained_llm (and pretrained_audio_codec) point at the copies
                         below, pretrained_weights is false (every weight comes from model.safetensors)
      model.safetensors  all weights except the codec's
      llm/               the tokenizer (audio locator tag included) and the LLM's config.json
      codec/             duplex models: the frozen audio codec as a transformers model directory
    The model needs `cfg`, `tokenizer`, `llm` and, for a codec, `audio_codec.model` (a transformers model).
    """

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the export directory; `dtype` casts the weights (modules marked keep_fp32 stay fp32)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.cfg)
        # the ASR checkpoint's config is already in cfg["perception"], and its weights are in model.safetensors
        cfg.update(pretrained_llm=LLM_DIR, pretrained_weights=False, pretrained_asr=None)
        self.tokenizer.save_pretrained(path / LLM_DIR)
        self.llm.config.save_pretrained(path / LLM_DIR)
        codec = getattr(self, "audio_codec", None)
        if codec is not None:
            codec.model.save_pretrained(path / CODEC_DIR)
            cfg["pretrained_audio_codec"] = CODEC_DIR
        keep_fp32 = tuple(f"{n}." for n, m in self.named_modules() if getattr(m, "keep_fp32", False))
        aliases = _tied_aliases(self)
        state = {}
        for name, tensor in self.state_dict().items():
            if name in aliases or (codec is not None and name.startswith("audio_codec.")):
                continue
            if dtype is not None and tensor.is_floating_point() and not name.startswith(keep_fp32):
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous()
        saved_dtype = str(dtype or next(p.dtype for n, p in self.named_parameters() if n.startswith("llm.")))
        save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt", "dtype": saved_dtype.removeprefix("torch.")})
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None):
        """Rebuild from an export directory (no downloads) and load its weights strictly, in eval mode.
        The weights keep the dtype they were saved in unless `dtype` is given."""
        model = cls(pretrained_config(path))
        load_pretrained_weights(model, path, dtype)
        return model.eval()

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM's weights (peft merge_and_unload): a plain LLM, loadable without
        peft, that computes what the adapted one did."""
        if self.cfg.get("lora") is None:
            raise ValueError("this model has no LoRA adapters to merge (its config has no 'lora' section)")
        self.llm = self.llm.merge_and_unload()
        self.cfg = {k: v for k, v in self.cfg.items() if k != "lora"}


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Any of the three models, in eval mode, from an export directory or a train.py checkpoint (strict load;
    nothing is downloaded: pretrained_weights is forced false)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        model = build_model(pretrained_config(path))
        load_pretrained_weights(model, path, dtype)
    else:
        checkpoint = find_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"--model {path}: neither an export directory (config.json + model.safetensors) "
                                    "nor a train.py checkpoint (.ckpt file, or a run directory holding "
                                    "checkpoints/last.ckpt)")
        state = read_checkpoint(checkpoint)
        model = build_model({**state["config"]["model"], "pretrained_weights": False})
        model.load_state_dict(state["model"])
        if dtype is not None:
            cast_model(model, dtype)
    return model.to(device).eval()


def find_checkpoint(path: str | Path) -> Path | None:
    """A train.py checkpoint: the file itself, or a run directory's checkpoints/last.ckpt (or last.ckpt)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    return None


def read_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint's contents: "model" (the state dict), "config" (the full config), ..."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no 'model' and 'config' entries)")
    return state


def export(model_path: str | Path, out: str | Path, dtype: torch.dtype | None = None, merge_lora: bool = False):
    """Checkpoint (or export) -> a self-contained export directory, optionally cast and with LoRA merged."""
    model = load_model(model_path)
    if merge_lora:
        model.merge_lora()
    model.save_pretrained(out, dtype)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"exported {type(model).__name__} to {out} ({size / 2**20:.1f} MiB"
          f"{', ' + str(dtype).removeprefix('torch.') if dtype else ''}{', LoRA merged' if merge_lora else ''})")
    return model


def pretrained_config(path: str | Path) -> dict:
    """The model config of an export directory, its relative asset paths resolved, pretrained_weights false."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported model: it has no {name} (write one with "
                                    "model.save_pretrained(dir) or `python infer.py export`)")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    for key in ("pretrained_llm", "pretrained_audio_codec"):
        if cfg.get(key) and (path / cfg[key]).exists():
            cfg[key] = str(path / cfg[key])
    cfg["pretrained_weights"] = False
    return cfg


def load_pretrained_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Load an export's model.safetensors into `model`, strictly: every tensor must fit, and only tied aliases
    and the codec (loaded from codec/) may be absent. Then cast to `dtype` (default: the saved dtype)."""
    file = Path(path) / WEIGHTS_NAME
    with safe_open(file, framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        saved_dtype = (f.metadata() or {}).get("dtype", "float32")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit the model its config.json builds: {str(e).splitlines()[-1]}") from None
    aliases = _tied_aliases(model)
    missing = [k for k in result.missing_keys if k not in aliases and not k.startswith("audio_codec.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{file} does not fit the model its config.json builds: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if saved_dtype not in DTYPES:
        raise ValueError(f"{file} says its weights are {saved_dtype!r}; expected one of {', '.join(DTYPES)}")
    cast_model(model, dtype or DTYPES[saved_dtype])


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except modules marked keep_fp32 (the mel frontend, the codec), which keep fp32 numerics."""
    model.to(dtype)
    for module in model.modules():
        if getattr(module, "keep_fp32", False):
            module.float()
    return model


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is the same as an earlier name's (tied embeddings): saved once."""
    seen, aliases = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


# ---------------------------------------------------------------------------------------------------------------
# inputs

def read_datasets(inputs: list[str]) -> dict[str, list]:
    """Each input -> (name, its items: lhotse cuts for ASR data, Conversations for conversation data)."""
    datasets = {}
    for spec in inputs:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--inputs {spec}: no such file or directory")
        if path.suffix.lower() in AUDIO_SUFFIXES:
            try:
                datasets.setdefault("audio", []).append(audio_file_cut(path))
            except AudioError as e:
                raise ValueError(f"--inputs {spec}: {e}") from None
            continue
        name = path.name.split(".")[0] or path.name
        name = name if name not in datasets else f"{name}_{len(datasets)}"
        datasets[name] = list(read_inputs({"input_cfg": _input_cfg(path)}, train=False))
        if not datasets[name]:
            raise ValueError(f"--inputs {spec}: holds no items")
    return datasets


def _input_cfg(path: Path) -> list[dict]:
    if path.is_dir():
        return [{"type": "lhotse_shar", "shar_path": str(path)}]
    if path.suffix in (".yaml", ".yml"):
        spec = yaml.safe_load(path.read_text())
        entries = spec.get("input_cfg") if isinstance(spec, dict) else spec
        if not isinstance(entries, list):
            raise ValueError(f"--inputs {path}: a YAML input is a list of input_cfg entries (or has an input_cfg key)")
        return entries
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise ValueError(f"--inputs {path}: not JSON lines, a Shar directory, a YAML input_cfg or audio") from None
    if "conversations" in row:
        return [{"type": "multimodal_conversation", "manifest_filepath": str(path)}]
    if "audio_filepath" in row:
        return [{"type": "nemo", "manifest_filepath": str(path)}]
    return [{"type": "lhotse", "cuts_path": str(path)}]


def prompt_and_reference(item, system_prompt: str | None, user_prompt: str | None) -> tuple[Conversation, str | None]:
    """The conversation to answer (the last assistant turn removed, prompts added) and that turn's text."""
    conversation = item if isinstance(item, Conversation) else cut_to_conversation(item)
    turns, reference = list(conversation.turns), None
    if turns and turns[-1].role == "assistant":
        reference = turns.pop().text
    if user_prompt is None and isinstance(item, Cut) and not (item.custom or {}).get("context"):
        user_prompt = DEFAULT_ASR_PROMPT
    if user_prompt:
        turns.insert(next((i for i, t in enumerate(turns) if t.role != "system"), len(turns)), Turn("user", user_prompt))
    if system_prompt:
        turns = [Turn("system", system_prompt)] + [t for t in turns if t.role != "system"]
    return Conversation(conversation.id, turns, conversation.custom), reference


# ---------------------------------------------------------------------------------------------------------------
# generation

def generate(model, datasets: dict[str, list], output_dir: str | Path, system_prompt: str | None = None,
             user_prompt: str | None = None, batch_size: int = 16, max_new_tokens: int = 128) -> dict[str, list]:
    """Answer every item, longest first in batches; write `output_dir/<dataset>.jsonl` and print tokens/s and
    RTFx (seconds of audio per second of generation). Returns per dataset a list of (record, reference, hypothesis)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, items in datasets.items():
        items = sorted(items, key=lambda item: item.duration, reverse=True)
        rows, audio_seconds, num_tokens, seconds, skipped = [], 0.0, 0, 0.0, 0
        progress = tqdm(total=len(items), desc=name, unit="item", dynamic_ncols=True, file=sys.stderr)
        for start in range(0, len(items), batch_size):
            batch, conversations, references, audios = [], [], [], []
            for item in items[start : start + batch_size]:
                conversation, reference = prompt_and_reference(item, system_prompt, user_prompt)
                try:
                    clips = [load_audio(cut, model.sampling_rate) for cut in conversation.audio_cuts]
                except AudioError as e:
                    print(f"warning: skipped {e}", file=sys.stderr)
                    skipped += 1
                    continue
                batch.append(item)
                conversations.append(conversation)
                references.append(reference)
                audios += clips
            if batch:
                tic = time.perf_counter()
                prompts = [c.prompt_turns(model.audio_locator_tag) for c in conversations]
                hypotheses, tokens = answer(model, prompts, audios, max_new_tokens)
                seconds += time.perf_counter() - tic
                num_tokens += tokens
                audio_seconds += sum(len(a) for a in audios) / model.sampling_rate
                rows += [(_record(i, c, r, h), r, h) for i, c, r, h in zip(batch, conversations, references, hypotheses)]
            progress.update(len(items[start : start + batch_size]))
        progress.close()
        path = output_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record, _, _ in rows))
        print(f"{name}: {len(rows)} items ({skipped} skipped), {audio_seconds:.1f} s of audio, {num_tokens} tokens in "
              f"{seconds:.2f} s: {num_tokens / max(seconds, 1e-9):.1f} tokens/s, "
              f"RTFx {audio_seconds / max(seconds, 1e-9):.1f} -> {path}")
        results[name] = rows
    return results


@torch.no_grad()
def answer(model, prompts: list[list[dict]], audios: list[np.ndarray], max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy answers of a SALM to prompts whose audio tags take `audios` in order; also the number of tokens
    generated (each answer up to and including its EOS)."""
    padded, audio_lens = right_pad([torch.from_numpy(a) for a in audios], 0.0) if audios else (None, None)
    config = GenerationConfig(max_new_tokens=max_new_tokens, bos_token_id=model.text_bos_id,
                              eos_token_id=model.text_eos_id, pad_token_id=model.text_pad_id, do_sample=False)
    ids = model.generate(prompts, audios=padded, audio_lens=audio_lens, generation_config=config).cpu()  # (B, T_new)
    is_eos = ids == model.text_eos_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])
    texts = [model.tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(ids, lengths)]
    return texts, int(lengths.sum())


def _record(item, conversation: Conversation, reference: str | None, hypothesis: str) -> dict:
    """ASR items: NeMo salm_eval's line; conversations: NeMo's multimodal conversation with the answer appended."""
    if isinstance(item, Cut):
        return {"id": item.id, "duration": round(item.duration, 3), "text": reference or "", "pred_text": hypothesis}
    turns = []
    for turn in conversation.turns + [Turn("assistant", hypothesis)]:
        if turn.audio is None:
            turns.append({"from": turn.role.capitalize(), "type": "text", "value": turn.text})
            continue
        source = turn.audio.recording.sources[0]
        turns.append({"from": turn.role.capitalize(), "type": "audio", "duration": round(turn.audio.duration, 3),
                      "offset": turn.audio.start, "value": source.source if source.type == "file" else turn.audio.id})
    return {"id": conversation.id, "conversations": turns, **({"custom": conversation.custom} if conversation.custom else {})}


# ---------------------------------------------------------------------------------------------------------------
# metrics

def normalize_text(text: str) -> str:
    """The one text normalizer of this project, applied before every WER and BLEU: Whisper's English one
    (lower case, no punctuation, spelled numbers as digits, British spellings as American, fillers removed)."""
    return _normalizer(text)


def word_errors(references: list[str], hypotheses: list[str]) -> dict[str, int]:
    """Corpus counts after `normalize_text`: substitutions, deletions, insertions and reference words."""
    references, hypotheses = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
    counts = {"substitutions": 0, "deletions": 0, "insertions": 0, "ref_words": sum(len(r.split()) for r in references)}
    if references:
        out = jiwer.process_words(references, hypotheses)
        counts.update(substitutions=out.substitutions, deletions=out.deletions, insertions=out.insertions)
    return counts


def wer_details(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER and its insertion, deletion and substitution rates (each per reference word)."""
    counts = word_errors(references, hypotheses)
    n = max(counts["ref_words"], 1)
    rates = {"ins": counts["insertions"] / n, "del": counts["deletions"] / n, "sub": counts["substitutions"] / n}
    return {"wer": sum(rates.values()), **rates, "ref_words": counts["ref_words"]}


def wer(references: list[str], hypotheses: list[str]) -> float:
    return wer_details(references, hypotheses)["wer"]


def bleu(references: list[str], hypotheses: list[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) of one hypothesis per reference, after `normalize_text`."""
    references, hypotheses = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def metrics_by_dataset(key: str, pairs: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """(reference, hypothesis) pairs per dataset -> NeMo's keys: `{key}_{name}` per dataset and `{key}` = their
    mean. key: "wer", or a BLEU such as "txt_bleu" / "asr_bleu"."""
    score = wer if key == "wer" else bleu if key.endswith("bleu") else None
    if score is None:
        raise ValueError(f"unknown metric '{key}': use wer or a *bleu key")
    out = {f"{key}_{name}": score([r for r, _ in p], [h for _, h in p]) for name, p in pairs.items()}
    out[key] = sum(out.values()) / max(len(out), 1)
    return out


def evaluate(results: dict[str, list], metric: str = "auto", output_dir: Path | None = None) -> dict[str, float]:
    """Print and return WER (ASR data) or BLEU (conversations) per dataset and their mean; metrics.json too."""
    metrics, by_key = {}, {}
    print(f"text normalizer: {NORMALIZER}")
    for name, rows in results.items():
        pairs = [(ref, hyp) for _, ref, hyp in rows if ref is not None]
        if not pairs or not any(ref.strip() for ref, _ in pairs):
            raise ValueError(f"dataset {name} has no reference texts to score against")
        is_asr = "pred_text" in rows[0][0]
        key = "wer" if metric == "wer" or (metric == "auto" and is_asr) else "txt_bleu"
        by_key.setdefault(key, {})[name] = pairs
        if key == "wer":
            d = wer_details([r for r, _ in pairs], [h for _, h in pairs])
            print(f"{name}: WER {100 * d['wer']:.2f}% (ins {100 * d['ins']:.2f}%, del {100 * d['del']:.2f}%, "
                  f"sub {100 * d['sub']:.2f}%) over {len(pairs)} items, {d['ref_words']} words")
        else:
            print(f"{name}: BLEU {bleu([r for r, _ in pairs], [h for _, h in pairs]):.2f} over {len(pairs)} items")
    for key, pairs in by_key.items():
        metrics.update(metrics_by_dataset(key, pairs))
        value = f"{100 * metrics[key]:.2f}%" if key == "wer" else f"{metrics[key]:.2f}"
        print(f"{key} (mean over {len(pairs)} dataset{'s' * (len(pairs) > 1)}): {value}")
    if output_dir is not None:
        (output_dir / "metrics.json").write_text(json.dumps({**metrics, "normalizer": NORMALIZER}, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# ASR-BLEU: how well generated speech says the reference text

class Transcriber:
    """Speech -> text with a scoring ASR, in fp32: a SALM of this project (export directory, .ckpt file or run
    directory; prompted with `prompt`) or a transformers speech-recognition model (directory or hub name)."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu", prompt: str = DEFAULT_ASR_PROMPT,
                 batch_size: int = 16):
        self.salm = self.pipeline = None
        self.prompt, self.batch_size = prompt, batch_size
        path = Path(name_or_path)
        if _is_project_model(path):
            self.salm = load_model(path, device, torch.float32)
            self.sample_rate = self.salm.sampling_rate
            return
        from transformers import pipeline

        try:
            self.pipeline = pipeline("automatic-speech-recognition", model=str(name_or_path), device=device,
                                     dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ValueError(f"scoring_asr '{name_or_path}' is neither a SALM of this project (export directory or "
                             f"checkpoint) nor a transformers speech-recognition model: {str(e).splitlines()[0]}") from None
        self.sample_rate = self.pipeline.feature_extractor.sampling_rate

    def transcribe(self, audios: list[torch.Tensor | np.ndarray], sample_rate: int) -> list[str]:
        """Mono clips (1-D, each its own length) at `sample_rate` -> one transcript per clip."""
        clips = [resample(torch.as_tensor(a).float().cpu().numpy(), sample_rate, self.sample_rate) for a in audios]
        if self.pipeline is not None:
            inputs = [{"raw": c, "sampling_rate": self.sample_rate} for c in clips]
            return [out["text"].strip() for out in self.pipeline(inputs, batch_size=self.batch_size)]
        texts = []
        content = f"{self.prompt} {self.salm.audio_locator_tag}".strip()
        for i in range(0, len(clips), self.batch_size):
            batch = clips[i : i + self.batch_size]
            texts += answer(self.salm, [[{"role": "user", "content": content}]] * len(batch), batch, 128)[0]
        return texts


def asr_bleu(references: list[str], audios: list[torch.Tensor | np.ndarray], sample_rate: int,
             scoring_asr: "str | Path | Transcriber", device: str | torch.device = "cpu") -> tuple[float, list[str]]:
    """Corpus BLEU of the scoring ASR's transcripts of `audios` (generated speech, 1-D clips at `sample_rate`)
    against `references`; also the transcripts. `scoring_asr`: a Transcriber, or what Transcriber accepts."""
    if len(references) != len(audios):
        raise ValueError(f"asr_bleu: {len(references)} references but {len(audios)} audios")
    transcriber = scoring_asr if isinstance(scoring_asr, Transcriber) else Transcriber(scoring_asr, device)
    transcripts = transcriber.transcribe(audios, sample_rate)
    return bleu(references, transcripts), transcripts


def _is_project_model(path: Path) -> bool:
    """An export directory or train.py checkpoint of this project (a transformers model has no pretrained_llm)."""
    if (path / CONFIG_NAME).is_file():
        return "pretrained_llm" in json.loads((path / CONFIG_NAME).read_text())
    return find_checkpoint(path) is not None


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """1-D samples at `rate` -> float32 at `new_rate` (polyphase filtering, as for generated speech of any rate)."""
    from scipy.signal import resample_poly  # half a second to import, and only ASR-BLEU needs it

    if rate == new_rate:
        return samples.astype(np.float32)
    g = math.gcd(rate, new_rate)
    return resample_poly(samples, new_rate // g, rate // g).astype(np.float32)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad paths, inputs and models: one line, not a traceback
        if os.environ.get("SLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
