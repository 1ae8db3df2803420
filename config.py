"""YAML configs in NeMo's layout (`model`, `trainer`, `exp_manager`, `data`), read with pyyaml.

`load_config(path, overrides)` does, in order:
  1. read the YAML file;
  2. apply command-line overrides: `a.b=value` sets a key the file or the schema knows, `+a.b=value`
     adds a key that is not there, `++a.b=value` sets or adds; values are parsed as YAML (`[a,b]`,
     `8`, `null`, `1e-4`); list items go by index (`data.train_ds.input_cfg.0.shar_path=/x`);
  3. check every key against SCHEMA: an unknown key (a typo) is an error naming the key, where it
     came from (the file or the command line) and the closest valid key; a value of the wrong type
     is an error; keys that only mean something to NeMo or Lightning are accepted and reported once
     as ignored, so NeMo's own example files load; only free-form sections (model.lora,
     model.optimizer, ...) take keys SCHEMA lacks;
  4. fill in the schema's defaults for `trainer`, `exp_manager` and the `data` loaders;
  5. resolve `${a.b.c}` interpolations anywhere: a reference that is the whole value keeps its type,
     one inside a string is substituted as text; a cycle or a missing target is an error;
  6. refuse any `???` that is left, naming its full dotted key;
  7. check every `_target_` / `target` against TARGETS, the class names allowed where it sits. No
     class is ever imported from a config string: a name only picks one of this project's modules
     (or torch.optim).
The result is a plain nested dict: the fully resolved config a run saves beside its checkpoints.
The perception modules check their own sections' NeMo keys with NEMO_FREE_KEYS and NEMO_OFF_KEYS.
"""
import copy
import difflib
import os
import re
import sys
from pathlib import Path

import yaml

MISSING = "???"
ANY = object()        # free-form subtree: its owner (optimizer, LoRA, perception, ...) checks it
IGNORED = object()    # a key only NeMo or Lightning acts on: accepted and reported
UNKNOWN = object()


class _Loader(yaml.SafeLoader):
    """YAML as OmegaConf reads it: `1e-5` and `3e-4` are floats (plain pyyaml reads strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A problem in a config file or an override; its message is one line meant for the user."""


class Keys(dict):
    """A section whose keys are checked but whose defaults are not filled in (the model does it)."""


class ListOf:
    """A list whose items follow `item`."""

    def __init__(self, item):
        self.item = item


class PathOrListOf(ListOf):
    """A list whose items follow `item`, or the path of a YAML file holding one (read_input_cfg)."""


class MapOf:
    """A dict of user-chosen names (validation sets), each value following `value`."""

    def __init__(self, value):
        self.value = value


OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adafactor", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax")
CONFORMER = ("nemo.collections.asr.modules.ConformerEncoder", "perception.ConformerEncoder")
IDENTITY = ("nemo.collections.speechlm2.modules.perception.IdentityConnector",
            "perception.IdentityConnector")

