"""``python -m hf_turbo.eval.lm_eval``: lm-eval's CLI with hf_turbo imported first (so ``--model hf-turbo`` and
``attn_implementation="turbo"`` are registered) and ``--include_path`` set to a folder with our tasks
(``aqua_cot``, and ``gsm8k_cot_local`` when asked for: its data are fetched and converted on first use).

    # offline smoke run (CI): 2 questions of the local GSM8K, 32 new tokens each
    python -m hf_turbo.eval.lm_eval --model hf-turbo --model_args int2_fraction=0.25 \\
        --tasks gsm8k_cot_local --limit 2 --gen_kwargs max_gen_toks=32 --batch_size 1
    # the paper's tasks (need the hub or a pre-filled datasets cache)
    python -m hf_turbo.eval.lm_eval --model hf-turbo --model_args pretrained=Qwen/Qwen2-7B,int2_fraction=0.25 \\
        --tasks gsm8k_cot,aqua_cot,bbh_cot_fewshot --batch_size 8
    # the KIVI-style baseline and the FP model through the same harness
    ... --model_args attention=sdpa,cache=kivi,kivi_bits=2,kivi_group_size=32
    ... --model_args attention=sdpa,cache=dynamic

Everything after the module name is lm-eval's own CLI (``lm_eval run --help``).
"""

from __future__ import annotations

import sys

import hf_turbo  # noqa: F401  (registers the "turbo" attention)

from . import lm_eval_model  # noqa: F401  (registers --model hf-turbo)
from .gsm8k_local import TASK_NAME, prepare_task_dir


def _tasks(argv: list[str]) -> list[str]:
    for i, a in enumerate(argv):
        if a == "--tasks" and i + 1 < len(argv):
            return argv[i + 1].split(",")
        if a.startswith("--tasks="):
            return a.split("=", 1)[1].split(",")
    return []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        folder = prepare_task_dir(with_gsm8k=TASK_NAME in _tasks(argv))
        argv += ["--include_path", str(folder)]
    sys.argv = ["lm_eval", *argv]
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
