"""The README's "Use a trained model" snippets, run as written against a checkpoint of a 2-step
training run, so that the documented commands and API cannot drift from the code."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use a trained model"
# a very small SALM, two steps, checkpoint at runs/salm as configs/salm.yaml names it
TINY_TRAINING = [
    "model.perception.encoder.n_layers=1", "model.perception.encoder.d_model=32",
    "model.perception.encoder.n_heads=2", "model.perception.encoder.subsampling_conv_channels=16",
    "model.perception.modality_adapter.feat_in=32",
    "model.perception.modality_adapter.d_model=32", "model.perception.modality_adapter.n_heads=2",
    "data.train_ds.batch_size=4", "data.train_ds.num_workers=0", "data.validation_ds.batch_size=4",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
]


def snippets(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_section_has_shell_and_python_snippets():
    assert len(snippets("bash")) == 1 and len(snippets("python")) == 1
    assert "python infer.py export" in snippets("bash")[0]
    assert "from_pretrained" in snippets("python")[0]


# a training run and three command-line runs over the demo validation set: 30-60 s on 2 cores
@pytest.mark.slow
def test_readme_snippets_run(tmp_path, monkeypatch):
    # the repository, minus its outputs
    for name in ("assets", "configs", *(p.name for p in ROOT.glob("*.py"))):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    train.main(["configs/salm.yaml", *TINY_TRAINING])
    assert (tmp_path / "runs" / "salm" / "checkpoints" / "last.ckpt").is_file()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    shell = subprocess.run(["bash", "-euo", "pipefail", "-c", snippets("bash")[0]], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert (tmp_path / "exports" / "salm" / "model.safetensors").is_file()
    assert len((tmp_path / "generations" / "asr_val.jsonl").read_text().splitlines()) == 60
    assert shell.stdout.count("RTFx") == 2 and "tokens/s" in shell.stdout
    assert re.search(r"asr_val: WER [\d.]+% \(ins [\d.]+%, del [\d.]+%, sub [\d.]+%\)",
                     shell.stdout)

    python = subprocess.run([sys.executable, "-c", snippets("python")[0]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    assert "reference:" in python.stdout and "WER:" in python.stdout and "ASR-BLEU" in python.stdout
