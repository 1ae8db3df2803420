"""SALM training step time / the bare LLM's training step on the same tokens (goal <= 1.3x), and a
step's peak memory.

    python -m bench.train_step            # configs/salm.yaml: the tiny model, on the CPU
    python -m bench.train_step --preset large --dtype bfloat16 data.train_ds.batch_size=16

SALM step: the next batch of TrainBatches (the configured num_workers) -> to_device ->
training_step -> backward -> optimizer step. LLM step: the same LLM, forward and backward of a
cross-entropy on random token ids shaped (B, T) like the spliced sequence the LLM read in the SALM
step before it, and the same optimizer step (only the LLM has gradients then). The ratio is what
data, perception, splicing and the loss add. Peak memory of the first SALM step (which also
allocates the optimizer state): torch.cuda.max_memory_allocated on a GPU; on the CPU the weights'
bytes plus how far the step raised the process's peak resident memory (an upper bound).
"""
import resource
import statistics

import torch
import torch.nn.functional as F

from bench import common
from data import TrainBatches
from salm import SALM
from train import build_optimizer, to_device


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, "configs/salm.yaml")
    p.add_argument("--peak-tflops", type=float,
                   help="dense peak of the device for --dtype (default: by GPU name)")
    args = p.parse_intermixed_args(argv)
    device, dtype = common.setup(args)
    cfg = common.load(args)

    model = common.build_model(cfg["model"], device, dtype).train()
    if not isinstance(model, SALM):
        raise ValueError(f"{args.config} builds a {type(model).__name__}; "
                         "bench.train_step measures SALM")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg["model"].get("optimizer"), params)
    stream = iter(TrainBatches(cfg["data"]["train_ds"], model.make_dataset(cfg["data"])))

    # What each SALM step fed its LLM (a hook sees its shape) and encoder, and the bare LLM step's
    # positions: tensors, no host sync in a step. Batches differ in size: MFU takes FLOPs and time
    # over all the timed steps.
    seen = {"llm_shape": None, "salm": [], "llm": []}

    def record_llm_input(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:  # SALM's call, not the bare LLM step's
            seen["llm_shape"] = kwargs["inputs_embeds"].shape[:2]

    model.llm.register_forward_pre_hook(record_llm_input, with_kwargs=True)

    def salm_step():
        batch = to_device(next(stream), device)
        seen["audios"], seen["audio_lens"] = batch["audios"], batch["audio_lens"]
        out = model.training_step(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        frames = model.perception.output_lengths(batch["audio_lens"]).sum()
        seen["salm"].append((out["num_tokens"], frames))

    def perception_step():  # the perception alone on the SALM step's audio, backward of a sum
        embeds, _ = model.perception(seen["audios"], seen["audio_lens"])
        embeds.sum().backward()
        optimizer.zero_grad(set_to_none=True)

    def llm_step():
        ids = torch.randint(model.text_vocab_size, seen["llm_shape"], device=device)  # (B, T)
        logits = model.llm(input_ids=ids).logits  # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        optimizer.step()  # parameters without a gradient (the perception's) are skipped
        optimizer.zero_grad(set_to_none=True)
        seen["llm"].append(ids.numel())

    # Peak memory of one SALM step, the first, which also allocates the optimizer state.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_bytes()
    salm_step()
    common.sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else weights + peak_rss_bytes() - rss_before)
    grads = sum(p.numel() * p.element_size() for p in params)
    optimizer_state = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    static = weights + grads + optimizer_state

    every = {}  # seconds of every timed call
    times = common.measure({"salm": salm_step, "llm": llm_step, "perception": perception_step},
                           args.reps, args.warmup, device, every)
    ratio = times["salm"] / times["llm"]
    glue = times["salm"] / (times["llm"] + times["perception"])  # data + splicing + loss
    B, T = seen["llm_shape"]
    tokens, frames = (float(torch.stack(n).float().mean()) for n in zip(*seen["salm"][-args.reps:]))
    print(f"SALM: {matmul_params(model.llm):,} LLM + {matmul_params(model.perception):,} "
          f"perception parameters; LLM input {B}x{T}: {tokens:.0f} tokens and {frames:.0f} "
          "encoder frames per step")
    salm_flops = train_flops(model.llm, tokens) + train_flops(model.perception, frames)  # a step
    llm_flops = train_flops(model.llm, statistics.mean(seen["llm"][-args.reps:]))
    print(f"median of {args.reps}: SALM step {1000 * times['salm']:.1f} ms | bare LLM step "
          f"{1000 * times['llm']:.1f} ms | model FLOPs SALM / LLM {salm_flops / llm_flops:.2f}x "
          "(the time ratio at equal FLOP rates)")
    print(f"perception alone (forward + backward) {1000 * times['perception']:.1f} ms | "
          f"SALM step / (LLM step + perception) {glue:.2f}x: what data, splicing and the loss add")
    print(f"peak memory {peak / 1e9:.3f} GB = {peak / static:.2f}x weights {weights / 1e9:.3f} + "
          f"grads {grads / 1e9:.3f} + optimizer state {optimizer_state / 1e9:.3f} GB")
    figures = [("salm_step_over_llm_step", ratio, "x", "<= 1.3x"),
               ("salm_over_llm_plus_perception", glue, "x", None),
               ("peak_mem", peak / 1e9, "GB", None),
               ("peak_mem_over_static", peak / static, "x", None),
               ("tokens_per_step", tokens, "", None)]
    peak_flops = common.peak_tflops(device, dtype, args.peak_tflops)
    if peak_flops:
        salm_mfu = salm_flops / statistics.mean(every["salm"]) / (peak_flops * 1e12)
        llm_mfu = llm_flops / statistics.mean(every["llm"]) / (peak_flops * 1e12)
        print(f"MFU at a {peak_flops:g} TFLOPs peak: SALM step {100 * salm_mfu:.1f}% | "
              f"LLM step {100 * llm_mfu:.1f}%")
        figures += [("salm_mfu", 100 * salm_mfu, "%", ">= 40%"),
                    ("llm_mfu", 100 * llm_mfu, "%", None)]
    common.result(*figures)


def train_flops(module: torch.nn.Module, positions: float) -> float:
    """Model FLOPs of a training step over `positions` inputs: (4 N + 2 N_trainable) x positions.
    2N forward, 2N for the activations' gradients, 2N for the weights that train (6N when all do),
    N counting the weights that multiply activations. Attention scores and the subsampling
    convolutions' extra positions are left out: a slight underestimate."""
    return (4 * matmul_params(module) + 2 * matmul_params(module, trainable_only=True)) * positions


def matmul_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters that multiply activations: all but an untied input embedding (a lookup)."""
    lookup = None
    if hasattr(module, "get_input_embeddings"):
        embedding = module.get_input_embeddings().weight
        lookup = None if embedding is module.get_output_embeddings().weight else embedding
    return sum(p.numel() for p in module.parameters()
               if p is not lookup and (p.requires_grad or not trainable_only))


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    common.cli(main)
