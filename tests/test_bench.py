"""Each bench script runs at its smallest sizes and ends with a RESULT line of finite, positive figures."""
import math

import pytest

from bench import common, data, duplex, encoder, generate, train_step

QUICK = ["--reps", "1", "--warmup", "0", "--device", "cpu"]


def run(main, argv: list[str], capsys) -> dict[str, float]:
    main(argv + QUICK)
    figures = common.parse_result(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures and all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    return figures


def test_result_line_round_trips():
    line = "RESULT a_over_b=1.42x (goal <= 1.3x) peak_mem=0.25GB mfu=41.5% rtf=0.04 tiny=1e-07"
    assert common.parse_result(line) == {"a_over_b": 1.42, "peak_mem": 0.25, "mfu": 41.5, "rtf": 0.04, "tiny": 1e-07}
    with pytest.raises(ValueError, match="not a RESULT line"):
        common.parse_result("median of 5: 1.0 ms")


def test_train_step(capsys):
    figures = run(train_step.main, ["data.train_ds.batch_size=2"], capsys)
    assert set(figures) == {"salm_step_over_llm_step", "salm_over_llm_plus_perception", "peak_mem", "peak_mem_over_static"}


def test_data(capsys):
    figures = run(data.main, ["data.train_ds.batch_size=2", "--batches", "2", "--steps", "1"], capsys)
    assert set(figures) == {"loader_over_training"}


def test_generate(capsys):
    figures = run(generate.main, ["--batch", "2", "--new-tokens", "4"], capsys)
    assert set(figures) == {"salm_decode_over_hf", "batched_rtfx_over_one_by_one"}


def test_encoder_matches_parakeet(capsys):
    encoder.main(["--batch", "2", "--seconds", "1"] + QUICK)
    figures = common.parse_result(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["parakeet_over_ours"] > 0 and math.isfinite(figures["parakeet_over_ours"])
    assert 0 <= figures["max_abs_diff"] < 1e-4


def test_duplex(capsys):
    figures = run(duplex.main, ["--seconds", "1"], capsys)
    for name in ("s2s_duplex", "s2s_duplex_speech_decoder"):
        assert figures[f"{name}_ms_per_frame"] > 0 and figures[f"{name}_rtf"] > 0
    assert "s2s_duplex_speech_decoder_nocache_over_cache" in figures
    for name in ("s2s_duplex_stream", "s2s_duplex_speech_decoder_stream"):
        assert {f"{name}_ms_per_frame", f"{name}_p99_ms", f"{name}_cpu_ms_per_frame"} <= set(figures)


def test_encoder_refuses_a_streaming_config():
    with pytest.raises(ValueError, match="causal_downsampling=True"):
        encoder.main(["--config", "configs/s2s_duplex.yaml"] + QUICK)
