"""Checkpoints and exports: read them safely, write them atomically, move models in and out of them.

    load_checkpoint(path)            a torch.save file, loaded with weights_only=True
    atomic_save(state, path)         temporary file, fsync, rename: never half a checkpoint
    run_dir(exp), find_resume_checkpoint(exp, dir)  train.py's run directory, the checkpoint resumed
    save_checkpoints(...)            a run's last.ckpt and its save_top_k best step=N.ckpt
    load_model(path, choose_class)   a model from an export directory or a train.py checkpoint
    PretrainedMixin                  save_pretrained / from_pretrained for the project's models
    load_nemo_checkpoint(path)       a NeMo `.nemo` archive: (config, state dict)
    load_nemo_duplex_weights(model, ckpt)  NeMo duplex weights, renamed by NEMO_DUPLEX_NAMES

NeMo-trained SALMs load too (`load_model`, `SALM.from_pretrained`, `infer.py --model`): a Lightning
`.ckpt` (config under `hyper_parameters.cfg`) or NeMo's HF-style export (as for canary-qwen-2.5b).

An export directory (`save_pretrained`), laid out as Hugging Face lays out a model:
    config.json        the resolved model config: asset paths point below, pretrained_weights false
    model.safetensors  all weights except the codec's
    llm/               the tokenizer (audio locator tag included) and the LLM's config.json
    codec/             duplex models: the frozen audio codec as a transformers model directory
"""
import copy
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path

import huggingface_hub
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
LLM_DIR, CODEC_DIR = "llm", "codec"
# NeMo's SALM moves the LLM's input embedding to the top (`embed_tokens.weight`); ours stays in the
# LLM, under LLM_EMBEDDINGS[0] (LoRA: [1]). Other names are the same. Tied embeddings: NeMo lists
# the shared tensor once, as the LLM's `lm_head.weight`; its exports store it as embed_tokens.
NEMO_EMBEDDING = "embed_tokens."
LLM_EMBEDDINGS = ("llm.model.embed_tokens.", "llm.base_model.model.model.embed_tokens.")
NEMO_EXPORT_KEYS = ("model_type", "architectures", "dtype", "torch_dtype")  # added by NeMo's export
NEMO_INIT_KEYS = ("pretrained_perception_from_s2s", "pretrained_s2s_model", "init_from_checkpoint")
PREPROCESSOR_BUFFERS = "perception.preprocessor.featurizer."  # window, filterbank: from the config


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as plain tensors and containers: pickled code in it is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not loaded: it is not a torch.save file of tensors and plain "
                         "containers (pickled objects are refused, weights_only=True)") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{str(e).splitlines()[0]}") from None


def atomic_save(state: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_checkpoint(path: str | Path) -> Path | None:
    """A train.py checkpoint: the file, or a run directory's checkpoints/last.ckpt or last.ckpt."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    return None


def read_checkpoint(path: str | Path, state: dict | None = None) -> dict:
    """A train.py checkpoint's contents: "model" (state dict), "config" (full config), ..."""
    state = load_checkpoint(path) if state is None else state
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a checkpoint written by train.py "
                         "(no 'model' and 'config')")
    return state


def run_dir(exp: dict) -> Path:
    """The run directory `exp_manager` names: explicit_log_dir, else exp_dir/name/version."""
    if exp.get("explicit_log_dir"):
        return Path(exp["explicit_log_dir"])
    base = Path(exp.get("exp_dir") or "nemo_experiments") / (exp.get("name") or "default")
    if exp.get("version"):
        return base / str(exp["version"])
    existing = sorted(p for p in base.glob("*") if (p / "checkpoints" / "last.ckpt").exists())
    if exp.get("resume_if_exists") and existing:
        return existing[-1]
    if exp["use_datetime_version"]:
        stamp = os.environ.get("SLM_RUN_VERSION") or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        os.environ["SLM_RUN_VERSION"] = stamp
        return base / stamp
    return base / f"version_{len(list(base.glob('version_*')))}"


