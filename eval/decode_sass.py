"""What the decode kernel's tile loop compiles to, without a GPU: registers, spills and the SASS instructions of the
loop body per thread, for each way of rebuilding the packed codes (issue 4; the measurement behind kernels/NOTES.md).

    python -m hf_turbo.eval.decode_sass            # any machine with Triton's bundled ptxas / cuobjdump

The kernel is compiled for sm_90 (H100) with the specialization a llama3-8b-shaped decode step gets (32 q / 8 kv
heads, hd 128, one query token, strides of 1 and 16-byte alignment as Triton sees them on the GPU, one program per
context so that the tile loop is the only loop). ``loop_instructions`` counts the instructions between the loop's
backward branch and its target: one 64-key tile (K and V) per iteration. Static counts, not timings: the GPU times
are in decode_tuning.json. Writes ``eval/results/decode_sass.json``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

# pointer arguments of the decode kernel and the dtypes the cache's pools and the model give them
_POINTERS = {"q_ptr": "*fp16", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "lock_ptr": "*i32",
             "o_ptr": "*fp16", "hmap_ptr": "*i32", "pad_ptr": "*i32", "kc_ptr": "*u8", "ks_ptr": "*fp32",
             "ks2_ptr": "*u8", "kz_ptr": "*i8", "vc_ptr": "*u8", "vs_ptr": "*fp32", "vs2_ptr": "*u8", "vz_ptr": "*i8",
             "tk_ptr": "*fp16", "tv_ptr": "*fp16", "nk_ptr": "*fp16", "nv_ptr": "*fp16", "mu_ptr": "*fp16",
             "lo_hmap_ptr": "*i32", "lo_kc_ptr": "*u8", "lo_ks_ptr": "*fp32", "lo_ks2_ptr": "*u8", "lo_kz_ptr": "*i8",
             "lo_vc_ptr": "*u8", "lo_vs_ptr": "*fp32", "lo_vs2_ptr": "*u8", "lo_vz_ptr": "*i8"}
_ONES = ("sqd", "sod", "stkd", "stvd", "Sq")  # equal to 1 in a decode step: Triton makes them constants
_DIV16 = ("sqb", "sqh", "sqs", "Hq", "sob", "soh", "sos", "stkb", "stkh", "stkt", "stvb", "stvh", "stvt", "D", "CAP")
VARIANTS = {"int": 0, "fp16": 1, "words": 2, "mma": None}  # mma: kernels/decode_mma's walk (Gluon, one warp)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_decode(rebuild: str, bits: int, num_warps: int, num_stages: int):
    """The decode kernel compiled for sm_90 (no GPU needed) with ``rebuild`` in :data:`VARIANTS`."""
    from hf_turbo.kernels.decode import _decode_kernel
    from hf_turbo.kernels.prefill import PV_MODES, exp_constants
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_turbo.config import TurboConfig

    cfg = TurboConfig()
    const = dict(G=4, QB=cfg.block_m, BS=cfg.block_size, BLOCK_M=16, BLOCK_N=cfg.block_n, DP=128, BITS=bits,
                 K_CHANNEL=cfg.k_axis == "channel", V_CHANNEL=cfg.v_axis == "channel", HAS_COMP=True, HAS_SEG=False,
                 CAUSAL=True, HAS_PAD=False, HAS_WINDOW=False, PV_MODE=PV_MODES[cfg.pv], SKIP_EMPTY=cfg.exp == "sas",
                 PREFETCH=True, FOLD_V=True, REBUILD=VARIANTS[rebuild], ASM=True, DIRECT=True, LO_BITS=0,
                 WRITE_NEW=False, SUB_MEAN=cfg.k_smooth, **exp_constants(cfg))
    const.update(dict.fromkeys(_ONES, 1))
    names = [p.name for p in _decode_kernel.params]
    signature = {}
    for p in _decode_kernel.params:
        if p.name in const:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = _POINTERS.get(p.name, "fp32" if p.name == "q_mult" else "i32")
    src = ASTSource(fn=_decode_kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in (*_POINTERS, *_DIV16)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))


def compile_walk(bits: int):
    """kernels/decode_mma's walk compiled for sm_90 (no GPU needed), with its default prefetch and the same
    specialization as :func:`compile_decode` (one warp per program)."""
    from hf_turbo.kernels import decode_mma
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = decode_mma._walk_kernel
    const = decode_mma.walk_constants(g=4, block_size=64, d=128, bits=bits, has_pad=False,
                                      has_window=False, on_gpu=True)
    options = dict(num_warps=const.pop("num_warps"))
    const["sqd"] = 1
    names = [p.name for p in fn.params]
    signature = {p.name: "constexpr" if p.name in const else _POINTERS.get(p.name, "fp32" if p.name == "q_mult"
                                                                               else "i32") for p in fn.params}
    aligned = [n for n in (*_POINTERS, *_DIV16) if n in names]
    src = GluonASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_stats(cubin: bytes) -> dict:
    """Registers, stack (spills) and the tile loop's instruction count and mix from a cubin (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    code = [(int(a, 16), ins.strip()) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, ins in code:
        m = re.search(r"BRA (?:`\(.*?\) )?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    body = [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] for addr, ins in code if lo <= addr <= hi]
    mix = collections.Counter(body)
    return dict(registers=regs, stack_bytes=stack, loop_instructions=len(body),
                loop_mma=sum(n for op, n in mix.items() if op.startswith(("HMMA", "IMMA"))),
                loop_top=", ".join(f"{op} {n}" for op, n in mix.most_common(6)))


def main(argv=None) -> int:
    from hf_turbo.eval.results import write_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("decode_sass compiles the kernel: unset TRITON_INTERPRET")
    rows = []
    for bits in map(int, args.bits.split(",")):
        for rebuild in args.variants.split(","):
            for warps, stages in ((1, None),) if rebuild == "mma" else ((4, 2), (2, 1)):
                kernel = compile_walk(bits) if rebuild == "mma" else compile_decode(rebuild, bits, warps, stages)
                row = dict(bits=bits, rebuild=rebuild, num_warps=warps, num_stages=stages,
                           shared_bytes=kernel.metadata.shared, **sass_stats(kernel.asm["cubin"]))
                rows.append(row)
                print(row, flush=True)
    write_result("decode_sass", rows, title="Decode kernel tile loop, static SASS (sm_90, hd 128, GQA 4)",
                 columns=["bits", "rebuild", "num_warps", "num_stages", "registers", "stack_bytes", "shared_bytes",
                          "loop_instructions", "loop_mma", "loop_top"],
                 notes="Per thread, one 64-key tile of K and V per loop iteration; compiled with Triton's bundled "
                       "ptxas, no GPU. int: integer rebuild + INT8 dot; fp16: FP16 rebuild from bytes; words: FP16 "
                       "rebuild from int32 words with PTX (the Triton kernel's default); mma: kernels/decode_mma's "
                       "walk (Gluon, one warp, operands unpacked in the MMA layout, keys in the MMA's M and heads in N; "
                       "4-bit K folded into Q; V's scale and zero point applied to P and the output).",
                 out_dir=Path(args.out_dir) if args.out_dir else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
