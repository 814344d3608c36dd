"""The teacher cache: what it stores equals the teacher's top-k (or sampled) log-probs, it reads back aligned with the
tokens, it refuses to be used with another tokenizer or other sequences, and a writer killed with `kill -9` at any
point leaves a folder that the same command finishes, byte for byte as an uninterrupted run, without redoing
finished shards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import source_environment

from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.teacher_cache import SparseTeacherCollator, TeacherCache, build_teacher_cache
from kdfast.teacher_cache.data import token_windows
from kdfast.teacher_cache.targets import sampled_targets, top_k_targets

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(400))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny causal LM with a trained tokenizer, saved as a checkpoint folder; and the text's windows."""
    tokenizer = train_tokenizer([TEXT], 300)
    model = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), len(tokenizer) + 4, 16, seed=1)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    windows = token_windows(torch.tensor(tokenizer(TEXT)["input_ids"]), 17)
    return model.eval(), tokenizer, folder, windows


def _build(teacher, folder, **settings):
    model, tokenizer, _, windows = teacher
    settings = {"k": 8, "windows_per_shard": 64, "show_progress": False, **settings}
    return build_teacher_cache(model, windows, folder, tokenizer=tokenizer, **settings)


def test_top_k_targets_are_the_largest_log_probs():
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids, logprobs = top_k_targets(logits, 6, temperature=2.0)
    reference = torch.log_softmax(logits.double() / 2.0, dim=-1)
    torch.testing.assert_close(logprobs.double(), reference.gather(-1, ids), rtol=0, atol=1e-6)
    assert bool((logprobs[..., :-1] >= logprobs[..., 1:]).all()), "most probable first"
    assert torch.equal(ids, reference.topk(6).indices), "the six most probable ids"


