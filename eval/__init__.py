"""Evaluation and benchmarks, installed as ``hf_turbo.eval``: results writer, perplexity, lm-eval model, benchmarks.
Results land in ``eval/results/<name>.json`` (+ ``.png``); ``python -m hf_turbo.eval.report`` regenerates the README
tables from them."""