# The class names a `_target_` (or NeMo's `target`) may hold, by the section it sits in: NeMo's
# names for what this project implements, its own names, and torch.optim. Anything else is an error.
TARGETS = {
    "model.perception": ("nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
                         "perception.AudioPerceptionModule"),
    "model.perception.preprocessor": (
        "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "perception.MelSpectrogram"),
    "model.perception.encoder": CONFORMER,
    "model.perception.modality_adapter": CONFORMER + IDENTITY,
    "model.perception.spec_augment": ("nemo.collections.asr.modules.SpectrogramAugmentation",
                                      "perception.SpectrogramAugmentation"),
    "model.speech_decoder": (
        "nemo.collections.speechlm2.modules.speech_generation.TransformerARSpeechDecoder",
        "nemo.collections.speechlm2.modules.TransformerARSpeechDecoder",
        "speech_decoder.SpeechDecoder", "speech_decoder.TransformerARSpeechDecoder"),
    "model.optimizer": tuple(f"torch.optim.{name}" for name in OPTIMIZERS),
    "model.lr_scheduler": ("nemo.core.optim.lr_scheduler.CosineAnnealing",),
    "trainer.strategy": ("lightning.pytorch.strategies.DDPStrategy",),  # ignored: train.py does DDP
}

# The NeMo keys of the perception sections (perception.py checks them, check_nemo_keys): those that
# change nothing here (bookkeeping, speed, limits), accepted with any value, and options not
# implemented here, accepted only at the value that switches them off.
NEMO_FREE_KEYS = {
    "preprocessor": {"_target_", "rng", "nb_max_freq", "use_grads", "use_torchaudio",
                     "max_duration"},
    "encoder": {"_target_", "pos_emb_max_len", "subsampling_conv_chunking_factor",
                "stochastic_depth_mode", "stochastic_depth_start_layer", "global_tokens_spacing",
                "reduction_position", "use_pytorch_sdpa", "use_pytorch_sdpa_backends",
                "sync_max_audio_length"},
    "spec_augment": {"_target_", "rng"},  # NeMo's rng seeds only its legacy path and SpecCutout
}
NEMO_OFF_KEYS = {
    "preprocessor": {"exact_pad": False, "nb_augmentation_prob": 0.0, "stft_exact_pad": False,
                     "stft_conv": False},
    "encoder": {"reduction": None, "reduction_factor": 1, "stochastic_depth_drop_prob": 0.0,
                "global_tokens": 0, "global_attn_separate": False, "conv_dual_mode": False,
                "att_chunk_context_size": None, "conv_context_style": "regular"},
    "spec_augment": {"use_vectorized_spec_augment": True, "use_numba_spec_augment": False},
}

# One `input_cfg` entry: which reader, where the data is, and the reader's options (data.py).
INPUT_CFG = Keys(
    type=None, shar_path=None, cuts_path=None, manifest_filepath=None, tarred_audio_filepaths=None,
    audio_locator_tag=None, tags=ANY, system_prompt=None, context=None, weight=None, input_cfg=ANY,
    token_equivalent_duration=None, shuffle_shards=None, shard_seed=None, slice_length=None,
)

# Options of one lhotse dataloader; validation sets listed under `datasets` inherit them.
LOADER = dict(
    input_cfg=PathOrListOf(INPUT_CFG), shar_path=None, cuts_path=None, manifest_filepath=None,
    tarred_audio_filepaths=None, slice_length=None,
    sample_rate=16000, batch_size=None, batch_duration=None, quadratic_duration=None,
    use_bucketing=False, num_buckets=30, bucket_duration_bins=None, bucket_buffer_size=10000,
    num_cuts_for_bins_estimate=10000, shuffle_buffer_size=10000, shuffle=False, drop_last=False,
    seed=0, shard_seed="trng", num_workers=0, pin_memory=None, min_duration=None, max_duration=None,
    prompt_format=None, token_equivalent_duration=None, audio_locator_tag=None,
    use_multimodal_sampling=False, batch_tokens=None, max_tokens=None, min_tokens=None,
    perturb_speed=False, noise_path=None, noise_snr=[10.0, 20.0], noise_mix_prob=0.5,
    force_finite=IGNORED, force_map_dataset=IGNORED, max_open_streams=IGNORED,
)

SCHEMA = {
    "name": None,
    "model": dict(  # model_defaults() fills these for models built from a plain dict too
        pretrained_llm=None, tokenizer_path=None, pretrained_asr=None, pretrained_audio_codec=None,
        scoring_asr=None,
        pretrained_weights=True, audio_locator_tag=None, prompt_format="llama2",
        freeze_params=[], prevent_freeze_params=[], lora=ANY,
        perception=ANY, speech_decoder=ANY, optimizer=ANY, lr_scheduler=ANY,
        audio_loss_weight=1.0, text_loss_weight=1.0, duplex_user_channel_weight=1.0,
        ctc_loss_weight=0.0, torch_dtype=IGNORED,
    ),
    "trainer": dict(
        devices="auto", num_nodes=1, accelerator="auto", precision="32",
        max_steps=1000, max_time=None, log_every_n_steps=10, val_check_interval=1.0,
        limit_train_batches=1.0, limit_val_batches=1.0, num_sanity_val_steps=2,
        accumulate_grad_batches=1, gradient_clip_val=None, gradient_clip_algorithm="norm",
        enable_progress_bar=True,
        strategy=IGNORED, logger=IGNORED, enable_checkpointing=IGNORED, replace_sampler_ddp=IGNORED,
        use_distributed_sampler=IGNORED, max_epochs=IGNORED, enable_model_summary=IGNORED,
        sync_batchnorm=IGNORED, benchmark=IGNORED, callbacks=IGNORED, plugins=IGNORED,
        check_val_every_n_epoch=IGNORED, reload_dataloaders_every_n_epochs=IGNORED,
    ),
    "exp_manager": dict(
        explicit_log_dir=None, exp_dir=None, name="default", version=None,
        use_datetime_version=True, resume_if_exists=False, resume_ignore_no_checkpoint=False,
        resume_from_checkpoint=None, max_time_per_run=None, create_checkpoint_callback=True,
        checkpoint_callback_params=dict(
            monitor="val_loss", mode="min", save_top_k=1, filename="{step}", save_last=True,
            every_n_train_steps=None,
            every_n_epochs=IGNORED, always_save_nemo=IGNORED, save_nemo_on_train_end=IGNORED,
            save_weights_only=IGNORED, dirpath=IGNORED,
        ),
        create_tensorboard_logger=False, create_wandb_logger=False, wandb_logger_kwargs=ANY,
        log_step_timing=IGNORED, log_local_rank_0_only=IGNORED, log_global_rank_0_only=IGNORED,
    ),
    "data": dict(
        frame_length=0.08, source_sample_rate=16000, target_sample_rate=22050,
        input_roles=["user", "User"], output_roles=["agent", "Assistant"],
        train_ds=dict(LOADER),
        validation_ds=dict(LOADER, datasets=MapOf(Keys(LOADER))),
        test_ds=Keys(LOADER, datasets=MapOf(Keys(LOADER))),
    ),
}


def load_config(path: str | Path, overrides: list[str] = (), report=print) -> dict:
    """Read, override, check, fill, resolve and validate (module docstring); `report` gets notes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping with sections "
                          "model, trainer, exp_manager, data")
    where = _source(path, [apply_override(cfg, override) for override in overrides])
    ignored = []
    _check(cfg, SCHEMA, "", where, ignored)
    if ignored and report:
        report(f"config: ignoring keys that only NeMo/Lightning act on: {', '.join(ignored)}")
    _fill_defaults(cfg, SCHEMA)
    cfg = _resolve(cfg)
    missing = [key for key, value in _walk(cfg) if value == MISSING]
    if missing:
        key = missing[0]
        raise ConfigError(f"{key} is '???' (required) {where(key)}: set it in the file or as "
                          f"{key}=VALUE on the command line" + _also(missing[1:]))
    _check_targets(cfg, where)
    return cfg


def model_defaults(model_cfg: dict) -> dict:
    """A copy of a `model` section with SCHEMA's defaults filled in (where model defaults live)."""
    cfg = copy.deepcopy(model_cfg)
    _fill_defaults(cfg, SCHEMA["model"])
    for key, default in SCHEMA["model"].items():
        if default is ANY:  # a free-form section (lora, speech_decoder, ...): None when absent
            cfg.setdefault(key, None)
    return cfg


def loader_defaults(ds_cfg: dict) -> dict:
    """A copy of a data loader section with SCHEMA's defaults filled in."""
    cfg = copy.deepcopy(ds_cfg)
    _fill_defaults(cfg, LOADER)
    return cfg


def cli(main) -> None:
    """Run a command's `main(argv)`: a config, data or path mistake ends it with one line on stderr
    and exit code 2, not a traceback (SLM_DEBUG=1 shows the traceback)."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("SLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def read_input_cfg(path: str | Path) -> list:
    """An `input_cfg` given as a path: the YAML file's list of entries (or its `input_cfg` key's),
    checked like entries written in the config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input_cfg {path}: no such file")
    try:
        entries = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"input_cfg {path} is not valid YAML: {' '.join(str(e).split())}") \
            from None
    if isinstance(entries, dict) and "input_cfg" in entries:
        entries = entries["input_cfg"]
    _check(entries, ListOf(INPUT_CFG), "input_cfg", lambda key: f"in {path}", [])
    return entries


