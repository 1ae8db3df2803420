"""Each bench script runs at its smallest sizes and ends with a RESULT line. Figures that are ratios
of timed calls are checked against hand-computed values: `common.measure` runs each call once and
reports chosen times, so a script that divides the wrong times (or drops a figure) fails."""
import math

import pytest

from bench import common, data, duplex, encoder, generate, train_step

QUICK = ["--reps", "1", "--warmup", "0", "--device", "cpu"]


def run(main, argv: list[str], capsys, monkeypatch, seconds: dict | None = None) -> dict:
    """The RESULT figures of `main`; with `seconds`, common.measure reports those times."""
    if seconds is not None:
        def measure(fns, reps, warmup, device):
            for fn in fns.values():
                fn()  # the real work, once
            return {name: seconds[name] for name in fns}

        monkeypatch.setattr(common, "measure", measure)
    main(argv + QUICK)
    return common.parse_result(capsys.readouterr().out.strip().splitlines()[-1])


def test_result_line_round_trips():
    line = "RESULT a_over_b=1.42x (goal <= 1.3x) peak_mem=0.25GB mfu=41.5% rtf=0.04 tiny=1e-07"
    assert common.parse_result(line) == {"a_over_b": 1.42, "peak_mem": 0.25, "mfu": 41.5, "rtf": 0.04, "tiny": 1e-07}
    with pytest.raises(ValueError, match="not a RESULT line"):
        common.parse_result("median of 5: 1.0 ms")


def test_train_step(capsys, monkeypatch):
    figures = run(train_step.main, ["data.train_ds.batch_size=2"], capsys, monkeypatch,
                  {"salm": 0.030, "llm": 0.020, "perception": 0.005})
    assert set(figures) == {"salm_step_over_llm_step", "salm_over_llm_plus_perception", "peak_mem",
                            "peak_mem_over_static"}
    assert figures["salm_step_over_llm_step"] == pytest.approx(1.5)  # 30 ms / 20 ms
    assert figures["salm_over_llm_plus_perception"] == pytest.approx(1.2)  # 30 ms / (20 + 5) ms


def test_data(capsys, monkeypatch):
    argv = ["data.train_ds.batch_size=2", "--batches", "2", "--steps", "1"]
    figures = run(data.main, argv, capsys, monkeypatch)
    assert set(figures) == {"loader_over_training"}  # timed by the script, not by common.measure
    assert math.isfinite(figures["loader_over_training"]) and figures["loader_over_training"] > 0


def test_generate(capsys, monkeypatch):
    figures = run(generate.main, ["--batch", "2", "--new-tokens", "4"], capsys, monkeypatch,
                  {"salm": 0.1, "llm": 0.1, "batched": 0.05, "one_by_one": 0.2})
    assert set(figures) == {"salm_decode_over_hf", "batched_rtfx_over_one_by_one"}
    assert figures["batched_rtfx_over_one_by_one"] == pytest.approx(4.0)  # in 50 ms, not 200 ms
    decode = figures["salm_decode_over_hf"]  # timed by the script's token clocks
    assert math.isfinite(decode) and decode > 0


def test_encoder_matches_parakeet(capsys, monkeypatch):
    figures = run(encoder.main, ["--batch", "2", "--seconds", "1"], capsys, monkeypatch,
                  {"ours": 0.010, "theirs": 0.025})
    assert figures["parakeet_over_ours"] == pytest.approx(2.5)
    assert 0 <= figures["max_abs_diff"] < 1e-4  # transformers' ParakeetEncoder is the reference


def test_duplex(capsys, monkeypatch):
    seconds = {"s2s_duplex": 0.7, "s2s_duplex_speech_decoder": 1.4,
               "s2s_duplex_speech_decoder_nocache": 4.2, "s2s_duplex_stream": 0.8,
               "s2s_duplex_speech_decoder_stream": 1.6}
    figures = run(duplex.main, ["--seconds", "1"], capsys, monkeypatch, seconds)
    for name in ("s2s_duplex", "s2s_duplex_speech_decoder"):  # 1 s, causal encoder: 14 frames
        assert figures[f"{name}_ms_per_frame"] == pytest.approx(1000 * seconds[name] / 14, rel=1e-3)
        assert figures[f"{name}_rtf"] == pytest.approx(seconds[name])
    assert figures["s2s_duplex_speech_decoder_nocache_over_cache"] == pytest.approx(3.0)
    for name in ("s2s_duplex_stream", "s2s_duplex_speech_decoder_stream"):  # timed per live step
        stream = [figures[f"{name}_{k}"] for k in ("ms_per_frame", "p99_ms", "cpu_ms_per_frame")]
        assert all(math.isfinite(v) and v > 0 for v in stream) and stream[1] >= stream[0]


def test_encoder_refuses_a_streaming_config():
    with pytest.raises(ValueError, match="causal_downsampling=True"):
        encoder.main(["--config", "configs/s2s_duplex.yaml"] + QUICK)
