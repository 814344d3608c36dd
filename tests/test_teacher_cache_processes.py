"""Many processes writing one teacher cache: whatever the number of processes (and whichever finishes last), the
folder ends with the one manifest and the same shard files, byte for byte, as one process writes; a part rerun
resumes it; a cache begun with one process count is finished with another."""

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import source_environment

from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.teacher_cache import TeacherCache, build_teacher_cache
from kdfast.teacher_cache.data import text_tokens, token_windows

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(200))
SETTINGS = {"k": 8, "windows_per_shard": 16, "show_progress": False}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tokenizer = train_tokenizer([TEXT], 300)
    model = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), len(tokenizer) + 4, 16, seed=3)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    windows = token_windows(text_tokens(folder / "text.txt", tokenizer), 17)  # as the command reads the text
    single = build_teacher_cache(model.eval(), windows, tmp_path_factory.mktemp("single"), tokenizer=tokenizer,
                                 **SETTINGS)
    return model, tokenizer, folder, windows, single


def _shard_bytes(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.safetensors"))}


def _same_cache(folder: Path, single: TeacherCache) -> None:
    cache = TeacherCache(folder)
    assert _shard_bytes(folder) == _shard_bytes(single.folder), "the same shard files, byte for byte"
    assert cache.manifest.shards == single.manifest.shards and not cache.settings.differences(single.settings)
    assert not list(folder.glob("manifest-*-of-*.json")), "the parts are merged away"


def test_each_process_writes_its_part_and_the_last_completes_the_cache(teacher, tmp_path):
    model, tokenizer, _, windows, single = teacher
    assert single.settings.num_shards >= 4
    first = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2,
                                **SETTINGS)
    assert first is None, "process 1 of 2 alone does not complete the cache"
    part = json.loads((tmp_path / "manifest-1-of-2.json").read_text())
    assert sorted(map(int, part["shards"])) == list(range(1, single.settings.num_shards, 2))
    with pytest.raises(FileNotFoundError, match="not a kdfast teacher cache"):
        TeacherCache(tmp_path)
    last = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=2,
                               **SETTINGS)
    _same_cache(tmp_path, single)
    assert last.stats["processes"] == 2 and last.stats["shards_computed"] == single.settings.num_shards


def test_a_part_rerun_resumes_and_another_process_count_finishes(teacher, tmp_path):
    model, tokenizer, _, windows, single = teacher
    build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=3, **SETTINGS)
    damaged = tmp_path / "shard-00003.safetensors"  # one of process 0's shards
    damaged.write_bytes(damaged.read_bytes()[:-7])
    again = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=3,
                                **SETTINGS)
    assert again is None
    assert json.loads((tmp_path / "manifest-0-of-3.json").read_text())["stats"]["shards_computed"] == 1
    # The rest with two processes: shards 0 and 3 (process 0's of three) are adopted, not recomputed.
    build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2, **SETTINGS)
    cache = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=2,
                                **SETTINGS)
    _same_cache(tmp_path, single)
    again = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, **SETTINGS)
    assert again.stats["shards_computed"] == 0, "a complete cache is kept by any later run"
    assert cache.stats["shards_computed"] < single.settings.num_shards


def _unfinish_part(folder: Path, name: str) -> None:
    """The part as its writer leaves it after its last shard and before it marks the part complete."""
    part = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps({**part, "complete": False, "stats": {}}))


def test_a_part_whose_writer_still_runs_is_left_to_merge_itself(teacher, tmp_path):
    """Every shard listed is not enough: a part whose writer holds its lock has not finished, and merging it then
    counted one process of two (a race torchrun's two processes met)."""
    model, tokenizer, _, windows, single = teacher
    build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2, **SETTINGS)
    _unfinish_part(tmp_path, "manifest-1-of-2.json")
    with open(tmp_path / ".lock-1-of-2", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=2,
                                   **SETTINGS) is None, "process 1 still runs: it merges, not process 0"
        fcntl.flock(lock, fcntl.LOCK_UN)
    last = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2,
                               **SETTINGS)
    _same_cache(tmp_path, single)
    assert last.stats["processes"] == 2


