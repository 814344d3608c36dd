"""`kdfast distill --cross-tokenizer` at a tiny size: the teacher trained (and cached) with one BPE tokenizer, the
students with another; the report's rows (teacher, plain CE at equal steps, the cross-tokenizer student, plain CE at
equal wall time) come from the run, and the Markdown and the CSV agree row by row."""

import csv

import pytest

from kdfast.demo.main import main as distill_main

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}  # côté\n" for i in range(400))


def test_cross_tokenizer_students(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    arguments = ["--data", str(data), "--cross-tokenizer", "--vocab-size", "300", "--student-vocab-size", "280",
                 "--steps", "3", "--teacher-steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "4",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    distill_main(arguments)
    (csv_path,) = (tmp_path / "out").glob("distill_cross_tokenizer_*.csv")
    with csv_path.open() as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["teacher", "student, plain CE (equal steps)", "student, cross-tokenizer distilled (hybrid)",
                          "student, plain CE (equal wall time)"]
    assert rows["teacher"]["tokenizer"] == "BPE 300"
    assert rows["student, cross-tokenizer distilled (hybrid)"]["tokenizer"] == "BPE 280"
    assert rows["student, plain CE (equal steps)"]["steps"] == "3"
    assert rows["student, cross-tokenizer distilled (hybrid)"]["steps"] == "3"
    assert int(rows["student, plain CE (equal wall time)"]["steps"]) >= 3
    markdown = csv_path.with_suffix(".md").read_text()
    for name, row in rows.items():
        assert float(row["perplexity"]) > 1 and float(row["bits_per_byte"]) > 0
        assert f"| {name} | {row['tokenizer']} | {row['parameters']} | {row['steps']} |" in markdown
    assert "Equal wall time" in markdown and "kdfast fused" in markdown
    assert list((tmp_path / "cache").glob("teacher-*/kdfast_teacher.json")), "the teacher was not cached"


def test_cross_tokenizer_refuses_one_tokenizer_and_other_modes():
    for extra in (["--teachers", "2"], ["--teacher-cache"]):
        with pytest.raises(SystemExit):
            distill_main(["--cross-tokenizer", *extra])
