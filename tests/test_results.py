"""eval/results.py: every results file names the code it came from (the source digest next to the git commit)."""

from hf_turbo.eval import results


def test_source_digest_follows_the_sources(tmp_path):
    for d in results.SOURCE_DIRS:
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.py").write_text(f"x = '{d}'\n")
    first = results.source_digest(tmp_path)
    assert first == results.source_digest(tmp_path) and len(first) == 12
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert results.source_digest(tmp_path) != first  # a changed file
    (tmp_path / "kernels" / "a.py").write_text("x = 'kernels'\n")
    assert results.source_digest(tmp_path) == first
    (tmp_path / "eval" / "b.py").write_text("")
    assert results.source_digest(tmp_path) != first  # a new file
    (tmp_path / "notes.md").write_text("prose")  # not a source under the source folders: no change
    (tmp_path / "eval" / "b.py").unlink()
    assert results.source_digest(tmp_path) == first


def test_environment_records_the_source_digest():
    assert results.environment()["versions"]["source"] == results.source_digest()


def test_report_renders_a_verdict(tmp_path):
    from hf_turbo.eval import report

    record = {"name": "x", "title": "X", "columns": ["a"], "rows": [{"a": 1.5}],
              "verdict": {"same": True, "worst": 0.25}}
    text = report.render_one(record, tmp_path)
    assert "| 1.50 |" in text
    assert "Verdict: `same` = True, `worst` = 0.25" in text
