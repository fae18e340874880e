"""SmolLM2 end to end on the GPU through the Triton kernels, checked against the PyTorch reference.

    HF_TURBO_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf python -m hf_turbo.eval.gpu_smollm2

1. Real activations: a forward of real text through turbo attention + TurboQuantCache on CUDA; at every layer the
   kernel output is compared with the reference computed on the same layer state (relative L2), for the prefill
   and for decode steps.
2. Generation: greedy answers to a few prompts with the kernels (CUDA, ``--dtype``), with the reference on CUDA (same
   weights and dtype; isolates the kernels), and with the reference on CPU (fp32) — token agreement; the reference
   on CUDA against the reference on CPU is the floor (no kernels: only the devices' rounding differs). With
   ``--dtype float32`` the model's matmuls on the GPU are the CPU reference's (TF32 off), so the answers differ
   only where the attention kernels differ from the reference; in float16 the whole model's rounding differs too.
Writes eval/results/gpu_smollm2.json.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from hf_turbo import TurboQuantCache, ops
from hf_turbo.quant.attention import turbo_attention_reference

PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in three sentences.",
    "What is 15 multiplied by 4?",
    "Name the largest planet in the solar system.",
    "Translate 'good morning' into Spanish.",
    "List the three primary colors.",
    "Who wrote Romeo and Juliet?",
)


@contextlib.contextmanager
def reference_only():
    """Force the PyTorch reference on CUDA (no kernels)."""
    saved = ops._backend_for
    ops._backend_for = lambda device, turbo: None
    try:
        yield
    finally:
        ops._backend_for = saved


@contextlib.contextmanager
def compare_each_layer(errors: list):
    """Wrap ops.attend_layer: run the kernels, and the reference on the same state; record the relative L2."""
    saved = ops.attend_layer

    def both(query, layer, *, sm_scale, causal, key_mask, sliding_window):
        out = saved(query, layer, sm_scale=sm_scale, causal=causal, key_mask=key_mask, sliding_window=sliding_window)
        t = layer.turbo
        ref = turbo_attention_reference(
            query, layer.attention_segments(), sm_scale=sm_scale, causal=causal, key_mask=key_mask,
            sliding_window=sliding_window, exp=t.exp, n_r=t.n_r, sas_base=t.sas_base, pv=t.pv,
            block_m=t.block_m, block_n=t.block_n,
        )
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        errors.append({"q_len": int(query.shape[-2]), "kv_len": layer.get_seq_length(), "rel_l2": err})
        return out

    ops.attend_layer = both
    try:
        yield
    finally:
        ops.attend_layer = saved


def generate(model, tok, prompt, new_tokens, **turbo):
    from hf_turbo.generate import run_generation

    return run_generation(model, tok, prompt, method="turbo", max_new_tokens=new_tokens, **turbo).new_token_ids


def main(argv=None) -> int:
    from hf_turbo.eval.results import write_result

    from hf_turbo.models import load_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "tests" / "data" / "sample.txt"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script (no kernels there)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                    help="the GPU model's dtype (the CPU reference is float32)")
    ap.add_argument("--name", default="gpu_smollm2")
    args = ap.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype) if args.device == "cuda" else torch.float32
    model, tok = load_model(device=args.device, dtype=dtype)
    text = Path(args.text).read_text() if Path(args.text).is_file() else " ".join(PROMPTS) * 50
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens].to(args.device)
    rows = []
    for frac in (0.0, 0.5):
        errors: list = []
        cache = TurboQuantCache(model.config, int2_fraction=frac)
        with torch.inference_mode(), compare_each_layer(errors):
            model(ids[:, :-8], past_key_values=cache)
            for i in range(8):  # decode steps over the compressed blocks + buffer
                model(ids[:, ids.shape[1] - 8 + i : ids.shape[1] - 7 + i], past_key_values=cache)
        for phase, sel in (("prefill", lambda e: e["q_len"] > 1), ("decode", lambda e: e["q_len"] == 1)):
            errs = [e["rel_l2"] for e in errors if sel(e)]
            rows.append({"check": f"kernel vs reference, real activations, {phase}", "int2_fraction": frac,
                         "layers_x_steps": len(errs), "max_rel_l2": max(errs), "mean_rel_l2": sum(errs) / len(errs)})
    agree = {"kernels_vs_cuda_reference": [], "kernels_vs_cpu_reference": [], "cuda_reference_vs_cpu_reference": []}
    cpu_model, _ = load_model(device="cpu", dtype=torch.float32)
    for prompt in PROMPTS:
        a = generate(model, tok, prompt, args.new_tokens)
        with reference_only():
            b = generate(model, tok, prompt, args.new_tokens)
        c = generate(cpu_model, tok, prompt, args.new_tokens)
        for key, x, y in (("kernels_vs_cuda_reference", a, b), ("kernels_vs_cpu_reference", a, c),
                          ("cuda_reference_vs_cpu_reference", b, c)):
            n = min(len(x), len(y))
            first_diff = next((i for i in range(n) if x[i] != y[i]), n)
            agree[key].append({"prompt": prompt, "same": x == y, "first_diff": first_diff, "n": n,
                               "answer": tok.decode(x, skip_special_tokens=True),
                               "other": tok.decode(y, skip_special_tokens=True)})
    for key, items in agree.items():
        rows.append({"check": f"generation, {key}", "int2_fraction": 0.0, "layers_x_steps": len(items),
                     "max_rel_l2": None, "mean_rel_l2": None,
                     "identical_answers": sum(i["same"] for i in items)})
    write_result(args.name, rows,
                 title=f"SmolLM2-135M end to end on the GPU ({args.dtype}): Triton kernels vs the reference",
                 columns=["check", "int2_fraction", "layers_x_steps", "max_rel_l2", "mean_rel_l2", "identical_answers"],
                 extra={"generation": agree}, out_dir=Path(args.out_dir) if args.out_dir else None)
    for r in rows:
        print(r)
    for key, items in agree.items():
        for i in items:
            print(key, i["same"], i["first_diff"], repr(i["answer"][:80]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
