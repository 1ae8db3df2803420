"""Break the code on purpose and check that the tests notice (not collected by pytest: run it as a script).

Each mutation replaces one exact piece of text (it must occur exactly once) in one file of a temporary copy of
the repository, runs the tests expected to catch it there, and reports it caught (they fail), survived (they
pass: a test is missing or cannot fail) or stale (the text is gone: the code moved on, update the entry).

    python tests/mutations.py                  # every mutation
    python tests/mutations.py generate bucket  # those whose name contains one of these words
    python tests/mutations.py --list
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    file: str
    text: str  # exact text to replace, found exactly once in `file`
    replacement: str
    tests: list[str]  # pytest node ids expected to fail
    slow: bool = False  # the tests need --runslow


MUTATIONS = [
    # ---- generation
    Mutation("generate: position ids from arange, ignoring left padding", "salm.py",
             "position_ids=position_ids_from_mask(attention_mask),\n            generation_config",
             "position_ids=torch.arange(attention_mask.shape[1]).expand_as(attention_mask),\n"
             "            generation_config",
             ["tests/test_salm.py::test_batched_generation_equals_one_by_one"]),
    Mutation("generate: attention mask of ones", "salm.py",
             "attention_mask=attention_mask,\n            position_ids=position_ids_from_mask(attention_mask),",
             "attention_mask=torch.ones_like(attention_mask),\n"
             "            position_ids=position_ids_from_mask(attention_mask),",
             ["tests/test_salm.py::test_batched_generation_equals_one_by_one"]),
    # ---- data
    Mutation("bucketing ignored", "data.py", 'if train and ds_cfg["use_bucketing"]:', "if False:",
             ["tests/test_data.py::test_bucketing_groups_by_duration_and_caps_each_bucket"]),
    Mutation("NeMo manifest audio: left channel only", "data.py",
             "return fastcopy(recording.to_cut(), id=cut_id, start=offset, duration=duration)",
             "return MonoCut(cut_id, start=offset, duration=duration, channel=0, recording=recording)",
             ["tests/test_data.py::test_stereo_audio_is_averaged_from_every_source"]),
    Mutation("skips counted per occurrence, not per item", "data.py",
             "elif item_id not in self.items.setdefault(reason, {}):",
             "elif self.items.setdefault(reason, {}).setdefault(f'{item_id}{len(self.items[reason])}', 1):",
             ["tests/test_bad_input.py::test_bad_items_are_counted_and_named_once_however_many_epochs"]),
    Mutation("list of manifests: first one only", "data.py",
             "    for item in entry[\"manifest_filepath\"]:",
             "    for item in entry[\"manifest_filepath\"][:1]:",
             ["tests/test_data.py::test_a_list_of_nemo_manifests"]),
    Mutation("data paths not checked before the model is built", "train.py",
             '    check_data_paths(cfg["data"])\n', "",
             ["tests/test_bad_input.py::test_config_and_path_mistakes_are_one_line_errors_before_anything_is_"
              "written"]),
    # ---- infer
    Mutation("evaluate: items dropped while reading not counted", "infer.py",
             "list(read_inputs({\"input_cfg\": _input_cfg(path)}, train=False, skipped=skipped)), skipped",
             "list(read_inputs({\"input_cfg\": _input_cfg(path)}, train=False)), skipped",
             ["tests/test_infer.py::test_evaluate_counts_every_item_it_drops"]),
    # ---- config
    Mutation("config: '+key' offered where adding cannot work", "config.py",
             'add_hint = f"; use +{key}=... to add it" if _in_free_form(parts[: i + 1]) else ""',
             'add_hint = f"; use +{key}=... to add it"',
             ["tests/test_bad_input.py::test_config_and_path_mistakes_are_one_line_errors_before_anything_is_"
              "written"]),
    Mutation("config: command-line values blamed on the file", "config.py",
             'return "on the command line" if any(', 'return f"in {path}" if any(',
             ["tests/test_bad_input.py::test_config_and_path_mistakes_are_one_line_errors_before_anything_is_"
              "written"]),
    # ---- training loop (train_step, DDP, accumulation): see the entries below this line
]


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTATIONS:
            print(f"{m.name}  [{m.file}] -> {', '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTATIONS if not argv or any(word in m.name for word in argv)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache",
                                                                   "runs", "nemo_experiments", "generations"))
        for m in chosen:
            results[m.name] = run(m, copy)
            print(f"{results[m.name]:>9}  {m.name}", flush=True)
    survived = [name for name, result in results.items() if result != "caught"]
    print(f"{len(results) - len(survived)} of {len(results)} caught" + (f"; not caught: {', '.join(survived)}"
                                                                        if survived else ""))
    return 1 if survived else 0


def run(m: Mutation, copy: Path) -> str:
    """Apply `m` to the copy, run its tests, restore the file; 'caught', 'survived', 'stale' or 'error'."""
    path = copy / m.file
    original = path.read_text()
    if original.count(m.text) != 1:
        return "stale"
    path.write_text(original.replace(m.text, m.replacement))
    try:
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests,
                              *(["--runslow"] if m.slow else [])], cwd=copy, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.time() - start
    finally:
        path.write_text(original)
    if out.returncode == 1:
        return "caught"
    if out.returncode == 0:
        return "survived"
    print(f"{m.name}: pytest exited {out.returncode} after {seconds:.0f} s\n{out.stdout[-2000:]}", file=sys.stderr)
    return "error"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
