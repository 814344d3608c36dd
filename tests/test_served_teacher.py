"""A teacher behind a vLLM or SGLang server: its targets equal the local model's top-k bit for bit (the prompt token
inside the top-k and outside it), each server's answer is parsed as the server writes it (the extra prompt-token
entry, ties in rank, the empty first row), transient failures are retried, and a server that never answers or
refuses the request fails in bounded time with a message that names it. Every server runs on a local port and is
shut down by its test."""

import re
import socket
import time

import pytest
import torch

from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.teacher_cache.data import token_windows
from kdfast.teacher_cache.local_server import serving
from kdfast.teacher_cache.served import ServedTeacher, sglang_input_top_logprob_rows, vllm_prompt_logprob_rows
from kdfast.teacher_cache.targets import top_k_targets

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(40))
K = 8
FAST = {"request_timeout": 5.0, "retries": 5, "backoff": 0.01}


@pytest.fixture(scope="module")
def teacher():
    """A tiny causal LM, its vocabulary (the tokenizer's, below the head's rows) and windows: text, where the next
    token is mostly outside the untrained model's top-k, and the model's own greedy continuations, where it is the
    top-1."""
    tokenizer = train_tokenizer([TEXT], 300)
    vocab = len(tokenizer)
    model = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), vocab + 4, 16, seed=1).eval()
    text = token_windows(torch.tensor(tokenizer(TEXT)["input_ids"]), 17)[:6]
    greedy = text[:2, :4].clone()
    with torch.no_grad():
        while greedy.shape[1] < 17:
            next_ids = model(input_ids=greedy).logits[:, -1, :vocab].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, next_ids], dim=1)
    return model, vocab, torch.cat([text, greedy])


def _expected(model, vocab, windows):
    """The writer's targets, one window per forward as the server computes them."""
    with torch.no_grad():
        rows = [top_k_targets(model(input_ids=window[None]).logits[0, :-1, :vocab], K, 1.0) for window in windows]
    return torch.stack([ids for ids, _ in rows]), torch.stack([values for _, values in rows])


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_targets_equal_the_local_models(teacher, api):
    model, vocab, windows = teacher
    expected_ids, expected = _expected(model, vocab, windows)
    inside = (expected_ids == windows[:, 1:, None]).any(-1)
    # vLLM's k + 1 entries (the prompt token outside the top-k) and its k entries (inside) both occur.
    assert int((~inside).sum()) >= 20 and int(inside.sum()) >= 20, (int((~inside).sum()), int(inside.sum()))
    done = []
    with serving(model, api=api, vocab_size=vocab) as url, ServedTeacher(url, api=api, **FAST) as served:
        assert served.model_name == type(model).__name__, "what the server reports"
        ids, logprobs = served.window_targets(windows, K, on_window=done.append)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and ids.shape == (len(windows), 16, K)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(logprobs, expected), "float32 through JSON and back, exactly"
    assert done == [16] * len(windows)


