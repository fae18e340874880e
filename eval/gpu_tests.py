"""Run the kernel test suites compiled on the GPU, and compute-sanitizer on a small generation; record the outcome.

    python -m hf_turbo.eval.gpu_tests [--workers N] [--sanitizer] [--sanitizer-walk] [--no-pytest]   # repo root, CUDA

* ``tests/gpu`` plus the interpreted kernel tests (``tests/test_kernels_*.py``) with ``HF_TURBO_GPU_TESTS=1``, so
  they run compiled on CUDA tensors at the sizes they define; the pytest log goes to
  ``eval/results/attention_gpu_tests.log``; ``--workers N`` spreads them over N pytest-xdist processes on the one
  GPU (Triton's compiles, on the CPU, are most of the suite's time);
* ``--sanitizer``: ``compute-sanitizer --tool memcheck`` on a tiny random Llama generating 80 tokens through turbo
  attention and TurboQuantCache (prefill, decode, one flush of the FP16 buffer into the packed pools); log in
  ``eval/results/compute_sanitizer.log``;
* ``--sanitizer-walk``: the same memcheck on ``kernels/decode_mma``'s walk, forced, at the shapes :func:`walk_check`
  lists (its outputs are also compared with the Triton walk); log in ``eval/results/compute_sanitizer_walk.log``.

Writes ``eval/results/gpu_tests.json`` (the test suites) and, with a sanitizer option, ``gpu_sanitizer.json`` /
``gpu_sanitizer_walk.json``: passed / failed / skipped, the names of failed tests. ``--no-pytest`` runs only the
sanitizers (after a kernel change that the suites already passed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from hf_turbo.eval.results import REPO_ROOT, RESULTS_DIR, write_result


def run_pytest(log_path, workers: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        files = ["tests/gpu"] + sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_kernels_*.py"))
        spread = ["-n", str(workers)] if workers > 1 else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *spread, f"--junitxml={xml}", *files]
        env = {**os.environ, "HF_TURBO_GPU_TESTS": "1"}
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        log_path.write_text(proc.stdout + proc.stderr)
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        if suite is None or suite.get("tests") is None:
            raise SystemExit(f"pytest wrote no test report (rc {proc.returncode}); log: {log_path}")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        n = int(suite.get("tests"))
        skipped = int(suite.get("skipped", 0))
        return dict(suite="tests/gpu + kernel tests compiled (HF_TURBO_GPU_TESTS=1)", passed=n - skipped - len(failed),
                    failed=len(failed), skipped=skipped, failed_tests=failed, command=" ".join(cmd[1:]))


def _memcheck(log_path, target: str, done: str, suite: str) -> dict:
    """compute-sanitizer memcheck on ``python -m hf_turbo.eval.gpu_tests --<target>``: passed when it reports 0
    errors and the run printed ``done``."""
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    cmd = [exe, "--tool", "memcheck", sys.executable, "-m", "hf_turbo.eval.gpu_tests", f"--{target}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    log_path.write_text(out)
    m = re.search(r"ERROR SUMMARY: (\d+) error", out)
    ok = proc.returncode == 0 and m is not None and int(m.group(1)) == 0 and done in out
    return dict(suite=suite, passed=int(ok), failed=int(not ok), skipped=0,
                failed_tests=[] if ok else [f"sanitizer: {m.group(0) if m else 'no summary'} rc={proc.returncode}"],
                command=" ".join(cmd[:3] + ["python", *cmd[4:]]))


def run_sanitizer(log_path) -> dict:
    return _memcheck(log_path, "tiny-generate", "generated",
                     "compute-sanitizer memcheck, tiny Llama generating 80 tokens through the kernels")


def run_sanitizer_walk(log_path) -> dict:
    return _memcheck(log_path, "walk-check", "walk checked",
                     "compute-sanitizer memcheck, kernels/decode_mma's walk forced (walk_check's shapes)")


def walk_check() -> None:
    """The MMA decode walk forced on small layers: 4-bit and mixed 4/2-bit pools, 4 and 16 query heads per KV head,
    head dim 128 and 64, one and three splits, a padded batch; each output within 2e-3 (relative L2) of the Triton
    walk's."""
    import torch
    from hf_turbo.kernels import attend_layer

    from hf_turbo.cache import TurboLayer
    from hf_turbo.config import TurboConfig

    torch.manual_seed(0)
    for frac, hq, hkv, d in ((0.0, 16, 4, 128), (0.5, 16, 4, 128), (0.0, 64, 4, 128), (0.5, 64, 4, 128),
                             (0.0, 9, 3, 64)):
        layer = TurboLayer(TurboConfig(int2_fraction=frac))
        for t in (700, 1):  # 700 tokens (10 compressed blocks and a 60-token tail), then one more
            k, v = torch.randn(2, 2, hkv, t, d, device="cuda").half()
            layer.update(k, v)
        q = torch.randn(2, hq, 1, d, device="cuda").half()
        pad = torch.tensor([0, 37], dtype=torch.int32, device="cuda")
        ref = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=1, walk="triton", pad=pad)
        for split in (1, 3):
            layer.kernel_cache.clear()
            out = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=split, walk="mma", pad=pad)
            torch.cuda.synchronize()
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"int2_fraction {frac} hq {hq} hkv {hkv} d {d} split {split}: rel. L2 vs Triton walk {rel:.2e}")
            if not rel < 2e-3:
                raise SystemExit(f"walk differs from the Triton walk: {rel}")
    print("walk checked")


def tiny_generate() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_turbo
    from hf_turbo.generate import cache_kwarg

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512, attn_implementation="turbo")
    model = LlamaForCausalLM(cfg).half().cuda().eval()
    ids = torch.randint(0, 512, (2, 100), device="cuda")
    cache = hf_turbo.TurboQuantCache(model.config, int2_fraction=0.5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, min_new_tokens=80,
                         do_sample=False, **{cache_kwarg(): cache})
    torch.cuda.synchronize()
    print("generated", tuple(out.shape))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sanitizer", action="store_true", help="also run compute-sanitizer memcheck")
    ap.add_argument("--sanitizer-walk", action="store_true", help="compute-sanitizer memcheck on the MMA decode walk")
    ap.add_argument("--no-pytest", action="store_true", help="skip the compiled test suites")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="run the test suites in N pytest-xdist processes (default: one process)")
    ap.add_argument("--tiny-generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--walk-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny_generate:
        tiny_generate()
        return 0
    if args.walk_check:
        walk_check()
        return 0
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    failed = False
    for wanted, name, title, log, runner in (
        (not args.no_pytest, "gpu_tests", "Kernel tests on the GPU", "attention_gpu_tests.log",
         lambda log_path: run_pytest(log_path, args.workers)),
        (args.sanitizer, "gpu_sanitizer", "compute-sanitizer on the GPU", "compute_sanitizer.log", run_sanitizer),
        (args.sanitizer_walk, "gpu_sanitizer_walk", "compute-sanitizer on the MMA decode walk",
         "compute_sanitizer_walk.log", run_sanitizer_walk),
    ):
        if not wanted:
            continue
        row = runner(RESULTS_DIR / log)
        print(row, flush=True)
        failed |= bool(row["failed"])
        write_result(name, [row], title=title, columns=["suite", "passed", "failed", "skipped"],
                     notes=f"Failed: {'; '.join(row['failed_tests'])}" if row["failed"] else f"No failures. Log: {log}.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
