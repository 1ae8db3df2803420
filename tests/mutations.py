"""Break the code on purpose and check that the tests notice (run as a script, not by pytest).

Each mutation replaces one exact piece of text (found exactly once) in one file of a temporary copy
of the repository, runs the tests expected to catch it there, and reports it caught (they fail),
survived (they pass: a test is missing or cannot fail) or stale (the text is gone: the code moved
on, so update the entry).

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
E2E = "test_train_e2e.py::"
DDP_EQUALS_ONE_PROCESS = E2E + "test_torchrun_two_ranks_equal_one_process_on_the_same_global_batch"
NOTHING_WRITTEN = "test_bad_input.py::test_mistakes_stop_the_run_before_anything_is_written"


@dataclass
class Mutation:
    name: str
    file: str
    text: str  # exact text to replace, found exactly once in `file`
    replacement: str
    tests: list[str]  # pytest node ids under tests/ expected to fail
    slow: bool = False  # the tests need --runslow


MUTATIONS = [
    # ---- generation
    Mutation("generate: position ids from arange, ignoring left padding", "salm.py",
             "position_ids=position_ids_from_mask(attention_mask),\n            generation_config",
             "position_ids=torch.arange(attention_mask.shape[1]).expand_as(attention_mask),\n"
             "            generation_config",
             ["test_salm.py::test_batched_generation_equals_one_by_one"]),
    Mutation("generate: attention mask of ones", "salm.py",
             "attention_mask=attention_mask,\n            position_ids=position_ids_from_mask(",
             "attention_mask=torch.ones_like(attention_mask),\n"
             "            position_ids=position_ids_from_mask(",
             ["test_salm.py::test_batched_generation_equals_one_by_one"]),
    Mutation("validation accuracy over the wrong count", "salm.py",
             '"acc": totals["batch_acc"] / batches}',
             '"acc": totals["batch_acc"] / (batches + 1)}',
             ["test_salm.py::test_validation_with_generation_scores_the_last_answer"]),
    # ---- augmentation
    Mutation("SpecAugment in eval mode too", "perception.py",
             "if self.spec_augmentation is not None and self.training:",
             "if self.spec_augmentation is not None:",
             ["test_perception.py::test_spec_augment_in_training_only_and_off_without_the_section"]),
    Mutation("SpecAugment masks the padding", "perception.py",
             "features = features.masked_fill(bands & valid, self.mask_value)",
             "features = features.masked_fill(bands, self.mask_value)",
             ["test_perception.py::test_spec_augment_mask_counts_widths_and_limits"]),
    Mutation("perturb_speed: one speed twice", "manifests.py",
             "cuts.map(_PerturbSpeed(0.9)), cuts.map(_PerturbSpeed(1.1))",
             "cuts.map(_PerturbSpeed(0.9)), cuts.map(_PerturbSpeed(0.9))",
             ["test_data.py::test_perturb_speed_and_noise_mixing_use_nemo_keys"]),
    # ---- data
    Mutation("bucketing ignored", "data.py", 'if train and ds_cfg["use_bucketing"]:', "if False:",
             ["test_data.py::test_bucketing_groups_by_duration_and_caps_each_bucket"]),
    Mutation("NeMo manifest audio: left channel only", "manifests.py",
             "return fastcopy(recording.to_cut(), id=cut_id, start=offset, duration=duration)",
             "return MonoCut(cut_id, offset, duration, channel=0, recording=recording)",
             ["test_data.py::test_stereo_audio_is_averaged_from_every_source"]),
    Mutation("a dataset's skips counted per occurrence, not per item", "manifests.py",
             "            self.add(*entry)", "            self.events[entry[0]] += 1",
             ["test_bad_input.py::test_bad_items_are_counted_and_named_once_however_many_epochs"]),
    Mutation("list of manifests: first one only", "manifests.py",
             'for item in entry["manifest_filepath"]:',
             'for item in entry["manifest_filepath"][:1]:',
             ["test_data.py::test_a_list_of_nemo_manifests"]),
    Mutation("data paths not checked before the model is built", "train.py",
             '    check_data_paths(cfg["data"])\n', "", [NOTHING_WRITTEN]),
    Mutation("duplex: the user's channel without its text tokens", "data.py",
             "right_pad(self._channels(kept, self.input_roles), self.pad_id)",
             "right_pad([c.masked_fill(c > 3, self.pad_id) for c in "
             "self._channels(kept, self.input_roles)], self.pad_id)",
             ["test_duplex_s2s.py::test_both_text_channels_equal_nemos_with_the_same_tokenizer"]),
    Mutation("mel frontend: reflect padding in the STFT", "perception.py",
             'pad_mode="constant"', 'pad_mode="reflect"',
             ["test_perception.py::test_features_match_parakeet_feature_extractor_on_speech"]),
    # ---- config, metrics, bench
    Mutation("config: '+key' offered where adding cannot work", "config.py",
             'add_hint = f"; use +{key}=... to add it" if _in_free_form(parts[: i + 1]) else ""',
             'add_hint = f"; use +{key}=... to add it"', [NOTHING_WRITTEN]),
    Mutation("config: command-line values blamed on the file", "config.py",
             'return "on the command line"', 'return f"in {path}"', [NOTHING_WRITTEN]),
    Mutation("config defaults overwrite what the file says", "config.py",
             "elif cfg.get(name) is None:  # absent or null: the default", "elif True:",
             ["test_config.py::test_shipped_configs_load_as_written"]),
    Mutation("BLEU without the text normalizer", "metrics.py",
             "    references = [normalize_text(r) for r in references]\n"
             "    hypotheses = [normalize_text(h) for h in hypotheses]\n    return sacrebleu",
             "    return sacrebleu",
             ["test_infer.py::test_asr_bleu_scores_what_the_asr_heard_against_the_references"]),
    Mutation("bench: SALM over LLM ratio upside down", "bench/train_step.py",
             'ratio = times["salm"] / times["llm"]', 'ratio = times["llm"] / times["salm"]',
             ["test_bench.py::test_train_step"]),
    # ---- infer
    Mutation("evaluate: items dropped while reading not counted", "infer.py",
             "_input_cfg(path)}, train=False, skipped=skipped))",
             "_input_cfg(path)}, train=False))",
             ["test_infer.py::test_evaluate_counts_every_item_it_drops"]),
    Mutation("evaluate: items whose audio fails to load not counted", "infer.py",
             "skipped.add(UNREADABLE, item.id, str(e))", "pass",
             ["test_infer.py::test_evaluate_counts_every_item_it_drops"]),
    Mutation("agent.wav clipped instead of scaled", "infer.py",
             "    if peak > 1.0:", "    if False:",
             ["test_duplex_s2s.py::test_command_line_writes_agent_audio_and_text"]),
    # ---- pretrained_llm, resume
    Mutation("pretrained_llm directory contents not checked", "salm.py",
             "    if not path.is_dir():\n        return\n    lacks",
             "    if True:\n        return\n    lacks",
             ["test_salm.py::test_pretrained_llm_mistakes_say_what_is_wrong"]),
    Mutation("resume with more processes: each rank skips all batches drawn", "train.py",
             "skip = max(0, math.ceil((drawn - rank) / world_size))", "skip = drawn",
             ["test_train.py::test_a_run_resumed_with_more_processes_goes_on_with_the_data"]),
    Mutation("a finished run's checkpoint rewritten by a rerun", "train.py",
             'if exp["create_checkpoint_callback"] and run.step > start_step:',
             'if exp["create_checkpoint_callback"]:',
             ["test_train.py::test_rerunning_a_finished_run_says_so_and_keeps_its_checkpoint"]),
    Mutation("resume: weights off by 1e-9 (within the old rel_tol=1e-6)", "train.py",
             "        set_rng_state(rank_state)\n",
             "        set_rng_state(rank_state)\n"
             "        [p.data.add_(1e-9) for p in model.parameters()]\n",
             ["test_resume.py"], slow=True),
    # ---- training loop (train_step, DDP, accumulation) and the GPU path
    Mutation("DDP: gradients not rescaled by the world size", "train.py",
             "run.world_size / totals[1]", "1 / totals[1]",
             [DDP_EQUALS_ONE_PROCESS], slow=True),
    Mutation("no gradient normalisation after accumulation", "train.py",
             "    torch._foreach_mul_(grads, run.world_size / totals[1].clamp(min=1))\n", "",
             [E2E + "test_gradient_accumulation_equals_a_double_batch_and_the_mean_loss_gradient"],
             slow=True),
    Mutation("per-micro-batch mean instead of the global mean", "train.py",
             'run.scaler.scale(out["loss_sum"]).backward()',
             'run.scaler.scale(out["loss"] / len(micro_batches)).backward()',
             [E2E + "test_gradient_accumulation_equals_a_double_batch_and_the_mean_loss_gradient"],
             slow=True),
    Mutation("text-only batch skips the perception (DDP)", "salm.py",
             "                text_embeds = text_embeds + 0 * sum(p.sum() for p in weights)",
             "                pass",
             [DDP_EQUALS_ONE_PROCESS], slow=True),
    Mutation("padded encoder queries see nothing (bf16 NaN on cuDNN)", "perception.py",
             "return torch.where(valid.unsqueeze(2), visible & keys, keys)",
             "return visible & keys & valid.unsqueeze(2)",
             ["test_gpu_step.py::test_no_attention_row_sees_nothing"]),
    Mutation("a host sync in the step (non-fused skip)", "train.py",
             'getattr(run.optimizer, "_step_supports_amp_scaling", False)', "False",
             ["test_gpu_step.py::test_a_training_step_needs_no_host_sync"]),
    Mutation("HF builds the LLM mask itself (host sync, empty rows)", "salm.py",
             '"attention_mask": causal_mask(input_embeds.size(1) - 1, index.device),',
             '"attention_mask": None,',
             ["test_gpu_step.py::test_a_training_step_needs_no_host_sync"]),
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
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "runs",
                                        "nemo_experiments", "generations")
        shutil.copytree(ROOT, copy, ignore=ignore)
        for m in chosen:
            results[m.name] = run(m, copy)
            print(f"{results[m.name]:>9}  {m.name}", flush=True)
    missed = [name for name, result in results.items() if result != "caught"]
    print(f"{len(results) - len(missed)} of {len(results)} caught"
          + (f"; not caught: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


def run(m: Mutation, copy: Path) -> str:
    """Apply `m` to the copy, run its tests, restore the file: caught, survived, stale or error."""
    path = copy / m.file
    original = path.read_text()
    if original.count(m.text) != 1:
        return "stale"
    path.write_text(original.replace(m.text, m.replacement))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               *(f"tests/{test}" for test in m.tests), *(["--runslow"] if m.slow else [])]
    try:
        start = time.time()
        out = subprocess.run(command, cwd=copy, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        path.write_text(original)
    if out.returncode in (0, 1):  # pytest: all passed / some failed
        return "caught" if out.returncode else "survived"
    print(f"{m.name}: pytest exited {out.returncode} after {time.time() - start:.0f} s\n"
          f"{out.stdout[-2000:]}", file=sys.stderr)
    return "error"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