def test_vllm_answer_holds_the_prompt_token_first(teacher):
    import requests

    model, vocab, windows = teacher
    window = windows[-1].tolist()  # greedy: the prompt token is the top-1 from position 4 on
    with serving(model, api="vllm", vocab_size=vocab, model_name="teacher") as url:
        payload = {"model": "teacher", "prompt": window, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
        rows = requests.post(f"{url}/v1/completions", json=payload, timeout=10).json()["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(window)
    for position, row in enumerate(rows[1:], start=1):
        assert next(iter(row)) == str(window[position]), "the prompt token is the first key"
        assert len(row) in (K, K + 1)
    assert len(rows[-1]) == K and rows[-1][str(window[-1])]["rank"] == 1


def _entry(logprob, rank):
    return {"logprob": logprob, "rank": rank, "decoded_token": "x"}


def test_vllm_rows_keep_the_top_k_by_rank():
    outside = {"7": _entry(-9.0, 40), "3": _entry(-0.5, 1), "4": _entry(-1.5, 2), "5": _entry(-2.0, 3)}
    inside = {"4": _entry(-1.5, 2), "3": _entry(-0.5, 1), "5": _entry(-2.0, 3)}
    # The prompt token (6) tied with the 3rd: rank 3 under "1 + strictly larger", as the 3rd's.
    tied = {"6": _entry(-2.0, 3), "3": _entry(-0.5, 1), "4": _entry(-1.5, 2), "5": _entry(-2.0, 3)}
    ids, logprobs = vllm_prompt_logprob_rows([None, outside, inside, tied], 3)
    assert ids.tolist() == [[3, 4, 5]] * 3 and ids.dtype == torch.int64
    assert logprobs.tolist() == [[-0.5, -1.5, -2.0]] * 3 and logprobs.dtype == torch.float32
    assert vllm_prompt_logprob_rows([None, outside], 2)[0].tolist() == [[3, 4]], "more log-probs than k"
    with pytest.raises(ValueError, match=r"prompt_logprobs\[1\] holds 3 log-probs, fewer than k=4"):
        vllm_prompt_logprob_rows([None, inside], 4)
    with pytest.raises(ValueError, match="must be null"):
        vllm_prompt_logprob_rows([inside, inside], 3)
    with pytest.raises(ValueError, match=r"prompt_logprobs\[2\] is None"):
        vllm_prompt_logprob_rows([None, inside, None], 3)
    with pytest.raises(ValueError, match="NaN"):
        vllm_prompt_logprob_rows([None, {**inside, "3": _entry(float("nan"), 1)}], 3)


def test_sglang_rows_keep_the_first_k():
    row = [[-0.5, 3, None], [-1.5, 4, "a"], [-2.0, 5, None]]
    ids, logprobs = sglang_input_top_logprob_rows([None, row, row], 2)
    assert ids.tolist() == [[3, 4]] * 2 and logprobs.tolist() == [[-0.5, -1.5]] * 2
    with pytest.raises(ValueError, match=r"input_top_logprobs\[1\] holds 3 log-probs, fewer than k=4"):
        sglang_input_top_logprob_rows([None, row], 4)
    with pytest.raises(ValueError, match="logprob_start_len must be 0"):
        sglang_input_top_logprob_rows([row, row], 2)


def test_retries_ride_out_a_server_failing_one_request_in_five(teacher):
    model, vocab, windows = teacher
    expected_ids, expected = _expected(model, vocab, windows)
    with serving(model, api="vllm", vocab_size=vocab, fail_every=5) as url, \
            ServedTeacher(url, requests_in_flight=2, **FAST) as served:
        ids, logprobs = served.window_targets(windows, K)
    assert torch.equal(ids, expected_ids) and torch.equal(logprobs, expected)


def test_requests_in_flight_give_the_same_targets_in_window_order(teacher):
    model, vocab, windows = teacher
    with serving(model, api="sglang", vocab_size=vocab) as url:
        with ServedTeacher(url, api="sglang", **FAST) as one:
            single = one.window_targets(windows, K)
        with ServedTeacher(url, api="sglang", requests_in_flight=4, **FAST) as four:
            parallel = four.window_targets(windows, K)
    assert torch.equal(single[0], parallel[0]) and torch.equal(single[1], parallel[1])


def test_rows_of_any_length_get_their_own_targets(teacher):
    model, vocab, windows = teacher
    rows = [windows[0, :5], windows[1, :1], windows[2].tolist(), windows[3, :2]]
    done = []
    with serving(model, api="vllm", vocab_size=vocab) as url, \
            ServedTeacher(url, requests_in_flight=3, **FAST) as served:
        targets = served.row_targets(rows, K, on_row=done.append)
    assert done == [4, 0, 16, 1]
    assert targets[1][0].shape == (0, K) and targets[1][1].shape == (0, K), "one token: nothing to predict, not sent"
    for row, (ids, logprobs) in zip(rows, targets):
        if len(row) > 1:
            expected_ids, expected = _expected(model, vocab, torch.as_tensor(row)[None])
            assert torch.equal(ids, expected_ids[0]) and torch.equal(logprobs, expected[0])


def test_a_server_that_never_answers_fails_in_bounded_time(teacher):
    model, vocab, windows = teacher
    started = time.monotonic()
    with serving(model, api="vllm", vocab_size=vocab, hang=True) as url, \
            ServedTeacher(url, model="teacher", request_timeout=0.3, retries=1, backoff=0.01) as served, \
            pytest.raises(RuntimeError) as failure:
        served.window_targets(windows[:1], K)
    assert time.monotonic() - started < 5
    assert re.search(f"server at {url} did not answer window 0 after 2 attempts .*Timeout", str(failure.value))


def test_a_server_over_its_request_limit_fails_after_the_retries(teacher):
    model, vocab, windows = teacher
    with serving(model, api="sglang", vocab_size=vocab, max_requests=1) as url, \
            ServedTeacher(url, api="sglang", retries=2, backoff=0.01) as served, \
            pytest.raises(RuntimeError, match="did not answer window 1 after 3 attempts.*HTTP 503"):
        served.window_targets(windows[:2], K)


def test_a_refused_request_fails_at_once_with_the_servers_reason(teacher):
    model, vocab, windows = teacher
    started = time.monotonic()
    too_many = r"HTTP 400: Requested prompt logprobs of 32, which is greater than max allowed: 20\. .*--max-logprobs 32"
    with serving(model, api="vllm", vocab_size=vocab) as url, ServedTeacher(url, backoff=10.0) as served, \
            pytest.raises(RuntimeError, match=too_many):
        served.window_targets(windows[:1], 32)
    with serving(model, api="vllm", vocab_size=vocab) as url, \
            ServedTeacher(url, model="other", backoff=10.0) as served, \
            pytest.raises(RuntimeError, match="refused window 0 .* HTTP 404: The model `other` does not exist"):
        served.window_targets(windows[:1], K)
    assert time.monotonic() - started < 5, "no retries, no backoff"


def test_no_server_at_the_url_fails_the_model_query():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RuntimeError, match=f"sglang server at {url} did not answer the model query .*ConnectionError"):
        ServedTeacher(url, api="sglang", request_timeout=1.0, retries=1, backoff=0.01)


def test_bad_arguments_name_the_argument():
    cases = [(dict(url="localhost:8000"), "url must start with http"), (dict(api="tgi"), "api must be one of"),
             (dict(requests_in_flight=0), "requests_in_flight"), (dict(request_timeout=0), "request_timeout"),
             (dict(retries=-1), "retries"), (dict(backoff=-1.0), "backoff")]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            ServedTeacher(**{"url": "http://127.0.0.1:9", "model": "m", **arguments})
