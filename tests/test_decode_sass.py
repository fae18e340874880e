"""eval/decode_sass: the decode kernel compiles for sm_90 without a GPU (a subprocess: the tests run interpreted),
the loop it reports is the tile loop (it holds the MMAs), and the word-based FP16 rebuild needs fewer instructions
per tile than the integer rebuild, without spilling."""

import json
import os
import subprocess
import sys

import pytest
from hf_turbo.eval.decode_sass import _tool


def decode_sass_rows(tmp_path, bits: str, variants: str) -> list[dict]:
    """The rows of ``python -m hf_turbo.eval.decode_sass`` for ``bits`` and ``variants`` (skips without Triton's
    bundled ptxas/cuobjdump)."""
    if not all(os.path.exists(_tool(t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "hf_turbo.eval.decode_sass", "--bits", bits, "--variants", variants,
           "--out-dir", str(tmp_path)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    return json.loads((tmp_path / "decode_sass.json").read_text())["rows"]


def test_words_rebuild_has_the_shorter_tile_loop(tmp_path):
    rows = decode_sass_rows(tmp_path, "4", "int,words")
    assert len(rows) == 4 and all(r["loop_mma"] > 0 and 0 < r["registers"] <= 255 for r in rows)
    by = {(r["rebuild"], r["num_warps"]): r for r in rows}
    for warps in (4, 2):
        assert by[("words", warps)]["loop_instructions"] < by[("int", warps)]["loop_instructions"]
    assert by[("words", 4)]["stack_bytes"] == 0
