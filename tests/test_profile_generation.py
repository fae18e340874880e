"""The per-token clock of eval/profile_generation.py on the CPU (the profile itself needs CUDA): one stamp per
generated token through generate's streamer hook, and the step statistics. Nothing is timed against a bound."""

import torch
from hf_turbo.eval.bench_throughput import build_model, make_cache
from hf_turbo.eval.profile_generation import TokenClock, step_stats

from hf_turbo.generate import cache_kwarg


def test_token_clock_stamps_every_step(one_thread):
    model = build_model("tiny", torch.device("cpu"), torch.float32)
    model.set_attn_implementation("turbo")
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    clock = TokenClock(torch.device("cpu"))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, streamer=clock, **{cache_kwarg(): make_cache("turbo-mixed25-r64", model)})
    assert out.shape[1] == 46
    assert len(clock.stamps) == 1 + 6  # the prompt, then one per generated token
    steps = clock.step_ms()
    assert len(steps) == 5 and all(t >= 0 for t in steps)


def test_step_stats():
    s = step_stats([1.0, 9.0, 2.0, 3.0])
    assert s == dict(step_median_ms=2.5, step_max_ms=9.0, step_mean_ms=3.75)
    assert step_stats([4.0])["step_median_ms"] == 4.0
    assert step_stats([])["step_max_ms"] != step_stats([])["step_max_ms"]  # NaN


def test_layer_parts_on_cpu(one_thread):
    """The per-part host timing runs for SDPA and turbo (reference path here) and reports every part; the attention
    function is called on a layer whose update just ran (turbo reads the layer's state through the placeholders)."""
    from hf_turbo.eval.profile_generation import layer_parts

    model = build_model("tiny", torch.device("cpu"), torch.float32)
    for method in ("sdpa", "turbo4"):
        rows = layer_parts(model, method, 2, 100, 5, torch.device("cpu"))
        assert [r["part"] for r in rows] == ["attention module step", "cache update", "attention function"]
        assert all(r["method"] == method and 0 < r["min_us"] <= r["median_us"] for r in rows)
