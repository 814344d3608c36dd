"""`kdfast distill`: the CLI smoke run of the issue (`--steps 5`), the on-disk data and checkpoint options, and the
teacher cache. Every report number must come from the run: the Markdown and the CSV agree row by row."""

import csv
import os
from pathlib import Path

import pytest
import torch
from forked_command import run_command

from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.demo.main import main as distill_main
from kdfast.teacher_cache import TeacherCache

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(400))


def _report_rows(out_dir):
    (csv_path,) = out_dir.glob("distill_demo_*.csv")
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    markdown = csv_path.with_suffix(".md").read_text()
    assert csv_path.with_suffix(".png").stat().st_size > 10_000
    for row in table:
        assert f"| {row['model']} | {row['parameters']} | {row['steps']} |" in markdown
    return {row["model"]: row for row in table}


def test_cli_smoke_run_with_five_steps(tmp_path):
    # The demo's models and corpus, on shorter batches (64 tokens x 4 rows): the same code path, a third of the time.
    result = run_command(["-m", "kdfast.cli", "distill", "--steps", "5", "--eval-windows", "8", "--seq-len", "64",
                          "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                         env=dict(os.environ), cwd=Path.cwd(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _report_rows(tmp_path / "out")
    assert rows["student, distilled with kdfast"]["steps"] == "5"
    assert rows["student, plain CE (equal steps)"]["steps"] == "5"
    assert rows["teacher"]["steps"] == "20", "the teacher trains 4 x --steps"
    assert "Per distillation step" in result.stdout
    assert list((tmp_path / "cache").glob("teacher-*/kdfast_teacher.json")), "the teacher was not cached"


def test_data_file_and_checkpoints_on_disk(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    tokenizer = train_tokenizer([TEXT], 300)
    size = models.ModelSize(hidden=32, layers=1, heads=2)
    for name, seed in (("teacher", 1), ("student", 0)):
        model = models.new_model(size, len(tokenizer) + 4, 16, seed)  # heads padded past the tokenizer
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    tiny = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    distill_main(["--data", str(data), "--teacher", str(tmp_path / "teacher"), "--student",
                  str(tmp_path / "student"), *tiny])
    rows = _report_rows(tmp_path / "out")
    assert rows["teacher"]["steps"] == "checkpoint"
    assert int(rows["student, distilled with kdfast"]["parameters"]) == models.parameter_count(
        models.load_checkpoint(tmp_path / "student"))


def test_student_without_teacher_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        distill_main(["--student", str(tmp_path)])


def test_teacher_cache_round_trip(tmp_path):
    size = models.ModelSize(hidden=32, layers=1, heads=2)
    settings = {"size": models.size_settings(size), "steps": 3}
    path = models.teacher_cache_path(tmp_path, settings)
    assert models.cached_teacher(path) is None
    assert path != models.teacher_cache_path(tmp_path, {**settings, "steps": 4}), "the key must cover settings"
    model = models.new_model(size, 50, 8, seed=0)
    models.save_teacher(model, path, settings, {"steps": 3})
    loaded, record = models.cached_teacher(path)
    assert record["steps"] == 3 and record["settings"] == settings
    for original, reloaded in zip(model.parameters(), loaded.parameters()):
        assert original.equal(reloaded)


def test_cached_teacher_students_are_reported_and_the_cache_reused(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    tokenizer = train_tokenizer([TEXT], 300)
    teacher = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), len(tokenizer), 16, 1)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    arguments = ["--data", str(data), "--teacher", str(tmp_path / "teacher"), "--steps", "3", "--seq-len", "16",
                 "--batch-size", "2", "--eval-windows", "4", "--teacher-cache", "--cache-k", "4", "2",
                 "--cache-samples", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    distill_main(arguments)
    rows = _report_rows(tmp_path / "out")
    for k in (4, 2):
        assert rows[f"student, cached teacher top-{k} (bucket)"]["steps"] == "3"
    assert rows["student, cached teacher 3 samples (renormalize)"]["steps"] == "3"
    assert "student, plain CE (equal wall time, cached teacher top-4 (bucket))" in rows
    (folder_4,) = (tmp_path / "cache").glob("teacher-cache-k4-*")
    assert TeacherCache(folder_4).settings.num_windows == 3 * 2, "the windows of the students' three batches"
    capsys.readouterr()
    distill_main(arguments)
    assert "reused from an earlier run" in " ".join(capsys.readouterr().out.split())


def test_several_teachers_one_per_domain(tmp_path):
    """--teachers 2: a teacher per half of the text, students of their mixture, of each window routed to its
    domain's teacher, of each alone and of plain CE, each model's perplexity per domain; the Markdown and the CSV
    agree."""
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT + "\n".join(f"class Shape{i}:\n    sides = {i % 9}\n" for i in range(400)))
    distill_main(["--data", str(data), "--teachers", "2", "--steps", "2", "--teacher-steps", "2", "--seq-len", "16",
                  "--batch-size", "2", "--eval-windows", "8", "--vocab-size", "300", "--cache-dir",
                  str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "distill_teachers_x86_64.csv").open() as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"teacher 1 (its domain's text)", "teacher 2 (its domain's text)",
                         "student, the teachers' mixture", "student, each window routed to its domain's teacher",
                         "student, teacher 1 alone", "student, teacher 2 alone", "student, plain cross-entropy"}
    markdown = (tmp_path / "out" / "distill_teachers_x86_64.md").read_text()
    for name, row in rows.items():
        assert float(row["domain 1"]) > 1 and float(row["domain 2"]) > 1
        assert f"| {name} | {row['domain 1']} | {row['domain 2']} | {row['all domains']} |" in markdown
    assert len(list((tmp_path / "cache").glob("teacher-*/kdfast_teacher.json"))) == 2, "one teacher per domain"
    with pytest.raises(SystemExit):
        distill_main(["--teachers", "2", "--teacher-cache"])


def test_domain_batches_are_the_same_windows_with_their_domain():
    from kdfast.demo.several_teachers import DomainBatches
    from kdfast.demo.training import Batches

    tokens = torch.arange(1000)
    plain, routed = Batches(tokens, 8, 15, seed=3), DomainBatches(tokens, 8, 15, seed=3, count=3)
    for _ in range(4):
        windows, batch = next(plain), next(routed)
        assert torch.equal(batch["windows"], windows)
        # tokens are their own positions: a window's first token says where it starts
        assert batch["teacher_id"].tolist() == [min(int(start) // 333, 2) for start in windows[:, 0]]


def test_the_routed_student_learns_from_its_windows_teacher_alone():
    from tiny_models import VOCAB, tiny_llama

    import kdfast
    from kdfast.demo.several_teachers import routed_step

    student = tiny_llama(32, seed=0)
    teachers = [tiny_llama(48, seed=1).requires_grad_(False), tiny_llama(64, seed=2).requires_grad_(False)]
    windows = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    route = torch.tensor([1, 0, 1, 1])
    loss = routed_step(teachers, {"ce_weight": 0.5}, VOCAB)(student, {"windows": windows, "teacher_id": route})
    with torch.no_grad():
        hidden = [teacher.get_decoder()(input_ids=windows).last_hidden_state[:, :-1] for teacher in teachers]
    expected = kdfast.linear_multi_teacher_distill_loss(
        student.get_decoder()(input_ids=windows).last_hidden_state[:, :-1], student.lm_head.weight[:VOCAB], hidden,
        [teacher.lm_head.weight[:VOCAB] for teacher in teachers], windows[:, 1:], ce_weight=0.5,
        weights=torch.nn.functional.one_hot(route, 2)[:, None, :].expand(4, 8, 2).float())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    only_first = routed_step(teachers, {}, VOCAB)(student, {"windows": windows, "teacher_id": torch.zeros(4).long()})
    assert torch.isfinite(only_first)  # the second teacher has no window: it does not run
