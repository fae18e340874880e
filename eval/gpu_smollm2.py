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
3. Next-token choices along the CPU reference's answers (the tokens forced, computed the way generation does: the
   prompt's prefill, then one decode step per token through a fresh TurboQuantCache): at how many positions the
   kernels pick the CPU reference's token, how far their logits are from the CPU reference's, and, where they pick
   another token, the CPU reference's own margin between the two (a near-tie, or not). The reference on CUDA gets
   the same treatment: the floor.
4. What one rounding does (CPU, no kernels): the CPU reference with every weight moved by about one float32
   rounding (``1 + 2^-24 N(0, 1)``) against itself unmoved -- through the quantized cache its logits move by up to
   ~2 (a code that sat next to a rounding boundary flips), through full-precision SDPA by ~1e-4. The kernels'
   answers count as the CPU reference's when every next token they choose differently is one where the CPU
   reference's own margin is below that move (``same_answers_up_to_one_rounding``).
Writes eval/results/gpu_smollm2.json.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from hf_turbo.eval.perplexity import attention_mode

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


def forced_logits(model, tok, prompt: str, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), vocab]`` float32 (CPU): the next-token logits before each of ``tokens`` on the greedy path that
    emits them -- the chat prompt's prefill, then one decode step per token, through turbo attention and a fresh
    TurboQuantCache (the computation :func:`generate` does, with the tokens forced instead of chosen)."""
    from hf_turbo.generate import encode_prompt

    device = next(model.parameters()).device
    ids = encode_prompt(tok, prompt).to(device)
    cache = TurboQuantCache(model.config)
    rows = []
    with attention_mode(model, "turbo"), torch.inference_mode():
        for step in [ids] + [torch.tensor([[t]], device=device) for t in tokens[:-1]]:
            logits = model(step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            rows.append(logits[0, -1].float().cpu())
    return torch.stack(rows)


def sdpa_logits(model, tok, prompt: str, tokens: list[int]) -> torch.Tensor:
    """:func:`forced_logits` through full-precision SDPA and no cache: one forward of the prompt and ``tokens``."""
    from hf_turbo.generate import encode_prompt

    ids = encode_prompt(tok, prompt)
    full = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=ids.dtype)], dim=1).to(next(model.parameters()).device)
    with attention_mode(model, "sdpa"), torch.inference_mode():
        return model(full).logits[0, ids.shape[1] - 1 :].float().cpu()


def moved_by_one_rounding(model, seed: int = 0):
    """A copy of ``model`` with every weight multiplied by ``1 + 2^-24 N(0, 1)``: about one float32 rounding each."""
    import copy

    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in moved.parameters():
            w.mul_(1 + 2.0**-24 * torch.randn(w.shape, generator=gen).to(w.device, w.dtype))
    return moved


def next_token_agreement(logits: torch.Tensor, reference: torch.Tensor, tokens: list[int]) -> dict:
    """Compare ``logits`` with the CPU ``reference`` logits (both ``[n, vocab]``) along the reference's greedy
    ``tokens``: positions where ``logits`` picks the same token, the largest logit difference, and at each
    position where it picks another token the reference's margin ``reference[t, tokens[t]] - reference[t, pick]``
    (>= 0; small: a near-tie of the reference itself)."""
    tokens_t = torch.tensor(tokens)
    if not torch.equal(reference.argmax(-1), tokens_t):
        raise RuntimeError("the CPU reference's forced logits do not reproduce its own greedy answer")
    pick = logits.argmax(-1)
    rows = torch.arange(len(tokens))
    margins = (reference[rows, tokens_t] - reference[rows, pick])[pick != tokens_t]
    top2 = reference.topk(2, dim=-1).values
    return {"positions": len(tokens), "same_next_token": int((pick == tokens_t).sum()),
            "max_logit_diff": float((logits - reference).abs().max()),
            "reference_margins_at_disagreements": [float(m) for m in margins],
            "reference_min_top2_margin": float((top2[:, 0] - top2[:, 1]).min())}


def activation_rows(model, ids: torch.Tensor) -> list[dict]:
    """Kernel vs reference on the same layer state, over real activations ``ids [1, T]``: a prefill of all but the
    last 8 tokens, then 8 decode steps; per phase and INT2 fraction the max and mean relative L2 over layers."""
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
    return rows


def answer_rows(model, cpu_model, tok, new_tokens: int) -> tuple[list[dict], dict]:
    """Greedy answers to :data:`PROMPTS` with the kernels, the reference on CUDA and the reference on CPU, and the
    next-token choices along the CPU reference's answers (see the module docstring, 2-4). Returns the table rows
    and ``{"verdict", "generation", "forced", "sdpa_moved_max_logit_diff"}``."""
    agree = {"kernels_vs_cuda_reference": [], "kernels_vs_cpu_reference": [], "cuda_reference_vs_cpu_reference": []}
    forced = {"kernels": [], "cuda_reference": [], "cpu_reference_moved_by_one_rounding": []}
    sdpa_moved = []
    cpu_moved = moved_by_one_rounding(cpu_model)
    for prompt in PROMPTS:
        a = generate(model, tok, prompt, new_tokens)
        with reference_only():
            b = generate(model, tok, prompt, new_tokens)
        c = generate(cpu_model, tok, prompt, new_tokens)
        on_cpu = forced_logits(cpu_model, tok, prompt, c)
        with reference_only():
            on_cuda = forced_logits(model, tok, prompt, c)
        for key, logits in (("kernels", forced_logits(model, tok, prompt, c)), ("cuda_reference", on_cuda),
                            ("cpu_reference_moved_by_one_rounding", forced_logits(cpu_moved, tok, prompt, c))):
            forced[key].append({"prompt": prompt, **next_token_agreement(logits, on_cpu, c)})
        sdpa_moved.append(float((sdpa_logits(cpu_moved, tok, prompt, c) - sdpa_logits(cpu_model, tok, prompt, c))
                                .abs().max()))
        for key, x, y in (("kernels_vs_cuda_reference", a, b), ("kernels_vs_cpu_reference", a, c),
                          ("cuda_reference_vs_cpu_reference", b, c)):
            n = min(len(x), len(y))
            first_diff = next((i for i in range(n) if x[i] != y[i]), n)
            agree[key].append({"prompt": prompt, "same": x == y, "first_diff": first_diff, "n": n,
                               "answer": tok.decode(x, skip_special_tokens=True),
                               "other": tok.decode(y, skip_special_tokens=True)})
    rows = [{"check": f"generation, {key}", "int2_fraction": 0.0, "layers_x_steps": len(items),
             "identical_answers": sum(i["same"] for i in items)} for key, items in agree.items()]
    for key, items in forced.items():
        margins = [m for i in items for m in i["reference_margins_at_disagreements"]]
        rows.append({"check": f"next token along the CPU reference's answers, {key}", "int2_fraction": 0.0,
                     "layers_x_steps": sum(i["positions"] for i in items),
                     "same_next_token": sum(i["same_next_token"] for i in items),
                     "max_logit_diff": max(i["max_logit_diff"] for i in items),
                     "max_reference_margin_at_disagreement": max(margins, default=None)})
    rows.append({"check": "full-precision SDPA (no cache), CPU, moved by one rounding", "int2_fraction": None,
                 "layers_x_steps": len(sdpa_moved), "max_logit_diff": max(sdpa_moved)})
    one_rounding = max(i["max_logit_diff"] for i in forced["cpu_reference_moved_by_one_rounding"])
    worst = max((m for i in forced["kernels"] for m in i["reference_margins_at_disagreements"]), default=0.0)
    verdict = {"one_rounding_max_logit_move": one_rounding, "kernels_max_reference_margin_at_disagreement": worst,
               "same_answers_up_to_one_rounding": worst < one_rounding}
    return rows, {"verdict": verdict, "generation": agree, "forced": forced, "sdpa_moved_max_logit_diff": sdpa_moved}


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
    rows = activation_rows(model, ids)
    more, extra = answer_rows(model, load_model(device="cpu", dtype=torch.float32)[0], tok, args.new_tokens)
    rows += more
    write_result(args.name, rows,
                 title=f"SmolLM2-135M end to end on the GPU ({args.dtype}): Triton kernels vs the reference",
                 columns=["check", "int2_fraction", "layers_x_steps", "max_rel_l2", "mean_rel_l2", "identical_answers",
                          "same_next_token", "max_logit_diff", "max_reference_margin_at_disagreement"],
                 extra=extra, out_dir=Path(args.out_dir) if args.out_dir else None)
    for r in rows:
        print(r)
    for key, items in extra["generation"].items():
        for i in items:
            print(key, i["same"], i["first_diff"], repr(i["answer"][:80]))
    print("verdict", extra["verdict"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
