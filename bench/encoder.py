"""Our FastConformer (perception.ConformerEncoder) against transformers.ParakeetEncoder with the
same weights and input: their time / ours (goal >= 1.0x) and the largest difference of outputs.

    python -m bench.encoder                 # the encoder of configs/salm.yaml, 4 clips of 10 s
    python -m bench.encoder --preset large --device cuda --dtype bfloat16 --batch 16 --seconds 20

Inference (eval, no grad) on random mel features; the clips of a batch have different lengths, so
both build their padding masks. Outputs are compared on valid frames only (padding differs).
"""
import inspect
import math

import torch
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from bench import common
from checkpoint import nemo_state_from_parakeet
from perception import ConformerEncoder

MEL_FRAMES_PER_SECOND = 100  # the 10 ms hop of the mel frontend
# The options ParakeetEncoder has (an offline FastConformer), as our constructor spells them.
PARAKEET_OPTIONS = dict(
    subsampling=["dw_striding"], causal_downsampling=[False], self_attention_model=["rel_pos"],
    att_context_size=[None, [-1, -1]], conv_norm_type=["batch_norm"], conv_context_size=[None],
    untie_biases=[True], use_bias=[True], feat_out=[-1])


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, "configs/salm.yaml", reps=10)
    p.add_argument("--batch", type=int, default=4, help="clips per batch")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the longest clip")
    args = p.parse_intermixed_args(argv)
    device, dtype = common.setup(args)
    encoder_cfg = common.load(args)["model"]["perception"]["encoder"]

    theirs = ParakeetEncoder(parakeet_config(encoder_cfg))
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial weights everywhere (the default init: norms 1, biases 0)
        for param in theirs.parameters():
            scale = 1 / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.3
            param.copy_(torch.randn_like(param) * scale)
    ours = ConformerEncoder(**encoder_cfg)
    ours.load_state_dict(nemo_state_from_parakeet(theirs.state_dict()), strict=True)
    theirs, ours = theirs.to(device, dtype).eval(), ours.to(device, dtype).eval()

    T = int(args.seconds * MEL_FRAMES_PER_SECOND)
    lengths = (T * torch.linspace(1.0, 0.6, args.batch)).long().to(device)  # (B,)
    valid = torch.arange(T, device=device) < lengths[:, None]  # (B, T)
    features = torch.randn(args.batch, encoder_cfg["feat_in"], T, device=device, dtype=dtype)
    features = features * valid[:, None]  # (B, F, T)
    outputs = {}
    with torch.no_grad():
        times = common.measure({
            "ours": lambda: outputs.update(ours=ours(features, lengths)),
            "theirs": lambda: outputs.update(
                theirs=theirs(features.transpose(1, 2), attention_mask=valid)),
        }, args.reps, args.warmup, device)
    encoded, encoded_lens = outputs["ours"]  # (B, D, T')
    expected = outputs["theirs"].last_hidden_state.transpose(1, 2)  # (B, D, T')
    if encoded_lens.tolist() != outputs["theirs"].attention_mask.sum(-1).tolist():
        raise RuntimeError("the two encoders disagree on the output lengths")
    max_diff = max(float((encoded[i, :, :n] - expected[i, :, :n]).abs().max())
                   for i, n in enumerate(encoded_lens.tolist()))
    print(f"encoder: {sum(p.numel() for p in ours.parameters()):,} parameters, d_model "
          f"{encoder_cfg['d_model']}, {encoder_cfg['n_layers']} layers | input {args.batch} x {T} "
          f"mel frames -> {encoded.size(-1)} frames")
    print(f"median of {args.reps}: ours {1000 * times['ours']:.1f} ms | ParakeetEncoder "
          f"{1000 * times['theirs']:.1f} ms | max abs diff {max_diff:.2e} (output abs mean "
          f"{float(expected.abs().mean()):.2f})")
    common.result(("parakeet_over_ours", times["theirs"] / times["ours"], "x", ">= 1.0x"),
                  ("max_abs_diff", max_diff, "", None))


def parakeet_config(encoder_cfg: dict) -> ParakeetEncoderConfig:
    """The ParakeetEncoderConfig of an encoder config section (no dropout: inference)."""
    defaults = {k: v.default for k, v in inspect.signature(ConformerEncoder).parameters.items()}
    get = lambda key: encoder_cfg.get(key, defaults[key])  # noqa: E731
    for key, supported in PARAKEET_OPTIONS.items():
        if get(key) not in supported:
            supported = " or ".join(map(repr, supported))
            raise ValueError(f"encoder.{key}={get(key)!r}: transformers' ParakeetEncoder only has "
                             f"{supported}; compare an offline FastConformer")
    return ParakeetEncoderConfig(
        hidden_size=get("d_model"), num_hidden_layers=get("n_layers"),
        num_attention_heads=get("n_heads"),
        intermediate_size=get("d_model") * get("ff_expansion_factor"),
        conv_kernel_size=get("conv_kernel_size"), subsampling_factor=get("subsampling_factor"),
        subsampling_conv_channels=get("subsampling_conv_channels"), num_mel_bins=get("feat_in"),
        scale_input=get("xscaling"), dropout=0.0, dropout_positions=0.0, layerdrop=0.0,
        activation_dropout=0.0, attention_dropout=0.0)


if __name__ == "__main__":
    common.cli(main)
