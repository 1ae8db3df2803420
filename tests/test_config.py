from pathlib import Path

import pytest
import yaml

from config import ConfigError, load_config, save_config

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
name: demo
model:
  pretrained_llm: assets/tiny-llm
  freeze_params: ["^llm\\\\..+$"]
trainer:
  max_steps: 100
  limit_train_batches: 20
  val_check_interval: ${trainer.limit_train_batches}
exp_manager:
  name: ${name}
  explicit_log_dir: runs/${name}/steps_${trainer.max_steps}
data:
  train_ds:
    batch_size: 4
    input_cfg:
      - type: lhotse_shar
        shar_path: /data/a
      - type: lhotse_shar
        shar_path: ${data.train_ds.input_cfg.0.shar_path}/b
  validation_ds:
    datasets:
      clean:
        shar_path: ${data.train_ds.input_cfg.0.shar_path}
"""


def test_interpolation_typed_in_strings_nested_and_into_lists(tmp_path):
    cfg = load_config(write(tmp_path, BASE), report=None)
    interval = cfg["trainer"]["val_check_interval"]
    assert interval == 20 and isinstance(interval, int)
    assert cfg["exp_manager"]["name"] == "demo"
    assert cfg["exp_manager"]["explicit_log_dir"] == "runs/demo/steps_100"
    assert cfg["data"]["train_ds"]["input_cfg"][1]["shar_path"] == "/data/a/b"
    assert cfg["data"]["validation_ds"]["datasets"]["clean"]["shar_path"] == "/data/a"
    assert cfg["model"]["freeze_params"] == ["^llm\\..+$"]


def test_chained_and_whole_section_references(tmp_path):
    text = BASE + "  test_ds:\n    sample_rate: ${data.train_ds.sample_rate}\n"
    text = text.replace("max_steps: 100", "max_steps: ${trainer.log_every_n_steps}")
    cfg = load_config(write(tmp_path, text), report=None)
    assert cfg["trainer"]["max_steps"] == 10  # the schema default of log_every_n_steps, referenced
    assert cfg["exp_manager"]["explicit_log_dir"] == "runs/demo/steps_10"
    assert cfg["data"]["test_ds"]["sample_rate"] == 16000


def test_overrides_each_form(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "trainer.max_steps=1000",                      # typed int
        "data.train_ds.batch_size=8",
        "model.freeze_params=[a,b]",                   # YAML flow list
        "data.train_ds.input_cfg.0.shar_path=/x",      # into a list, and referenced elsewhere
        "trainer.gradient_clip_val=0.5",               # schema key absent from the file
        "+model.lora.r=8",                             # add a key that is not there
        "++trainer.precision=bf16-true",               # set-or-add
        "trainer.max_time=null",
    ], report=None)
    assert cfg["trainer"]["max_steps"] == 1000
    assert cfg["data"]["train_ds"]["batch_size"] == 8
    assert cfg["model"]["freeze_params"] == ["a", "b"]
    assert cfg["data"]["train_ds"]["input_cfg"][0]["shar_path"] == "/x"
    # interpolation sees the override
    assert cfg["data"]["train_ds"]["input_cfg"][1]["shar_path"] == "/x/b"
    assert cfg["exp_manager"]["explicit_log_dir"] == "runs/demo/steps_1000"
    assert cfg["trainer"]["gradient_clip_val"] == 0.5
    assert cfg["model"]["lora"] == {"r": 8}
    assert cfg["trainer"]["precision"] == "bf16-true"
    assert cfg["trainer"]["max_time"] is None


def test_override_errors(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError,
                       match=r"'trainer\.max_step'.*did you mean 'trainer\.max_steps'"):
        load_config(path, ["trainer.max_step=5"], report=None)
    with pytest.raises(ConfigError, match=r"use \+model\.lora\.r"):
        load_config(path, ["model.lora.r=8"], report=None)
    with pytest.raises(ConfigError, match="exists already"):
        load_config(path, ["+trainer.max_steps=5"], report=None)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["trainer.max_steps"], report=None)


def test_missing_value_names_full_key(tmp_path):
    text = BASE.replace("shar_path: /data/a", "shar_path: ???")
    with pytest.raises(ConfigError, match=r"data\.train_ds\.input_cfg\.0\.shar_path is '\?\?\?'"):
        load_config(write(tmp_path, text), report=None)
    cfg = load_config(write(tmp_path, text), ["data.train_ds.input_cfg.0.shar_path=/d"],
                      report=None)
    assert cfg["data"]["validation_ds"]["datasets"]["clean"]["shar_path"] == "/d"


def test_typo_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, BASE.replace("  max_steps: 100", "  max_step: 100"))
    with pytest.raises(ConfigError) as err:
        load_config(path, report=None)
    message = str(err.value)
    assert "trainer.max_step" in message and str(path) in message and "trainer.max_steps" in message
    assert "\n" not in message
    path = write(tmp_path, BASE.replace("  batch_size: 4", "  batch_sise: 4"))
    with pytest.raises(ConfigError,
                       match=r"data\.train_ds\.batch_sise.*data\.train_ds\.batch_size"):
        load_config(path, report=None)
    path = write(tmp_path, BASE.replace("        shar_path: /data/a\n      - ",
                                        "        shar_pth: /data/a\n      - "))
    with pytest.raises(ConfigError, match=r"input_cfg\.0\.shar_pth.*shar_path"):
        load_config(path, report=None)


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.max_steps .* must be an integer, got 'many'"):
        load_config(write(tmp_path, BASE), ["trainer.max_steps=many"], report=None)
    with pytest.raises(ConfigError, match=r"data\.train_ds\.shuffle .* true or false"):
        load_config(write(tmp_path, BASE), ["data.train_ds.shuffle=5"], report=None)


def test_cycle_and_dangling_reference(tmp_path):
    text = BASE.replace("max_steps: 100", "max_steps: ${trainer.log_every_n_steps}")
    text = text.replace("limit_train_batches: 20",
                        "limit_train_batches: 20\n  log_every_n_steps: ${trainer.max_steps}")
    with pytest.raises(ConfigError,
                       match=r"interpolation cycle: trainer\.\w+ -> trainer\.\w+ -> trainer\.\w+"):
        load_config(write(tmp_path, text), report=None)
    with pytest.raises(ConfigError, match=r"interpolation cycle"):
        load_config(write(tmp_path, BASE + "  test_ds:\n    sample_rate: ${data}\n"), report=None)
    with pytest.raises(ConfigError,
                       match=r"exp_manager\.name refers to \$\{nam\}, which does not exist"):
        load_config(write(tmp_path, BASE.replace("name: ${name}", "name: ${nam}")), report=None)


def test_nemo_only_keys_are_reported_once(tmp_path):
    notes = []
    cfg = load_config(FIXTURES / "nemo_salm.yaml", ["data.train_ds.input_cfg.0.cuts_path=/c",
                      "data.validation_ds.datasets.val_set_0.input_cfg.0.cuts_path=/v"],
                      report=notes.append)
    assert len(notes) == 1
    for key in ("trainer.strategy", "trainer.logger", "trainer.enable_checkpointing",
                "trainer.use_distributed_sampler",
                "exp_manager.checkpoint_callback_params.always_save_nemo"):
        assert key in notes[0]
    assert cfg["trainer"]["val_check_interval"] == 100
    assert cfg["model"]["lr_scheduler"]["max_steps"] == 100000
    assert cfg["data"]["train_ds"]["prompt_format"] == "llama2"
    assert cfg["data"]["train_ds"]["input_cfg"][0]["audio_locator_tag"] == "<|audioplaceholder|>"
    assert cfg["model"]["optimizer"]["_target_"] == "torch.optim.AdamW"


@pytest.mark.parametrize("name", ["doc_salm.yaml", "doc_s2s_duplex.yaml",
                                  "doc_s2s_duplex_speech_decoder.yaml"])
def test_configuration_document_blocks_load(name):
    cfg = load_config(FIXTURES / name, report=None)
    assert cfg["trainer"]["max_steps"] == 100000
    assert cfg["exp_manager"]["name"] == cfg["name"]
    assert cfg["data"]["train_ds"]["sample_rate"] in (16000, 22050)
    if "s2s" in name:
        assert cfg["data"]["train_ds"]["sample_rate"] == cfg["data"]["target_sample_rate"] == 22050
    if name == "doc_s2s_duplex.yaml":
        assert cfg["model"]["audio_loss_weight"] == 4
    if "speech_decoder" in name:
        assert cfg["model"]["speech_decoder"]["d_kv"] == 64


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), report=None)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == cfg
    assert load_config(tmp_path / "resolved.yaml", report=None) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_load_as_written(path):
    """Every value the file states comes through unchanged, with plain pyyaml's reading of the file
    as the reference, and every `${a.b}` that is a whole value holds what a.b holds."""
    def leaves(node, key=()):
        if isinstance(node, (dict, list)):
            for name, child in node.items() if isinstance(node, dict) else enumerate(node):
                yield from leaves(child, key + (name,))
        else:
            yield key, node

    def at(cfg, key):
        for part in key:
            cfg = cfg[part]
        return cfg

    cfg = load_config(path, report=None)
    stated = list(leaves(yaml.safe_load(path.read_text())))
    assert len(stated) > 50
    for key, value in stated:
        got = at(cfg, key)
        reference = isinstance(value, str) and value.count("${") == 1
        if reference and value.startswith("${") and value.endswith("}"):
            target = tuple(int(p) if p.isdigit() else p for p in value[2:-1].split("."))
            assert got == at(cfg, target), key
        elif isinstance(value, str) and isinstance(got, float):  # pyyaml reads 1e-5 as text
            assert got == float(value), key
        else:
            assert got == value, key


def test_exponent_floats_parse_as_numbers(tmp_path):
    text = BASE.replace("  batch_size: 4", "  batch_size: 4\n    max_duration: 2e1")
    text += "  test_ds:\n    seed: 7\n"
    cfg = load_config(write(tmp_path, text), ["+model.optimizer.lr=3e-4",
                                              "+model.optimizer.eps=1e-8"], report=None)
    assert cfg["model"]["optimizer"] == {"lr": 3e-4, "eps": 1e-8}
    assert cfg["data"]["train_ds"]["max_duration"] == 20.0


def test_spec_augment_section_takes_nemo_target_only(tmp_path):
    nemo = "nemo.collections.asr.modules.SpectrogramAugmentation"
    section = f"+model.perception.spec_augment={{_target_: {nemo}, time_masks: 2}}"
    cfg = load_config(write(tmp_path, BASE), [section], report=None)
    assert cfg["model"]["perception"]["spec_augment"] == {"_target_": nemo, "time_masks": 2}
    with pytest.raises(ConfigError, match="model.perception.spec_augment._target_ .*not allowed"):
        load_config(write(tmp_path, BASE), ["+model.perception.spec_augment={_target_: my.Aug}"],
                    report=None)
