"""The throughput benchmark's CPU smoke path (tiny random Llama): every turbo method builds its cache and runs the
whole protocol (warm-up, max batch, ladder, JSON + plot); unknown methods are refused. No timing is asserted."""

import argparse
import json

import pytest
import torch
from hf_turbo.eval import bench_throughput as bt


def _args(tmp_path, methods, *extra):
    ap = argparse.ArgumentParser()
    bt.add_arguments(ap)
    return ap.parse_args(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--lengths", "96:4",
                          "--ladder", "1", "--methods", methods, "--name", "tp_smoke", "--out-dir", str(tmp_path),
                          *extra])


def test_cpu_smoke_run(tmp_path, one_thread):
    methods = ["sdpa", *bt.TURBO_METHODS]
    assert bt.run(_args(tmp_path, ",".join(methods), "--repeats", "3")) == 0
    rec = json.loads((tmp_path / "tp_smoke.json").read_text())
    assert rec["skipped"] == {}
    assert sorted({r["method"] for r in rec["rows"]}) == sorted(methods)
    runs = rec["all_rows"]
    assert all(r["decode_tok_s"] > 0 and r["kv_bytes_per_token"] > 0 for r in runs)
    # --repeats 3: the reported run is the median of its three by tokens/s
    assert all(sorted(r["decode_tok_s_runs"])[1] == r["decode_tok_s"] for r in runs)
    # 100 cached tokens: turbo-mixed25-r64 keeps the newest 64 uncompressed, so it holds more bytes than turbo4
    per_tok = {r["method"]: r["kv_bytes_per_token"] for r in runs if r["batch"] == 1}
    assert per_tok["turbo-mixed25-r64"] > per_tok["turbo4"]
    assert (tmp_path / "tp_smoke.png").stat().st_size > 1000


def test_batch1_latency_rounds(tmp_path, one_thread):
    """--latency-repeats: every method once per round, the medians and their ratio to SDPA in <name>_batch1.json."""
    assert bt.run(_args(tmp_path, "sdpa,turbo4", "--latency-repeats", "3", "--latency-new", "3", "--latency-only")) == 0
    assert not (tmp_path / "tp_smoke.json").exists()  # --latency-only: no throughput jobs
    rec = json.loads((tmp_path / "tp_smoke_batch1.json").read_text())
    assert {k: len(v) for k, v in rec["samples"].items()} == {"96/sdpa": 3, "96/turbo4": 3}
    rows = {r["method"]: r for r in rec["rows"]}
    assert rows["sdpa"]["ratio_vs_sdpa"] == 1.0
    t4 = rows["turbo4"]
    assert t4["tpot_ms_min"] <= t4["tpot_ms_median"] <= t4["tpot_ms_max"]
    assert t4["ratio_vs_sdpa"] == t4["tpot_ms_median"] / rows["sdpa"]["tpot_ms_median"]
    # inter-token latency: each run's median gap between its 3 steps (2 gaps), then the median over runs
    itl = rec["itl_samples"]["96/turbo4"]
    assert len(itl) == 3 and all(x > 0 for x in itl) and t4["itl_ms_median"] == sorted(itl)[1]
    sdpa_itl = rec["itl_samples"]["96/sdpa"]
    assert t4["itl_ratio_paired_median"] == sorted(x / y for x, y in zip(itl, sdpa_itl))[1]


def test_step_clock_notes_every_step(one_thread):
    """The clock is called once per generated token and never stops generation."""
    from transformers import StoppingCriteriaList

    model = bt.build_model("tiny", torch.device("cpu"), torch.float32)
    clock = bt.StepClock()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([clock]))
    assert out.shape[1] == 9 and len(clock.times) == 4 and len(clock.gaps_ms()) == 3


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        bt.run(_args(tmp_path, "sdpa,turbo5"))


def test_kv_memory_vs_context(tmp_path, one_thread):
    """--memory-contexts/--memory-only: bytes read from each cache object at each context, no model built; the
    FP16 cache holds exactly the theoretical bytes, ours fewer, the residual setting more than all-INT4."""
    assert bt.run(_args(tmp_path, "sdpa,sdpa-flash,turbo4,turbo-mixed,turbo-mixed25-r64", "--memory-contexts",
                        "64,100,1000", "--memory-only")) == 0
    assert not (tmp_path / "tp_smoke.json").exists()
    rec = json.loads((tmp_path / "tp_smoke_memory.json").read_text())
    rows = {(r["method"], r["context"]): r for r in rec["rows"]}
    assert {m for m, _ in rows} == {"sdpa", "turbo4", "turbo-mixed", "turbo-mixed25-r64"}  # sdpa-flash: same cache
    cfg = bt.shape_config("tiny")
    fp16 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    for c in (64, 100, 1000):
        assert rows[("sdpa", c)]["kv_bytes"] == 2 * fp16 * c  # float32 in this smoke run; the ratio is to FP16
        assert rows[("turbo4", c)]["ratio_vs_fp16"] > 1
        assert rows[("turbo-mixed", c)]["kv_bytes"] < rows[("turbo4", c)]["kv_bytes"]
        assert rows[("turbo-mixed25-r64", c)]["kv_bytes"] > rows[("turbo-mixed", c)]["kv_bytes"]
    # the uncompressed buffer (36 and 40 tokens here) costs less per token the longer the context; 64 tokens fill
    # exactly one compressed block, the floor
    per_tok = {c: rows[("turbo4", c)]["kv_bytes_per_token"] for c in (64, 100, 1000)}
    assert per_tok[64] < per_tok[1000] < per_tok[100]
    assert (tmp_path / "tp_smoke_memory.png").stat().st_size > 1000