def find_resume_checkpoint(exp: dict, log_dir: Path) -> Path | None:
    """The checkpoint to resume, None for a new run (never over another run's checkpoints)."""
    if exp.get("resume_from_checkpoint"):
        path = Path(exp["resume_from_checkpoint"])
        if not path.is_file():
            raise ConfigError(f"exp_manager.resume_from_checkpoint {path} does not exist")
        return path
    last = log_dir / "checkpoints" / "last.ckpt"
    if exp.get("resume_if_exists"):
        if last.is_file():
            return last
        if not exp.get("resume_ignore_no_checkpoint"):
            raise ConfigError(f"resume_if_exists is set but {last} does not exist; set "
                              "exp_manager.resume_ignore_no_checkpoint=true to start a new run")
    elif last.is_file():
        raise ConfigError(f"{log_dir} already holds checkpoints: set exp_manager.resume_if_exists="
                          "true to continue that run, or choose another "
                          "exp_manager.explicit_log_dir")
    return None


def save_checkpoints(log_dir, step, model, optimizer, scheduler, scaler, cfg, best, params,
                     results, ranks, master):
    """`last.ckpt` always; `step=N.ckpt` kept while it is among the `save_top_k` best by `monitor`.
    Only rank 0 writes; every rank returns the same updated ranking."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "config": cfg, "best": best, "ranks": ranks}
    ckpt_dir = log_dir / "checkpoints"
    if results is not None and params["save_top_k"] != 0:
        monitor = params["monitor"]
        check_monitor_logged(params, results)
        sign = -1 if params["mode"] == "max" else 1
        best = sorted(best + [(sign * results[monitor], step)])
        keep = best if params["save_top_k"] < 0 else best[: params["save_top_k"]]
        dropped, best = best[len(keep):], keep
        state["best"] = best
        if master and any(s == step for _, s in best):
            atomic_save(state, ckpt_dir / f"step={step}.ckpt")
        for _, old_step in dropped if master else []:
            (ckpt_dir / f"step={old_step}.ckpt").unlink(missing_ok=True)
    if master:
        atomic_save(state, ckpt_dir / "last.ckpt")
    return best


def check_monitor_logged(params: dict, results: dict) -> None:
    """`checkpoint_callback_params.monitor` names a validation metric (checked at the sanity
    validation, before the run directory is written, and at every validation)."""
    if params["save_top_k"] != 0 and params["monitor"] not in results:
        raise ConfigError(f"exp_manager.checkpoint_callback_params.monitor '{params['monitor']}' "
                          f"is not a validation metric; pick one of {', '.join(sorted(results))}")


def read_model(path: str | Path) -> tuple[dict, dict, str | None]:
    """(model config with pretrained_weights false, state dict, saved dtype or None) of an export
    directory or a train.py checkpoint (.ckpt file, or a run directory)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        cfg = pretrained_config(path)
        with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            saved_dtype = (f.metadata() or {}).get("dtype", "float32")
        if saved_dtype not in DTYPES:
            raise ValueError(f"{path / WEIGHTS_NAME} says its weights are {saved_dtype!r}; "
                             f"expected one of {', '.join(DTYPES)}")
        if any(name.startswith(NEMO_EMBEDDING) for name in state):  # a NeMo export
            cfg, state = nemo_model_config(cfg, path), from_nemo_names(state, cfg.get("lora"))
        return cfg, state, saved_dtype
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{path}: neither an export directory (config.json + model.safetensors) nor a "
            "train.py or NeMo Lightning checkpoint (.ckpt file, or a run directory holding "
            "checkpoints/last.ckpt); convert a NeMo distributed checkpoint directory with NeMo's "
            "to_hf.py first")
    state = load_checkpoint(checkpoint)
    nemo = isinstance(state, dict) and isinstance(state.get("hyper_parameters"), dict)
    if nemo and "state_dict" in state:
        cfg = state["hyper_parameters"].get("cfg") or {}  # a NeMo Lightning checkpoint
        cfg = nemo_model_config({**cfg, "pretrained_weights": False}, checkpoint)
        return cfg, from_nemo_names(state["state_dict"], cfg.get("lora")), None
    state = read_checkpoint(checkpoint, state)
    return {**state["config"]["model"], "pretrained_weights": False}, state["model"], None


