"""Write assets/tiny-mimi/: the offline default audio codec of the duplex models, a small Mimi.

Mimi (Kyutai's neural codec, `transformers.MimiModel`) takes 24 kHz audio to 12.5 frames per
second, one frame per 80 ms: exactly the frame of the duplex models. This one is shrunk to ~0.6 M
parameters (1 s encodes or decodes in a few ms on a CPU). No weights are shipped: for a directory
without weights, the model loader (`duplex_s2s.load_audio_codec`) builds the codec from config.json
with a fixed seed and seeded codebooks, so every run and every machine gets the same codec. It does
not sound like speech; it gives the models real, varied codec tokens to learn and a real decoder to
turn them back into a waveform.

    python scripts/make_tiny_codec.py                  # rewrites assets/tiny-mimi/config.json
"""

import argparse
from pathlib import Path

from transformers import MimiConfig

REPO = Path(__file__).resolve().parents[1]

CODEC_CONFIG = dict(
    sampling_rate=24000,
    upsampling_ratios=[8, 6, 5, 4],  # 960 samples per step (25 Hz), downsampled by 2: 12.5 Hz
    hidden_size=64,
    num_filters=8,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    upsample_groups=64,
    num_quantizers=8,
    num_semantic_quantizers=1,
    codebook_size=256,
    codebook_dim=64,
    vector_quantization_hidden_dimension=64,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "tiny-mimi")
    args = parser.parse_args()
    config = MimiConfig(architectures=["MimiModel"], **CODEC_CONFIG)
    if config.frame_rate != 12.5:
        raise SystemExit(f"the codec config gives {config.frame_rate} frames/s, not 12.5")
    args.out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)
    print(f"wrote {args.out / 'config.json'}: {config.num_quantizers} codebooks x "
          f"{config.codebook_size} codes, {config.frame_rate} frames/s at "
          f"{config.sampling_rate} Hz")


if __name__ == "__main__":
    main()
