"""What a GPU needs of a training step, checked on the CPU for every shipped config, padded batch:

* no attention row that sees nothing: cuDNN's attention (the default SDPA backend for bf16 on Hopper
  GPUs in torch >= 2.11) returns NaN gradients for a query row whose logsumexp is below about -88.7
  (ln FLT_MAX), which padded rows under a -10000 or boolean mask are;
* no host sync: the ops that make the host wait for the GPU (torch.cuda.set_sync_debug_mode("error")
  there) raise here, so a step runs ahead of the GPU until the log line reads its results.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import train
from config import load_config
from duplex_s2s import load_audio_codec

aten = torch.ops.aten
SMALL = ["data.train_ds.batch_size=3", "data.train_ds.num_workers=0", "trainer.precision=32"]
# ops that read a device value on the host (or size their output by one)
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.equal.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.bincount.default,
           aten.masked_scatter.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default}


class NoHostSync(TorchDispatchMode):
    """Raises on the aten ops that sync a GPU with the host, boolean-mask indexing included."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNCING or masks:
            raise AssertionError(f"{func} makes the host wait for the GPU")
        return func(*args, **(kwargs or {}))


class NoHostCopy(TorchFunctionMode):
    """Raises on tensor -> Python conversions that never reach the dispatcher on a CPU (copies to
    the host on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__):
            raise AssertionError(f"{func.__name__} copies a tensor to the host")
        return func(*args, **(kwargs or {}))


class AttentionRows(TorchFunctionMode):
    """The lowest logsumexp of a query row (scores * scale + mask, in fp32) of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.lowest = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.lowest.append(lowest_logsumexp(*args, **kwargs))
        return func(*args, **kwargs)


def lowest_logsumexp(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    q, k = q.detach().float(), k.detach().float()
    k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)  # grouped-query attention
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.size(-1)))  # (B, h, L, S)
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    if attn_mask is not None:
        mask = attn_mask.detach()
        boolean = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, -math.inf) if boolean else scores + mask.float()
    return float(scores.logsumexp(-1).min())


@pytest.fixture(scope="module", params=["salm", "s2s_duplex", "s2s_duplex_speech_decoder"])
def step(request, tmp_path_factory):
    """A run of the shipped config (train.setup) and a padded batch of it."""
    cfg = load_config(f"configs/{request.param}.yaml", SMALL, report=None)
    run = train.setup(cfg, torch.device("cpu"), 0, 1, None)
    batch = next(iter(run.batches))
    lens = batch.get("audio_lens", batch.get("source_audio_lens"))
    assert len(set(lens.tolist())) > 1  # clips of several lengths: padded
    return run, cfg, batch


def test_no_attention_row_sees_nothing(step):
    run, cfg, batch = step
    with AttentionRows() as rows:
        train.train_step(run, [batch], cfg["trainer"], torch.device("cpu"), None, train.Meter())
    assert len(rows.lowest) >= 3  # encoder, adapter or speech decoder, LLM
    assert min(rows.lowest) > -80, rows.lowest


def test_a_training_step_needs_no_host_sync(step, monkeypatch):
    run, cfg, batch = step
    if hasattr(run.model, "audio_codec"):  # the frozen codec's output is replayed: Hugging Face's
        # Mimi reads its conv padding from 0-dim buffers, on the host on a GPU (the next test), but
        # the same op as a sync here
        codes = run.model.audio_codec.encode(batch["target_audio"], batch["target_audio_lens"])
        monkeypatch.setattr(run.model.audio_codec, "encode", lambda audio, lens: codes)
    before = [p.detach().clone() for p in run.params]
    meter = train.Meter()
    with NoHostSync(), NoHostCopy():
        train.train_step(run, [batch], cfg["trainer"], torch.device("cpu"), None, meter)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params))  # it did update them
    summary = meter.summary(1, 0.0, torch.device("cpu"), {})
    assert math.isfinite(summary["loss"]) and summary["grad_norm"] > 0


def test_the_codec_keeps_its_padding_arithmetic_on_the_host():
    codec = load_audio_codec("assets/tiny-mimi").to("meta")  # a move, as to a GPU
    integers = [b for b in codec.buffers() if b.dim() == 0 and not b.is_floating_point()]
    assert integers and all(b.device.type == "cpu" for b in integers)
    assert all(p.device.type == "meta" for p in codec.parameters())
