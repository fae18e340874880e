"""Packaging: the Triton code is importable as ``hf_turbo.kernels`` and the ``hf-turbo`` distribution installs no
top-level ``kernels`` module (that name belongs to Hugging Face's ``kernels`` distribution, which transformers can
use: installing ours would shadow or overwrite it)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_TOP_LEVEL = {"hf_turbo"}


def _dist():
    """The installed distribution's metadata (site-packages), not the ``hf_turbo.egg-info`` build leftover that an
    editable install writes into the repo (found first when the repo root is on sys.path, as under ``python -m``)."""
    paths = [p for p in sys.path if p and Path(p).resolve() != ROOT]  # a venv inside the repo (CI) still counts
    for dist in md.distributions(name="hf-turbo", path=paths):
        return dist
    pytest.skip("the hf-turbo distribution is not installed (pip install -e .)")  # pragma: no cover


def test_kernels_importable_under_hf_turbo():
    kernels = importlib.import_module("hf_turbo.kernels")
    assert callable(kernels.unavailable_reason)
    where = Path(kernels.__file__).resolve()
    assert where.parent.name == "kernels"
    # editable install: the repo's kernels/ folder; regular install: site-packages/hf_turbo/kernels/
    assert where.parent.parent == ROOT or where.parent.parent.name == "hf_turbo", where
    for name in ("hf_turbo.calibration", "hf_turbo.eval"):
        importlib.import_module(name)


def test_distribution_declares_only_hf_turbo():
    dist = _dist()
    top = dist.read_text("top_level.txt")
    if top is not None:
        assert set(top.split()) == OUR_TOP_LEVEL, top
    for f in dist.files or []:
        first = Path(str(f)).parts[0]
        assert first not in ("kernels", "calibration", "eval", "tests"), f"the distribution installs {f}"
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert eps.get("hf-turbo") == "hf_turbo.cli:main"


def test_editable_finder_maps_only_hf_turbo():
    """setuptools' editable finder: every mapped import name lives under hf_turbo (kernels/ is hf_turbo.kernels)."""
    dist = _dist()
    finders = [f for f in dist.files or [] if str(f).endswith("_finder.py")]
    if not finders:
        pytest.skip("not a setuptools editable install")
    text = Path(finders[0].locate()).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("MAPPING"))
    mapping = json.loads(line.split("=", 1)[1].strip().replace("'", '"'))
    assert all(name == "hf_turbo" or name.startswith("hf_turbo.") for name in mapping), mapping
    assert Path(mapping["hf_turbo.kernels"]).resolve() == (ROOT / "kernels").resolve()


def test_no_top_level_kernels_module_from_us(tmp_path):
    """In a fresh interpreter outside the repo, ``import kernels`` never resolves to our code (it is either absent
    or Hugging Face's own package)."""
    code = (
        "import importlib.util, json\n"
        "s = importlib.util.find_spec('kernels')\n"
        "print(json.dumps(None if s is None else (s.origin or str(list(s.submodule_search_locations or [])))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    origin = json.loads(out.stdout)
    if origin is not None:  # (CI's venvs live inside the repo: only our kernels/ folder counts)
        assert str(ROOT / "kernels") not in origin, f"a top-level 'kernels' module resolves to our code: {origin}"


@pytest.mark.slow
def test_built_wheel_has_no_top_level_kernels(tmp_path):
    """Build a wheel from a copy of the sources (setuptools, no network) and list what it would install."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for name in ("hf_turbo", "kernels", "calibration", "eval"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out_dir = tmp_path / "wheel"
    out_dir.mkdir()
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = out_dir / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == OUR_TOP_LEVEL, tops
    assert "hf_turbo/kernels/__init__.py" in names
    assert "hf_turbo/calibration/__init__.py" in names and "hf_turbo/eval/__init__.py" in names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert set(zf.read(top_level).decode().split()) == OUR_TOP_LEVEL


def _run_from_root(code: str, extra_path: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_repo_root_does_not_shadow_hugging_face_kernels(tmp_path):
    """Run from the repository root, Python finds kernels/ first under the top-level name ``kernels``, which Hugging
    Face's ``kernels`` distribution owns and transformers imports when it is installed (transformers 5.25 does at
    import time). The folder then hands the name over to that distribution (a stand-in here, later on sys.path), or
    stays an empty module without a version, so transformers treats ``kernels`` as absent; ``hf_turbo.kernels`` is
    unaffected either way."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\nSTAND_IN = True\n')
    got = _run_from_root("import kernels; print(kernels.__file__, getattr(kernels, 'STAND_IN', False))", tmp_path)
    assert got == f"{fake / '__init__.py'} True", got
    got = _run_from_root("import kernels; print(kernels.__file__); "
                         "print(sorted(k for k in vars(kernels) if not k.startswith('__')), hasattr(kernels, '__version__'))")
    where, names = got.splitlines()
    if Path(where).resolve() == ROOT / "kernels" / "__init__.py":  # the distribution is not installed here
        assert names == "[] False", got
    else:  # it is: the import reached it
        assert ROOT / "kernels" not in Path(where).resolve().parents and names.endswith("True"), got
    got = _run_from_root("from transformers import AttentionInterface; import hf_turbo.kernels as k; "
                         "print(k.__name__, callable(k.attend_layer))")
    assert got == "hf_turbo.kernels True", got