def check_nemo_keys(section: str, keys: dict) -> None:
    """The NeMo keys a perception section's module takes without a parameter of its own: each must
    be in NEMO_FREE_KEYS, or in NEMO_OFF_KEYS at the value that switches it off."""
    free, off = NEMO_FREE_KEYS[section], NEMO_OFF_KEYS[section]
    for key, value in keys.items():
        if key in free:
            continue
        if key not in off:
            raise ValueError(f"{section}: unknown key {key!r}")
        if value != off[key]:
            raise ValueError(f"{section}.{key}={value!r} is not supported; set it to {off[key]!r}")


def check_choice(key: str, value, *allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; use one of {list(allowed)}")


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def apply_override(cfg: dict, override: str) -> str:
    """Apply one `key=value`, `+key=value` or `++key=value` to `cfg` in place; returns the key."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value")
    key, text = override.split("=", 1)
    add = len(key) - len(key.lstrip("+"))
    key = key.lstrip("+")
    if add > 2 or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}': bad key '{key}'")
    try:
        value = parse_yaml(text) if text else None
    except yaml.YAMLError:
        value = text  # an unparseable value is taken as the plain string the user typed
    parts = key.split(".")
    *parents, last = parts
    node = cfg
    for i, part in enumerate(parents + [last]):
        child = _get_child(node, part)
        exists = child is not None or (isinstance(node, dict) and part in node)
        if not add and not exists and _schema_at(parts[: i + 1]) is UNKNOWN:
            add_hint = f"; use +{key}=... to add it" if _in_free_form(parts[: i + 1]) else ""
            where = "on the command line"
            raise ConfigError(_unknown_message(".".join(parts[: i + 1]), where, node) + add_hint)
        if i == len(parents):
            break
        if child is None:
            child = {}
            _set_child(node, part, child, key)
        node = child
    if add == 1 and exists:
        raise ConfigError(f"override '+{key}': the key exists already; drop the '+' to change it")
    _set_child(node, last, value, key)
    return key


# --------------------------------------------------------------------------------------------------
# helpers

def _get_child(node, part):
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _set_child(node, part, value, key):
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list) and part.isdigit() and int(part) <= len(node):
        node[int(part):int(part) + 1] = [value]
    else:
        raise ConfigError(f"override of '{key}': cannot set '{part}' inside a "
                          f"{type(node).__name__}")


def _schema_at(parts):
    """The schema node at a key path, or UNKNOWN where the schema does not know the key (inside
    free-form subtrees too: there a new key needs `+`)."""
    node = SCHEMA
    for part in parts:
        if isinstance(node, ListOf):
            node = node.item if part.isdigit() else UNKNOWN
        elif isinstance(node, MapOf):
            node = node.value
        elif isinstance(node, dict):
            node = node.get(part, ANY if part in ("_target_", "target") else UNKNOWN)
        else:
            return UNKNOWN
        if node is UNKNOWN:
            return UNKNOWN
    return node


def _in_free_form(parts) -> bool:
    """Whether a key lies inside a section the schema leaves free (model.lora, model.optimizer,
    ...): only there can `+` add a key the schema does not know."""
    return any(_schema_at(parts[:i]) in (ANY, IGNORED) for i in range(1, len(parts)))


def _source(path, overridden: list[str]):
    """`where(key)`, for messages: "on the command line" if an override set the key (or a section
    above it), else "in <the file>"."""
    def where(key: str) -> str:
        if any(key == k or key.startswith(k + ".") for k in overridden):
            return "on the command line"
        return f"in {path}"
    return where


def _check(value, schema, key, where, ignored):
    if schema is ANY or schema is IGNORED:
        return
    if isinstance(schema, PathOrListOf) and isinstance(value, str):
        return  # checked when the file is read
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            raise ConfigError(f"{key} {where(key)} must be a list, got {value!r}")
        for i, item in enumerate(value):
            _check(item, schema.item, f"{key}.{i}", where, ignored)
    elif isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} {where(key)} must be a mapping of names, got {value!r}")
        for name, item in value.items():
            _check(item, schema.value, f"{key}.{name}", where, ignored)
    elif isinstance(schema, dict):
        if value is None:
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'the file'} {where(key)} must be a mapping, got {value!r}")
        for name, item in value.items():
            dotted = f"{key}.{name}" if key else str(name)
            if name in ("_target_", "target"):
                continue
            if name not in schema:
                raise ConfigError(_unknown_message(dotted, where(dotted), schema))
            if schema[name] is IGNORED:
                ignored.append(dotted)
            else:
                _check(item, schema[name], dotted, where, ignored)
    else:
        _check_type(value, schema, key, where)


def _check_type(value, default, key, where):
    """Values whose default has a clear type must match it (an int does where a float is wanted)."""
    if value is None or default is None or value == MISSING:
        return
    if isinstance(value, str) and "${" in value:
        return
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, list):
        ok, wanted = isinstance(value, list), "a list"
    elif isinstance(default, str):
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        wanted = "a string"
    else:
        return
    if not ok:
        raise ConfigError(f"{key} {where(key)} must be {wanted}, got {value!r}")


def _check_targets(node, where, section=""):
    items = (node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list)
             else ())
    for name, value in items:
        key = f"{section}.{name}" if section else str(name)
        if name not in ("_target_", "target"):
            _check_targets(value, where, key)
            continue
        allowed = TARGETS.get(section, ())
        if not isinstance(value, str) or value not in allowed:
            use = (f"use one of {', '.join(allowed)}" if allowed
                   else "remove it: no class is chosen there")
            raise ConfigError(f"{key} {where(key)} is {value!r}, which is not allowed there; {use} "
                              "(a config never imports code)")


def _unknown_message(key, where, node):
    """'unknown config key' naming where it came from and the closest key the schema or `node`
    (the section as it stands) knows."""
    parent, _, name = key.rpartition(".")
    schema = _schema_at(parent.split(".")) if parent else SCHEMA
    known = [*(schema if isinstance(schema, dict) else ()),
             *(node if isinstance(node, dict) else ())]
    valid = [k for k in known if isinstance(k, str)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
    return f"unknown config key '{key}' {where}{hint}"


def _fill_defaults(cfg, schema):
    for name, default in schema.items():
        if default is IGNORED or default is ANY or isinstance(default, (Keys, MapOf)):
            continue
        if isinstance(default, dict):
            if cfg.get(name) is None:
                cfg[name] = {}
            if isinstance(cfg[name], dict):
                _fill_defaults(cfg[name], default)
        elif isinstance(default, ListOf):
            continue
        elif cfg.get(name) is None:  # absent or null: the default
            cfg[name] = list(default) if isinstance(default, list) else default


_REFERENCE = re.compile(r"\$\{([^${}]+)\}")


def _resolve(cfg: dict) -> dict:
    """Replace each ${a.b.c} with the resolved value it points at; detect cycles, dangling ones."""

    def lookup(target, referrer, stack):
        loop = [i for i, seen in enumerate(stack)
                if seen == target or seen.startswith(target + ".")]
        if loop:
            raise ConfigError(f"interpolation cycle: {' -> '.join(stack[loop[0]:] + [target])}")
        node = cfg
        for part in target.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConfigError(f"{referrer} refers to ${{{target}}}, which does not exist")
        return resolve(node, target, stack)

    def resolve(value, key, stack):
        if isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}" if key else k, stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{key}.{i}", stack) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REFERENCE.fullmatch(value.strip())
        if whole:
            return lookup(whole.group(1).strip(), key, stack + [key])
        return _REFERENCE.sub(lambda m: str(lookup(m.group(1).strip(), key, stack + [key])), value)

    try:
        return resolve(cfg, "", [])
    except RecursionError:
        raise ConfigError("interpolations nest too deeply (a cycle through a parent key?)") \
            from None


def _walk(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}.{i}")
    else:
        yield key, value


def _also(keys):
    return f" (also unset: {', '.join(keys)})" if keys else ""