def test_sampled_targets_count_every_draw():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))
    ids, logprobs = sampled_targets(logits, 12, 1.0, torch.Generator().manual_seed(2))
    counts = torch.where(ids >= 0, logprobs.exp() * 12, torch.zeros(()))
    torch.testing.assert_close(counts.sum(-1), torch.full((64,), 12.0))
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-5, msg="log(count / n) of whole counts")
    for row in ids:
        drawn = row[row >= 0]
        assert drawn.unique().numel() == drawn.numel() and bool((row[drawn.numel():] == -1).all())
    again = sampled_targets(logits, 12, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(again[0], ids), "seeded: a recomputed shard draws the same samples"


def test_cache_holds_the_teachers_top_k_aligned_with_the_tokens(teacher, tmp_path):
    model, tokenizer, _, windows = teacher
    cache = _build(teacher, tmp_path / "cache", temperature=2.0, logprob_dtype="fp32")
    assert len(cache) == windows.shape[0] and cache.settings.num_shards == -(-windows.shape[0] // 64)
    vocab = len(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=windows[[0, 70]]).logits[..., :vocab]
    for row, window in enumerate((0, 70)):
        item = cache[window]
        assert torch.equal(item["input_ids"], windows[window])
        assert bool((item["teacher_ids"][0] == -1).all()), "nothing predicts the first token"
        expected_ids, expected = top_k_targets(logits[row, :-1], 8, 2.0)
        assert torch.equal(item["teacher_ids"][1:], expected_ids)  # row j: the distribution of token j
        torch.testing.assert_close(item["teacher_logprobs"][1:], expected, rtol=0, atol=1e-5)
    assert cache.stats["bytes_per_token"] == cache.stats["bytes"] / (windows.shape[0] * 16)


def test_sixteen_bit_storage_costs_four_bytes_per_id(teacher, tmp_path):
    cache = _build(teacher, tmp_path / "cache", k=32)
    assert cache.settings.id_dtype == "int16" and cache.settings.logprob_dtype == "fp16"
    # 32 ids x (2 + 2) bytes, the window's tokens (4 bytes, 17 per 16 predicted) and each shard's small header.
    assert 32 * 4 < cache.stats["bytes_per_token"] < 32 * 4 + 8


def test_rerun_keeps_finished_shards_and_recomputes_damaged_ones(teacher, tmp_path):
    folder = tmp_path / "cache"
    first = _build(teacher, folder)
    sums = {i: e["sha256"] for i, e in first.manifest.shards.items()}
    again = _build(teacher, folder, teacher_name="the same checkpoint, loaded from elsewhere")
    assert again.stats["shards_computed"] == 0 and again.stats["shards_reused"] == len(sums)

    shard = folder / first.manifest.shards[2]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the log-probs: the file still loads
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard 2 .* differs from its manifest"):
        TeacherCache(folder)
    repaired = _build(teacher, folder)
    assert repaired.stats["shards_computed"] == 1
    assert {i: e["sha256"] for i, e in repaired.manifest.shards.items()} == sums, "deterministic, byte for byte"


def test_other_settings_in_the_folder_are_refused_unless_overwritten(teacher, tmp_path):
    _build(teacher, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"other settings \(k: 8 vs 4"):
        _build(teacher, tmp_path / "cache", k=4)
    assert _build(teacher, tmp_path / "cache", k=4, overwrite=True).settings.k == 4


def test_incomplete_cache_is_refused(teacher, tmp_path):
    cache = _build(teacher, tmp_path / "cache")
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    manifest["complete"] = False
    del manifest["shards"]["3"]
    (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete .* run the same `kdfast teacher-cache` command again"):
        TeacherCache(cache.folder)


def test_cache_refuses_another_tokenizer_and_other_sequences(teacher, tmp_path):
    _, tokenizer, _, windows = teacher
    cache = _build(teacher, tmp_path / "cache")
    cache.check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="another tokenizer"):
        cache.check_tokenizer(train_tokenizer([TEXT], 290))
    cache.check_input_ids(windows)
    with pytest.raises(ValueError, match="row 5 of the training data differs from window 5 .* same length"):
        cache.check_input_ids(torch.cat([windows[:5], windows[6:7], windows[6:]]))
    with pytest.raises(ValueError, match=r"row 0 .*\(16 vs 17 tokens\)"):
        cache.check_input_ids(windows[:, :-1])
    with pytest.raises(ValueError, match="rows but the teacher cache .* holds"):
        cache.check_input_ids(windows[:-1])


def test_bad_settings_name_the_argument(teacher, tmp_path):
    model, tokenizer, _, windows = teacher
    cases = [(dict(k=0), "k \\(ids stored per token\\)"), (dict(method="beam"), "method must be one of"),
             (dict(temperature=0.0), "temperature must be"), (dict(logprob_dtype="int8"), "logprob_dtype"),
             (dict(windows_per_shard=0), "windows_per_shard"), (dict(batch_size=0), "batch_size")]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            _build(teacher, tmp_path / "bad", **settings)
    with pytest.raises(ValueError, match="windows hold token ids in"):
        build_teacher_cache(model, windows + 10_000, tmp_path / "bad", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="windows must be an integer tensor"):
        build_teacher_cache(model, windows[0], tmp_path / "bad", tokenizer=tokenizer)


def test_windows_overlap_by_one_token():
    windows = token_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert token_windows(torch.arange(10), 4, max_windows=2).shape == (2, 4)


def test_collator_pads_and_aligns_teacher_rows_with_the_labels():
    long = {"input_ids": [5, 6, 7, 8], "teacher_ids": torch.tensor([[-1, -1], [1, 2], [3, 4], [5, 6]]),
            "teacher_logprobs": torch.full((4, 2), -0.7)}
    short = {"input_ids": [9, 10], "labels": [-100, 10], "teacher_ids": [[7, 8, 9]],  # no row for the first token
             "teacher_logprobs": [[-0.1, -2.0, -3.0]]}
    batch = SparseTeacherCollator(pad_token_id=0)([long, short])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["teacher_ids"].shape == (2, 4, 3)
    assert batch["teacher_ids"][1].tolist() == [[-1, -1, -1], [7, 8, 9], [-1, -1, -1], [-1, -1, -1]]
    assert batch["teacher_ids"][0, 1].tolist() == [1, 2, -1], "K padded with -1"
    with pytest.raises(ValueError, match="example 0: teacher_ids has 2 rows for 4 input_ids"):
        SparseTeacherCollator()([{**long, "teacher_ids": long["teacher_ids"][:2]}])
    with pytest.raises(ValueError, match="missing \\['teacher_logprobs'\\]"):
        SparseTeacherCollator()([{"input_ids": [1], "teacher_ids": [[1]]}])


def _command(teacher_folder, text_file, out, *extra):
    return [sys.executable, "-m", "kdfast.cli", "teacher-cache", "--teacher", str(teacher_folder), "--text",
            str(text_file), "--out", str(out), "--seq-len", "17", "--top-k", "8", "--batch-size", "1",
            "--windows-per-shard", "4", *extra]


def _environment():
    return source_environment()


def test_kill_dash_nine_then_rerun_finishes_the_same_cache(teacher, tmp_path):
    _, tokenizer, teacher_folder, _ = teacher
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)  # ~350 windows, one teacher forward each: seconds of work, the kill after 20
    out = tmp_path / "cache"
    process = subprocess.Popen(_command(teacher_folder, text, out), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 5:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the writer ended before it could be killed: {process.stderr.read()[-2000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and len(killed["shards"]) >= 5
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(out)
    # What a kill during a write may leave: a temporary file, and a shard renamed into place but not yet listed.
    (out / "shard-00099.safetensors.tmp-12345").write_bytes(b"half a shard")
    unlisted = max(int(i) for i in killed["shards"]) + 1
    (out / f"shard-{unlisted:05d}.safetensors").write_bytes(b"not what the manifest will say")

    result = subprocess.run(_command(teacher_folder, text, out), env=_environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"kept {len(killed['shards'])}" in " ".join(result.stdout.split())
    resumed = TeacherCache(out)
    assert not list(out.glob("*.tmp-*"))
    for index, entry in killed["shards"].items():
        assert resumed.manifest.shards[int(index)]["sha256"] == entry["sha256"], "finished shards are kept"

    fresh = tmp_path / "uninterrupted"
    assert subprocess.run(_command(teacher_folder, text, fresh), env=_environment(), capture_output=True,
                          timeout=600).returncode == 0
    assert {i: e["sha256"] for i, e in TeacherCache(fresh).manifest.shards.items()} == \
        {i: e["sha256"] for i, e in resumed.manifest.shards.items()}


def test_a_second_writer_on_the_same_folder_is_refused(teacher, tmp_path):
    from kdfast.teacher_cache.writer import exclusive

    folder = tmp_path / "cache"
    folder.mkdir()
    refused = pytest.raises(RuntimeError, match=f"pid {os.getpid()}.* is writing the teacher cache")
    with exclusive(folder), refused, exclusive(folder):
        pass


def test_batch_reads_across_shards_as_items_do(teacher, tmp_path):
    cache = _build(teacher, tmp_path / "cache", windows_per_shard=5)
    batch = cache.batch(3, 12)  # windows from three shards
    for offset, window in enumerate(range(3, 12)):
        item = cache[window]
        for name in ("input_ids", "teacher_ids", "teacher_logprobs"):
            assert torch.equal(batch[name][offset], item[name]), (name, window)
    with pytest.raises(IndexError, match="out of range"):
        cache.batch(0, len(cache) + 1)