def test_a_part_completed_while_the_merge_reads_counts_its_process(teacher, tmp_path, monkeypatch):
    """Process 1 completes its part and lets go of its lock between process 0's read of the parts and its look at
    that lock: the merge read the part again, or it merged with one process of two (torchrun's two processes met
    this on a loaded 2-core machine)."""
    from kdfast.teacher_cache import processes

    model, tokenizer, _, windows, single = teacher
    build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2, **SETTINGS)
    finished = (tmp_path / "manifest-1-of-2.json").read_text()
    _unfinish_part(tmp_path, "manifest-1-of-2.json")
    looked_at = []
    still_written = processes._still_written

    def process_1_finishes_first(folder, name):
        looked_at.append(name)
        (folder / "manifest-1-of-2.json").write_text(finished)  # written, then its lock let go
        return still_written(folder, name)

    monkeypatch.setattr(processes, "_still_written", process_1_finishes_first)
    cache = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=2,
                                **SETTINGS)
    assert looked_at == ["manifest-1-of-2.json"]
    _same_cache(tmp_path, single)
    assert cache.stats["processes"] == 2


def test_a_part_whose_writer_died_does_not_hold_the_merge(teacher, tmp_path):
    model, tokenizer, _, windows, single = teacher
    build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=1, num_processes=2, **SETTINGS)
    _unfinish_part(tmp_path, "manifest-1-of-2.json")  # and no process holds its lock
    cache = build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=0, num_processes=2,
                                **SETTINGS)
    _same_cache(tmp_path, single)
    assert cache.stats["processes"] == 1, "only the part that finished counts"


def test_bad_process_settings_name_the_argument(teacher, tmp_path):
    model, tokenizer, _, windows, _ = teacher
    for index, count, message in ((0, 0, "num_processes"), (2, 2, "process_index"), (-1, 2, "process_index")):
        with pytest.raises(ValueError, match=message):
            build_teacher_cache(model, windows, tmp_path, tokenizer=tokenizer, process_index=index,
                                num_processes=count, **SETTINGS)


def _command(teacher_folder, text_file, out, *extra):
    return ["-m", "kdfast.cli", "teacher-cache", "--teacher", str(teacher_folder), "--text", str(text_file),
            "--out", str(out), "--seq-len", "17", "--top-k", "8", "--windows-per-shard", "16", *extra]


def _environment():
    return source_environment(OMP_NUM_THREADS="1")


def test_two_job_array_processes_make_the_cache_one_process_makes(teacher, tmp_path):
    _, _, teacher_folder, _, single = teacher
    text = teacher_folder / "text.txt"
    jobs = [subprocess.Popen([sys.executable, *_command(teacher_folder, text, tmp_path / "cache", "--num-shards",
                                                        "2", "--shard-index", str(index))],
                             env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for index in range(2)]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, out[-2000:] + err[-3000:]
    _same_cache(tmp_path / "cache", single)


def test_torchrun_splits_the_cache_between_its_processes(teacher, tmp_path):
    _, _, teacher_folder, _, single = teacher
    text = teacher_folder / "text.txt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *_command(teacher_folder, text, tmp_path / "cache", "--device", "cpu")],
                            env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    _same_cache(tmp_path / "cache", single)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["stats"]["processes"] == 2


def test_the_weights_checksum_ignores_threads_and_sees_one_ulp(teacher):
    from kdfast.teacher_cache.fingerprints import weights_checksum

    model = models.new_model(models.ModelSize(hidden=256, layers=1, heads=4), 4096, 16, seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weights_checksum(model)
        torch.set_num_threads(max(2, threads))
        assert weights_checksum(model) == one, "processes with other thread counts make the same cache"
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[7, 3] = torch.nextafter(weight[7, 3], torch.tensor(1.0))
    assert weights_checksum(model) != one
