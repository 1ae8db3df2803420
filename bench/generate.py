"""SALM.generate against Hugging Face `generate` on the bare LLM: decode tokens/s (goal >= 0.95x),
and batched inference RTFx against one clip at a time (goal >= 4x), on the demo validation clips.

    python -m bench.generate              # configs/salm.yaml, batch 16, 32 new tokens, on the CPU
    python -m bench.generate --preset large --device cuda --dtype bfloat16 --batch 64

Greedy, every answer forced to exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens),
so both sides do the same work. Decode tokens/s: one clip, the tokens after the first over the time
from the first to the last, clocked inside the call; the bare LLM gets random token ids as long as
the prompt SALM builds for that clip (text tokens + audio frames). RTFx = audio s / wall s.
"""
import statistics
import time

import torch
from lhotse import CutSet
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from bench import common
from data import load_audio, right_pad
from salm import DEFAULT_ASR_PROMPT


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, "configs/salm.yaml")
    p.add_argument("--clips", default="assets/demo/asr_val",
                   help="a lhotse Shar directory of speech clips")
    p.add_argument("--batch", type=int, default=16,
                   help="clips per batch (the first ones of --clips)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer")
    args = p.parse_intermixed_args(argv)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 "
                         "(decoding is timed from the first token on)")
    device, dtype = common.setup(args)
    model = common.build_model(common.load(args)["model"], device, dtype).eval()

    cuts = list(CutSet.from_shar(in_dir=args.clips).subset(first=args.batch))
    clips = [torch.from_numpy(load_audio(cut, model.sampling_rate)) for cut in cuts]
    audio_seconds = sum(len(c) for c in clips) / model.sampling_rate
    prompt = [{"role": "user", "content": f"{DEFAULT_ASR_PROMPT} {model.audio_locator_tag}"}]

    def salm(clip_list: list[torch.Tensor], clock: TokenClock | None = None) -> None:
        audios, audio_lens = right_pad(clip_list, 0.0)
        out = model.generate([prompt] * len(clip_list), audios=audios, audio_lens=audio_lens,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             stopping_criteria=StoppingCriteriaList([clock] if clock else []))
        assert out.shape == (len(clip_list), args.new_tokens), out.shape
        if clock:
            clock.lap()

    # the bare LLM's prompt: as many positions as SALM's for the first clip (its tag: audio frames)
    with torch.no_grad():
        _, frames = model.perception(clips[0][None].to(device),
                                     torch.tensor([len(clips[0])], device=device))
    prompt_len = len(model.encode_dialog(prompt)["input_ids"]) - 1 + int(frames[0])
    prompt_ids = torch.randint(model.text_vocab_size, (1, prompt_len), device=device)
    config = GenerationConfig(bos_token_id=model.text_bos_id, eos_token_id=model.text_eos_id,
                              pad_token_id=model.text_pad_id, do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def bare_llm(clock: TokenClock) -> None:
        out = model.llm.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 generation_config=config,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape == (1, prompt_len + args.new_tokens), out.shape
        clock.lap()

    salm_clock, llm_clock = TokenClock(device), TokenClock(device)
    times = common.measure({
        "salm": lambda: salm(clips[:1], salm_clock), "llm": lambda: bare_llm(llm_clock),
        "batched": lambda: salm(clips), "one_by_one": lambda: [salm([clip]) for clip in clips],
    }, args.reps, args.warmup, device)
    salm_tps, llm_tps = (statistics.median(c.rates[args.warmup:]) for c in (salm_clock, llm_clock))
    batched_rtfx, single_rtfx = (audio_seconds / times[k] for k in ("batched", "one_by_one"))
    print(f"prompt {prompt_len} positions | {args.new_tokens} new tokens | {len(clips)} clips, "
          f"{audio_seconds:.1f} audio seconds | median of {args.reps}")
    print(f"decode: SALM {salm_tps:.1f} tokens/s | bare LLM (HF generate) {llm_tps:.1f} tokens/s | "
          f"whole call: SALM {1000 * times['salm']:.1f} ms, bare LLM {1000 * times['llm']:.1f} ms")
    print(f"RTFx: batch of {len(clips)} {batched_rtfx:.1f} | one clip at a time {single_rtfx:.1f}")
    common.result(("salm_decode_over_hf", salm_tps / llm_tps, "x", ">= 0.95x"),
                  ("batched_rtfx_over_one_by_one", batched_rtfx / single_rtfx, "x", ">= 4x"))


class TokenClock(StoppingCriteria):
    """Stops nothing: notes when each new token is ready, so that decoding is timed apart from the
    prompt's processing (perception, prefill) within the same call."""

    def __init__(self, device: torch.device):
        self.device, self.stamps, self.rates = device, [], []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        common.sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)

    def lap(self) -> None:
        """Close a call: its decode tokens/s (the tokens after the first)."""
        self.rates.append((len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0]))
        self.stamps = []


if __name__ == "__main__":
    common.cli(main)
