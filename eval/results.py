"""Writing benchmark / accuracy results as data: ``eval/results/<name>.json`` with the command, device, versions and
date next to every figure. The README tables are generated from these files (:mod:`hf_turbo.eval.report`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("HF_TURBO_RESULTS_DIR", REPO_ROOT / "eval" / "results"))


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


SOURCE_DIRS = ("hf_turbo", "kernels", "calibration", "eval")


def source_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 (first 12 hex digits) of the project's Python sources (path and content of every ``*.py`` under
    :data:`SOURCE_DIRS`): names the code a result came from even where ``git`` metadata lags the files (the GPU
    machine's copy of the working tree carries the files, not necessarily the matching ``.git``)."""
    import hashlib

    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict[str, Any]:
    """Device and versions for a results file."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "lm_eval"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    import hf_turbo

    versions["hf_turbo"] = hf_turbo.__version__
    versions["git"] = _git_sha()
    versions["source"] = source_digest()
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "versions": versions}


def invocation() -> str:
    """The command line as the user typed it: ``hf-turbo eval --suite full``, ``python -m hf_turbo.eval.x --flag``."""
    args = " ".join(sys.argv[1:])
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m package.module
        name = spec.name.removesuffix(".__main__")
        prog = f"python -m {name}"
    else:
        prog = Path(sys.argv[0]).name  # a console script (hf-turbo) or python script.py
        if prog.endswith(".py"):
            prog = f"python {sys.argv[0]}"
    return f"{prog} {args}".strip()


def write_result(
    name: str,
    rows: list[dict[str, Any]],
    *,
    title: str,
    columns: list[str] | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
    command: str | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.json``: ``{name, title, command, device, versions, date, columns, rows, notes, ...}``.

    ``columns`` picks and orders the README table's columns (default: keys of the first row). ``notes`` is printed
    under the table. A PNG named ``<name>.png`` beside the JSON is linked from the README.
    """
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "title": title,
        "command": command or invocation(),
        **environment(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "columns": columns or (list(rows[0]) if rows else []),
        "rows": rows,
        "notes": notes,
        **(extra or {}),
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path