def load_model(path: str | Path, choose_class, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model of an export or checkpoint (`choose_class(cfg)` gives its class; nothing is
    downloaded) and load every weight, in eval mode; `dtype` casts it (default: as saved)."""
    cfg, state, saved_dtype = read_model(path)
    model = choose_class(cfg)(cfg)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model its config builds: "
                         f"{str(e).splitlines()[-1]}") from None
    aliases = tied_aliases(model)
    missing = [k for k in result.missing_keys
               if k not in aliases and not k.startswith(("audio_codec.", PREPROCESSOR_BUFFERS))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the model its config builds: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    dtype = dtype or DTYPES.get(saved_dtype)
    return (cast_model(model, dtype) if dtype else model).eval()


class PretrainedMixin:
    """`save_pretrained(dir)` / `from_pretrained(dir or checkpoint)` (NeMo's HFHubMixin, offline).
    It needs `cfg`, `tokenizer`, `llm` and, for a codec, `audio_codec.model` (transformers)."""

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the export directory; `dtype` casts the weights (keep_fp32 modules stay fp32)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.cfg)
        # the ASR model's config is already in cfg["perception"], its weights in model.safetensors
        cfg.update(pretrained_llm=LLM_DIR, tokenizer_path=None, pretrained_weights=False,
                   pretrained_asr=None)
        self.tokenizer.save_pretrained(path / LLM_DIR)
        self.llm.config.save_pretrained(path / LLM_DIR)
        codec = getattr(self, "audio_codec", None)
        if codec is not None:
            codec.model.save_pretrained(path / CODEC_DIR)
            cfg["pretrained_audio_codec"] = CODEC_DIR
        keep_fp32 = tuple(f"{n}." for n, m in self.named_modules()
                          if getattr(m, "keep_fp32", False))
        aliases = tied_aliases(self)
        state = {}
        for name, tensor in self.state_dict().items():
            if name in aliases or (codec is not None and name.startswith("audio_codec.")):
                continue
            if dtype is not None and tensor.is_floating_point() and not name.startswith(keep_fp32):
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous()
        saved = str(dtype or next(p.dtype for n, p in self.named_parameters()
                                  if n.startswith("llm.")))
        save_file(state, path / WEIGHTS_NAME,
                  metadata={"format": "pt", "dtype": saved.removeprefix("torch.")})
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None):
        """`load_model` of this class: strict, eval mode, saved dtype unless `dtype` is given."""
        return load_model(path, lambda cfg: cls, dtype)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM (peft merge_and_unload): a plain LLM."""
        if self.cfg.get("lora") is None:
            raise ValueError("this model has no LoRA adapters to merge "
                             "(its config has no 'lora' section)")
        if hasattr(self.llm, "merge_and_unload"):
            self.llm = self.llm.merge_and_unload()
        else:  # the duplex models wrap only the LLM's decoder stack
            prefix = self.llm.base_model_prefix
            setattr(self.llm, prefix, getattr(self.llm, prefix).merge_and_unload())
        self.cfg = {k: v for k, v in self.cfg.items() if k != "lora"}


def pretrained_config(path: str | Path) -> dict:
    """An export directory's model config, relative asset paths resolved, pretrained_weights off."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not an exported model: it has no {name} (write one with "
                "model.save_pretrained(dir) or `python infer.py export`)")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    for key in ("pretrained_llm", "pretrained_audio_codec"):
        if cfg.get(key) and (path / cfg[key]).exists():
            cfg[key] = str(path / cfg[key])
    if (path / "tokenizer_config.json").is_file():  # NeMo's export: a tokenizer beside config.json
        cfg["tokenizer_path"] = str(path)
    if (path / "llm_backbone" / CONFIG_NAME).is_file():  # ... and the LLM's config
        cfg["pretrained_llm"] = str(path / "llm_backbone")
    cfg["pretrained_weights"] = False
    return cfg


def from_nemo_names(state: dict, lora: dict | None = None) -> dict:
    """A NeMo SALM state dict under our names (`lora`: the config's lora section; None: no LoRA)."""
    ours = LLM_EMBEDDINGS[lora is not None]
    return {ours + k.removeprefix(NEMO_EMBEDDING) if k.startswith(NEMO_EMBEDDING) else k: v
            for k, v in state.items()}


def to_nemo_name(name: str) -> str:
    """Our parameter name -> NeMo's."""
    for ours in LLM_EMBEDDINGS:
        if name.startswith(ours):
            return NEMO_EMBEDDING + name.removeprefix(ours)
    return name


def nemo_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) as NeMo's SALM lists them: a tied embedding once, as the LLM's lm_head."""
    named = [(to_nemo_name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]
    named.sort(key=lambda item: item[0].startswith(NEMO_EMBEDDING))  # stable: the LLM's names first
    seen = set()
    return [(n, p) for n, p in named if id(p) not in seen and not seen.add(id(p))]


def nemo_model_config(cfg: dict, path) -> dict:
    """A NeMo SALM config as ours: export bookkeeping and init sources dropped (the weights come
    from the file), options that change the computation and are not implemented here refused."""
    cfg = {k: v for k, v in cfg.items() if k not in NEMO_EXPORT_KEYS + NEMO_INIT_KEYS}
    for key in ("encoder_chunk_size_seconds", "trust_remote_code", "use_nemo_automodel"):
        if cfg.get(key):
            raise ValueError(f"{path}: the NeMo option {key}={cfg[key]!r} is not supported here")
    perception = cfg.get("perception") or {}
    if not (perception.get("preprocessor") and perception.get("encoder")):
        raise ValueError(f"{path}: its config has no perception.preprocessor / encoder (NeMo fills "
                         "them in from pretrained_asr when it builds the model): load it in NeMo "
                         "and save_pretrained it, or copy both sections from the ASR model's "
                         "model_config.yaml into its config")
    return cfg


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except modules marked keep_fp32 (mel frontend, codec): they stay fp32."""
    model.to(dtype)
    for module in model.modules():
        if getattr(module, "keep_fp32", False):
            module.float()
    return model


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is an earlier name's (tied embeddings): saved once."""
    seen, aliases = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


def resolve_pretrained_asr(name_or_path: str) -> str:
    """A `.nemo` path as is, or a model name -> the `.nemo` file of the HF repo `nvidia/<name>`."""
    if name_or_path.endswith(".nemo") or os.path.exists(name_or_path):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"pretrained_asr: no such .nemo file: {name_or_path}")
        return name_or_path
    repo_id = name_or_path if "/" in name_or_path else f"nvidia/{name_or_path}"
    filename = repo_id.split("/")[-1] + ".nemo"
    try:  # downloads when online, reads the local cache when offline
        return huggingface_hub.hf_hub_download(repo_id, filename)
    except Exception as error:  # offline, uncached, no such repo or file, no network, gated repo
        raise FileNotFoundError(
            f"pretrained_asr={name_or_path!r}: found no {filename} in the Hugging Face repo "
            f"{repo_id}, online or in the cache {huggingface_hub.constants.HF_HUB_CACHE} "
            f"({type(error).__name__}); pass a local .nemo path or set pretrained_weights: "
            "false") from None


def load_nemo_checkpoint(path: str) -> tuple[dict, dict]:
    """A `.nemo` file (tar of model_config.yaml and model_weights.ckpt) -> (config, state dict)."""
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.ReadError:
        raise ValueError(f"{path} is not a .nemo file (not a tar archive)") from None
    with archive, tempfile.TemporaryDirectory() as tmp:
        members = {os.path.normpath(m.name): m for m in archive.getmembers() if m.isfile()}
        absent = [name for name in ("model_config.yaml", "model_weights.ckpt")
                  if name not in members]
        if absent:
            raise ValueError(f"{path} is not a .nemo checkpoint: it has no {' or '.join(absent)}")
        config = yaml.safe_load(archive.extractfile(members["model_config.yaml"]))
        weights_path = os.path.join(tmp, "model_weights.ckpt")  # torch.load wants a seekable file
        with open(weights_path, "wb") as f:
            shutil.copyfileobj(archive.extractfile(members["model_weights.ckpt"]), f)
        try:
            state_dict = load_checkpoint(weights_path)
        except ValueError as e:  # name the .nemo file, not the temporary copy of its weights
            raise ValueError(str(e).replace(weights_path,
                                            f"{path} (its model_weights.ckpt)")) from None
    return config, state_dict


# NeMo's duplex parameter names -> ours. NeMo keeps only the LLM's decoder stack as `llm`, moves its
# embedding and output head to the top and calls the speech decoder `speech_generation`. The first
# rule whose pattern matches renames the tensor; None drops it.
NEMO_DUPLEX_NAMES = (
    (r"^_control_codes$", None),  # speech BOS / EOS / delay ids: derived from the codec here
    (r"^audio_codec\.", None),  # a NeMo codec (.nemo); ours is the pretrained_audio_codec
    (r"\.causal_mask$", None),  # constant tril(ones) buffers (100 MB a layer at 5000 frames)
    (r"^speech_generation\.", "speech_decoder."),
    (r"^embed_tokens\.", "llm.model.embed_tokens."),
    (r"^lm_head\.", "llm.lm_head."),
    (r"^llm\.", "llm.model."),  # LoRA: llm.base_model.model.* -> llm.model.base_model.model.*
)
NEMO_UNUSED = ("embed_audio_tokens.", "audio_head.")  # NeMo's speech-decoder model never uses them
PARAKEET_TO_NEMO = [  # transformers' ParakeetEncoder parameter names -> NeMo's, as substrings
    ("subsampling.layers.", "pre_encode.conv."), ("subsampling.linear.", "pre_encode.out."),
    (".q_proj.", ".linear_q."), (".k_proj.", ".linear_k."), (".v_proj.", ".linear_v."),
    (".o_proj.", ".linear_out."), (".relative_k_proj.", ".linear_pos."), (".bias_u", ".pos_bias_u"),
    (".bias_v", ".pos_bias_v"), (".conv.norm.", ".conv.batch_norm."),
]


def nemo_state_from_parakeet(state: dict) -> dict:
    """A transformers ParakeetEncoder state dict (NeMo's FastConformer under other names) under
    NeMo's names, which are perception.ConformerEncoder's:
    `ConformerEncoder.load_state_dict(nemo_state_from_parakeet(parakeet.state_dict()))`."""
    renamed = {}
    for name, tensor in state.items():
        for hf_name, nemo_name in PARAKEET_TO_NEMO:
            name = name.replace(hf_name, nemo_name)
        renamed[name] = tensor
    return renamed


def load_nemo_duplex_weights(model: nn.Module, source: str | Path | dict) -> None:
    """A NeMo duplex model's weights (a .ckpt or its state dict) into `model`, renamed by
    NEMO_DUPLEX_NAMES: all but the codec's, same shapes (the audio heads need NeMo's codebooks)."""
    state = source if isinstance(source, dict) else load_checkpoint(source)
    state = state.get("state_dict", state)
    own, renamed = model.state_dict(), {}
    for name, tensor in state.items():
        new = next((re.sub(p, r, name) if r else None for p, r in NEMO_DUPLEX_NAMES
                    if re.search(p, name)), name)
        if new is None or (new not in own and name.startswith(NEMO_UNUSED)):
            continue
        lora = new.replace("llm.model.", "llm.model.base_model.model.", 1)  # embed_tokens, LoRA
        renamed[lora if new not in own and lora in own else new] = tensor
    shapes = [f"{k} {tuple(renamed[k].shape)} here {tuple(v.shape)}" for k, v in own.items()
              if k in renamed and renamed[k].shape != v.shape]
    missing = [k for k in own if k not in renamed and not k.startswith("audio_codec.")]
    unexpected = [k for k in renamed if k not in own]
    if shapes or missing or unexpected:
        raise ValueError(f"the NeMo weights do not fit this model: shapes differ {shapes[:3]}, "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(renamed, strict=False)
