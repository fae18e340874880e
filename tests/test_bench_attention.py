"""eval/bench_attention's derived columns (no GPU): speedups against SDPA at the same shape and % of the measured
limits, on hand-made rows whose answers are known; and ``--derive`` on records in a temporary results folder."""

import json

import pytest
from hf_turbo.eval import bench_attention as ba

CEILINGS = [dict(what="device-to-device copy 1 GiB", value=3000.0, unit="GB/s (read+write)"),
            dict(what="fp16 matmul 8192^3", value=700.0, unit="TFLOPS"),
            dict(what="int8 matmul 8192^3 (torch._int_mm)", value=1400.0, unit="TOPS"),
            dict(what="fp8 matmul", value=None, unit="RuntimeError('no fp8')")]


def test_decode_speedup_and_pct_of_copy():
    rows = [dict(kernel="SDPA flash FP16 cache", B=16, ctx=4096, us=100.0, gbps=2400.0),
            dict(kernel="SDPA cudnn FP16 cache", B=16, ctx=4096, us=80.0, gbps=3000.0),
            dict(kernel="turbo 4-bit", B=16, ctx=4096, us=25.0, gbps=1500.0),
            dict(kernel="turbo 4-bit", B=64, ctx=4096, us=50.0, gbps=1500.0),  # no SDPA row at this shape
            dict(kernel="turbo 2-bit", B=16, ctx=4096, us=None, error="OOM")]
    out = ba.derive("decode", rows, CEILINGS)
    assert [r["speedup_vs_sdpa_flash"] for r in out] == [1.0, 1.25, 4.0, None, None]
    assert [r["pct_of_copy"] for r in out] == [80.0, 100.0, 50.0, 50.0, None]


def test_prefill_pct_of_peak_uses_each_products_rate():
    shape = dict(d=128, S=16384, causal=True)
    rows = [dict(kernel=ba.SDPA_FLASH, tflops=350.0, **shape), dict(kernel=ba.SDPA_CUDNN, tflops=560.0, **shape),
            dict(kernel="turbo exp2, FP16 PV", tflops=700.0, **shape),  # INT8 Q.K^T, FP16 P.V
            dict(kernel="turbo exp2, INT8 PV", tflops=700.0, **shape),
            dict(kernel=ba.SAGE, tflops=466.0, **dict(shape, causal=False)),  # no SDPA rows for full attention
            dict(kernel="something else", tflops=1.0, **shape)]
    out = ba.derive("prefill", rows, CEILINGS)
    mixed = 1 / (0.5 / 1400 + 0.5 / 700)  # 933.3 TFLOPS-eq
    assert out[0]["pct_of_peak"] == pytest.approx(50.0) and out[1]["speedup_vs_sdpa_flash"] == pytest.approx(1.6)
    assert out[2]["pct_of_peak"] == pytest.approx(100 * 700 / mixed)
    assert out[2]["speedup_vs_sdpa_flash"] == pytest.approx(2.0) and out[2]["speedup_vs_cudnn"] == pytest.approx(1.25)
    assert out[3]["pct_of_peak"] == pytest.approx(50.0)
    assert out[4]["pct_of_peak"] == pytest.approx(100 * 466 / mixed) and out[4]["speedup_vs_sdpa_flash"] is None
    assert out[5]["pct_of_peak"] is None  # an unknown kernel has no known limit
    assert ba.derive("prefill", [dict(kernel=ba.SDPA_FLASH, tflops=1.0, **shape)], [])[0]["pct_of_peak"] is None


def test_derive_rewrites_the_records_on_disk(tmp_path, monkeypatch):
    from hf_turbo.eval import results

    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    (tmp_path / "attention_ceilings.json").write_text(json.dumps(dict(rows=CEILINGS, device="GPU X", date="d0")))
    rec = dict(name="attention_decode", command="python -m hf_turbo.eval.bench_attention", device="GPU X",
               date="d1", columns=["kernel", "us"], notes="walks.",
               rows=[dict(kernel="SDPA flash FP16 cache", B=1, ctx=4096, us=40.0, gbps=600.0),
                     dict(kernel="turbo 4-bit", B=1, ctx=4096, us=20.0, gbps=300.0)])
    (tmp_path / "attention_decode.json").write_text(json.dumps(rec))
    for _ in range(2):  # idempotent: the limits sentence is replaced, not appended again
        assert ba.derive_records() == [tmp_path / "attention_decode.json"]
    new = json.loads((tmp_path / "attention_decode.json").read_text())
    assert (new["date"], new["device"], new["command"]) == ("d1", "GPU X", rec["command"])  # as measured
    assert new["columns"] == ba.DECODE_COLUMNS and new["rows"][1]["speedup_vs_sdpa_flash"] == 2.0
    assert new["rows"][1]["pct_of_copy"] == 10.0
    assert new["notes"].startswith("walks." + ba.LIMITS_MARK) and new["notes"].count(ba.LIMITS_MARK) == 1
    assert "attention_ceilings.json (GPU X, d0)" in new["notes"] and new["derived"]["ceilings"].endswith("d0)")
    # a record of another GPU gets no % of limit from these ceilings (its ratios need no ceilings)
    (tmp_path / "attention_decode.json").write_text(json.dumps(dict(rec, device="GPU Y")))
    ba.derive_records()
    other = json.loads((tmp_path / "attention_decode.json").read_text())
    assert other["rows"][1]["pct_of_copy"] is None and other["rows"][1]["speedup_vs_sdpa_flash"] == 2.0


def test_recorded_ceilings_only_for_their_device(tmp_path, monkeypatch):
    from hf_turbo.eval import results

    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert ba._ceilings_on_disk() == ([], "no recorded run on this device (none measured)")
    (tmp_path / "attention_ceilings.json").write_text(json.dumps(dict(rows=CEILINGS, device="GPU X", date="d0")))
    assert ba._ceilings_on_disk("GPU X")[0] == CEILINGS and ba._ceilings_on_disk()[0] == CEILINGS
    assert ba._ceilings_on_disk("GPU Y")[0] == []  # another GPU's ceilings are not this one's limits
