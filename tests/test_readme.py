"""The README's results tables are generated from eval/results/*.json, and its Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hf_turbo.eval import report

ROOT = Path(__file__).resolve().parent.parent


def _require_smollm2():
    pytest.importorskip("gguf")
    from hf_turbo.models import find_default_gguf

    try:
        find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_readme_results_in_sync_with_json():
    readme = (ROOT / "README.md").read_text()
    assert readme == report.updated_readme(readme, ROOT / "eval" / "results"), (
        "README.md results section is stale: run python -m hf_turbo.eval.report"
    )


def test_report_renders_every_results_file():
    text = report.render(ROOT / "eval" / "results")
    for f in (ROOT / "eval" / "results").glob("*.json"):
        assert f"`{f.stem}.json`" in text


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    _require_smollm2()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = float(out.stdout.strip().split()[-1])
    assert ratio > 0


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    import json

    _require_smollm2()
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    script = tmp_path / "nb.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "relative L2 error" in out.stdout
