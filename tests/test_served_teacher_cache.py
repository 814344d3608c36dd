"""A teacher cache written from a served teacher (vLLM's and SGLang's APIs, answered by the local stand-in server):
the same ids as the local cache of the same model and log-probs within fp16, the same bytes per token, the server,
API and model name in the manifest, resumable after a server that gave up mid-way, settings a server cannot honour
refused, and the command's --server path."""

import json

import pytest
import torch
from conftest import source_environment
from forked_command import run_command

from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.teacher_cache import TeacherCache, build_teacher_cache
from kdfast.teacher_cache.data import text_tokens, token_windows
from kdfast.teacher_cache.local_server import serving
from kdfast.teacher_cache.served import ServedTeacher

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(60))
SETTINGS = {"k": 8, "windows_per_shard": 8, "show_progress": False}
FAST = {"request_timeout": 10.0, "backoff": 0.01}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tokenizer = train_tokenizer([TEXT], 300)
    model = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), len(tokenizer) + 4, 16, seed=5).eval()
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    windows = token_windows(text_tokens(folder / "text.txt", tokenizer), 17)
    local = build_teacher_cache(model, windows, tmp_path_factory.mktemp("local"), tokenizer=tokenizer, **SETTINGS)
    return model, tokenizer, folder, windows, local


def _assert_same_targets(cache: TeacherCache, local: TeacherCache) -> None:
    served, expected = cache.batch(0, len(cache)), local.batch(0, len(local))
    assert torch.equal(served["input_ids"], expected["input_ids"])
    assert torch.equal(served["teacher_ids"], expected["teacher_ids"]), "ids bit for bit"
    # Both stored as fp16 from float32 values of the same model: equal within fp16's rounding.
    torch.testing.assert_close(served["teacher_logprobs"], expected["teacher_logprobs"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("api, fail_every", [("vllm", 0), ("sglang", 0), ("vllm", 5)])
def test_served_cache_equals_the_local_cache(teacher, tmp_path, api, fail_every):
    """fail_every=5: a server that fails one request in five (HTTP 500) still yields the same cache."""
    model, tokenizer, _, windows, local = teacher
    with serving(model, api=api, vocab_size=len(tokenizer), model_name="tiny-teacher", fail_every=fail_every) as url, \
            ServedTeacher(url, api=api, requests_in_flight=4, **FAST) as served:
        cache = build_teacher_cache(served, windows, tmp_path, tokenizer=tokenizer, **SETTINGS)
    _assert_same_targets(cache, local)
    # The same tensors; only each shard's small header differs (it names the teacher: its weights, or "served").
    assert cache.stats["bytes_per_token"] == pytest.approx(local.stats["bytes_per_token"], abs=0.5)
    assert cache.manifest.origin == {"source": "server", "server": url, "api": api, "model": "tiny-teacher"}
    assert cache.settings.temperature == 1.0 and cache.settings.teacher == "tiny-teacher"


def test_a_server_that_gives_up_midway_leaves_a_cache_that_resumes(teacher, tmp_path):
    model, tokenizer, _, windows, local = teacher
    assert local.settings.num_shards >= 3
    # Answers the first two shards' windows, then 503 for ever: the run fails naming the server.
    with serving(model, api="vllm", vocab_size=len(tokenizer), max_requests=2 * 8) as url, \
            ServedTeacher(url, retries=1, **FAST) as served, pytest.raises(RuntimeError, match=f"{url}.*window"):
        build_teacher_cache(served, windows, tmp_path, tokenizer=tokenizer, **SETTINGS)
    finished = json.loads((tmp_path / "manifest.json").read_text())
    assert not finished["complete"] and sorted(map(int, finished["shards"])) == [0, 1]
    with serving(model, api="vllm", vocab_size=len(tokenizer)) as url, ServedTeacher(url, **FAST) as served:
        cache = build_teacher_cache(served, windows, tmp_path, tokenizer=tokenizer, **SETTINGS)
    assert cache.stats["shards_computed"] == local.settings.num_shards - 2
    _assert_same_targets(cache, local)


def test_settings_a_server_cannot_honour_are_refused(teacher, tmp_path):
    model, tokenizer, _, windows, _ = teacher
    with serving(model, api="vllm", vocab_size=len(tokenizer)) as url, ServedTeacher(url, **FAST) as served:
        with pytest.raises(ValueError, match="temperature=2.0: inference servers return the raw model's"):
            build_teacher_cache(served, windows, tmp_path, tokenizer=tokenizer, temperature=2.0, **SETTINGS)
        with pytest.raises(ValueError, match="method='sample': a served teacher gives its top-k"):
            build_teacher_cache(served, windows, tmp_path, tokenizer=tokenizer, method="sample", **SETTINGS)
    # A server whose ids run past the tokenizer's vocabulary serves a model of another tokenizer.
    other = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), 4 * len(tokenizer), 16, seed=6)
    with serving(other, api="vllm", vocab_size=4 * len(tokenizer)) as url, ServedTeacher(url, **FAST) as served, \
            pytest.raises(ValueError, match="returned token id .* outside the vocabulary"):
        build_teacher_cache(served, windows, tmp_path / "wide", tokenizer=tokenizer, **SETTINGS)


def test_the_command_writes_a_served_cache(teacher, tmp_path):
    model, tokenizer, folder, _, local = teacher
    with serving(model, api="vllm", vocab_size=len(tokenizer)) as url:
        result = run_command(
            ["-m", "kdfast.cli", "teacher-cache", "--server", url, "--tokenizer", str(folder),
             "--text", str(folder / "text.txt"), "--out", str(tmp_path / "cache"), "--seq-len", "17", "--top-k", "8",
             "--windows-per-shard", "8", "--requests-in-flight", "2", "--request-timeout", "30"],
            env=source_environment(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    _assert_same_targets(TeacherCache(tmp_path / "cache"), local)
    refused = run_command(["-m", "kdfast.cli", "teacher-cache", "--server", url, "--text", str(folder / "text.txt"),
                           "--out", str(tmp_path / "other")], env=source_environment(), cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "--server needs --tokenizer" in refused.stderr
