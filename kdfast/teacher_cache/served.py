"""A teacher behind an inference server (vLLM's OpenAI-compatible server, or SGLang): the top-k prompt log-probs of
each token window, one request per window, several in flight, each retried through transient failures. What it
returns is what the local model's forward gives the writer: ids [W, L-1, k] (most probable first) and their float32
log-probs, row j the teacher's distribution of token j + 1 given tokens 0..j.

Both servers return the raw model's log-probs, softmax(logits) at T = 1: vLLM computes prompt log-probs from the
unprocessed logits under its default `logprobs_mode="raw_logprobs"`, and SGLang scales input log-probs by the
request's temperature only, which is sent as 1. The cache then holds the teacher at T = 1 over the server's whole
vocabulary (the LM head's rows, padding rows included), whatever temperature the loss uses later."""

from __future__ import annotations

import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

APIS = ("vllm", "sglang")
MAX_BACKOFF_SECONDS = 30.0
VLLM_DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs: it refuses prompt_logprobs above it with a 400
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def vllm_prompt_logprob_rows(prompt_logprobs: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [L-1, k] (int64, rank 1 first) and log-probs [L-1, k] (float32) of a vLLM completion's `prompt_logprobs`.

    vLLM's wire format (vllm/logprobs.py, append_logprobs_for_next_position): L entries, the first null (nothing
    predicts the first token), each other a dict {"<token id>": {"logprob", "rank", "decoded_token"}} built from the
    prompt token followed by the top n = prompt_logprobs ids (ranks 1..n, torch.topk's order). So the prompt token is
    the first key; when it is among the top n its entry is overwritten by its top-n rank and the dict has n entries,
    otherwise it keeps its own vocabulary rank and the dict has n + 1. That own rank is not always > n: vLLM versions
    count ids with a log-prob >= or > the token's, so a prompt token tied with the n-th can share a rank <= n with a
    top-n entry; then the first key is the extra one and is dropped. Any n >= k is read (a response that asked for
    more log-probs than the cache keeps)."""
    if not isinstance(prompt_logprobs, list) or not prompt_logprobs:
        raise ValueError(f"prompt_logprobs must be a non-empty list, got {type(prompt_logprobs).__name__}")
    if prompt_logprobs[0] is not None:
        raise ValueError("prompt_logprobs[0] must be null (nothing predicts the first token): the response does not "
                         "start at the window's first token")
    ids, values = [], []
    for position, row in enumerate(prompt_logprobs[1:], start=1):
        if not isinstance(row, dict):
            raise ValueError(f"prompt_logprobs[{position}] is {row!r}, not a dict of log-probs")
        entries = [(int(token), float(entry["logprob"]), entry.get("rank")) for token, entry in row.items()]
        if len(entries) > 1 and entries[0][2] in {rank for _, _, rank in entries[1:]}:
            entries = entries[1:]  # the prompt token, outside the top n but tied in rank with one of them
        top = sorted(entries, key=lambda entry: entry[2] if isinstance(entry[2], int) else math.inf)[:k]
        if len(top) < k:
            raise ValueError(f"prompt_logprobs[{position}] holds {len(row)} log-probs, fewer than k={k}: the request "
                             f"asked for fewer")
        if [rank for _, _, rank in top] != list(range(1, k + 1)):
            raise ValueError(f"prompt_logprobs[{position}] ranks {[rank for _, _, rank in top]} are not 1..{k}: the "
                             f"request asked for fewer than k={k}")
        ids.append([token for token, _, _ in top])
        values.append([value for _, value, _ in top])
    return _rows(ids, values, k)


def sglang_input_top_logprob_rows(input_top_logprobs: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [L-1, k] (int64) and log-probs [L-1, k] (float32) of an SGLang /generate answer's
    `meta_info.input_top_logprobs`.

    SGLang's wire format (managers/scheduler_output_processor_mixin.py and tokenizer_manager.py,
    detokenize_top_logprobs_tokens): with logprob_start_len=0, L entries, the first None (padded in: nothing predicts
    the first token), each other a list of top_logprobs_num [logprob, token_id, text] triples (text null unless
    return_text_in_logprobs), from torch.topk over the input log-probs and so most probable first."""
    if not isinstance(input_top_logprobs, list) or not input_top_logprobs:
        raise ValueError(f"input_top_logprobs must be a non-empty list, got {type(input_top_logprobs).__name__}")
    if input_top_logprobs[0] is not None:
        raise ValueError("input_top_logprobs[0] must be null (nothing predicts the first token): the response does "
                         "not start at the window's first token (logprob_start_len must be 0)")
    ids, values = [], []
    for position, row in enumerate(input_top_logprobs[1:], start=1):
        if not isinstance(row, list):
            raise ValueError(f"input_top_logprobs[{position}] is {row!r}, not a list of log-probs")
        if len(row) < k:
            raise ValueError(f"input_top_logprobs[{position}] holds {len(row)} log-probs, fewer than k={k}: the "
                             f"request asked for fewer")
        ids.append([int(entry[1]) for entry in row[:k]])
        values.append([float(entry[0]) for entry in row[:k]])
    return _rows(ids, values, k)


def _rows(ids: list, values: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(values, dtype=torch.float32).reshape(len(values), k)
    if bool(values.isnan().any()):
        raise ValueError("the server returned NaN log-probs (a broken model or overflowed logits)")
    return torch.tensor(ids, dtype=torch.int64).reshape(len(ids), k), values


class ServerRefused(RuntimeError):
    """An answer other than 200 that is not worth retrying (a 4xx): the request itself is wrong."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServedTeacher:
    """The teacher behind `url`. `window_targets` (the cache's fixed-length windows) and `row_targets` (rows of any
    length: a training batch's) ask it for each row's top-k prompt log-probs, one request per row, at most
    `requests_in_flight` at once; connection errors, timeouts, 429 and 5xx answers are retried `retries`
    times with exponential backoff, and every request gives up after `request_timeout` seconds without an answer."""

    def __init__(self, url: str, *, api: str = "vllm", model: str | None = None, requests_in_flight: int = 1,
                 request_timeout: float = 60.0, retries: int = 5, backoff: float = 0.5):
        import requests  # the integrations extra; imported here so that the module's parsers need only torch

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if not isinstance(requests_in_flight, int) or requests_in_flight < 1:
            raise ValueError(f"requests_in_flight must be an int >= 1, got {requests_in_flight!r}")
        if not _positive(request_timeout):
            raise ValueError(f"request_timeout must be a number of seconds > 0, got {request_timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (_positive(backoff) or backoff == 0):
            raise ValueError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        self._requests = requests
        self.url, self.api = url.rstrip("/"), api
        self.requests_in_flight, self.request_timeout = requests_in_flight, float(request_timeout)
        self.retries, self.backoff = retries, float(backoff)
        self._closed = threading.Event()  # wakes retry waits, so that close() never waits out a backoff
        self._local, self._sessions, self._sessions_lock = threading.local(), [], threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=requests_in_flight, thread_name_prefix="kdfast-served-teacher")
        try:
            self.model_name = model if model is not None else self._served_model_name()
        except BaseException:
            self.close()
            raise

    def window_targets(self, windows: torch.Tensor, k: int, on_window=lambda tokens: None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """windows [W, L] token ids -> ids [W, L-1, k] int64 and log-probs [W, L-1, k] float32, in window order;
        `on_window(L - 1)` after each window (progress)."""
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
            raise ValueError(f"windows must be an integer tensor [num_windows, window_tokens], got "
                             f"{tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__}")
        if windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ValueError(f"windows must hold at least one window of at least 2 tokens, got {tuple(windows.shape)}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        ids, logprobs = zip(*self._ask(windows.tolist(), k, on_window, "window"))
        return torch.stack(ids), torch.stack(logprobs)

    def row_targets(self, rows, k: int, on_row=lambda tokens: None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Token rows of any lengths (1-D integer tensors or lists of ids) -> per row, in order, ids [n-1, k] int64
        and log-probs [n-1, k] float32 (empty for a row of fewer than 2 tokens, which is not sent);
        `on_row(n - 1)` after each row."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        rows = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in rows]
        return self._ask(rows, k, on_row, "row")

    def _ask(self, rows: list, k: int, on_row, label: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._closed.is_set():
            raise RuntimeError(f"the served teacher at {self.url} is closed")
        futures = [self._pool.submit(self._targets, f"{label} {index}", row, k) if len(row) >= 2 else None
                   for index, row in enumerate(rows)]
        targets = []
        try:
            for row, future in zip(rows, futures):
                if future is None:
                    targets.append((torch.empty(0, k, dtype=torch.int64), torch.empty(0, k)))
                else:
                    targets.append(future.result())
                on_row(max(len(row) - 1, 0))
        finally:
            for future in futures:  # after a failure: the rows not yet sent stay unsent
                if future is not None:
                    future.cancel()
        return targets

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of `text` (no special tokens), from vLLM's /tokenize; None where the server has no
        such endpoint (SGLang's API here): then the tokenizer cannot be checked against the server's."""
        if self.api != "vllm":
            return None
        payload = {"model": self.model_name, "prompt": text, "add_special_tokens": False}
        try:
            answer = self._request("POST", "/tokenize", "the tokenizer check", json=payload)
        except ServerRefused as refusal:
            if refusal.status in (404, 405):
                return None
            raise
        return [int(token) for token in _field(answer, ("tokens",), self.url, "the tokenizer check")]

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _targets(self, where: str, tokens: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.api == "vllm":
            # The request TRL's VLLMClient.get_sequence_logprobs sends, for one prompt of token ids.
            payload = {"model": self.model_name, "prompt": tokens, "max_tokens": 1, "temperature": 1.0,
                       "prompt_logprobs": k}
            answer = self._request("POST", "/v1/completions", where, json=payload, k=k)
            rows = _field(answer, ("choices", 0, "prompt_logprobs"), self.url, where)
            parse = vllm_prompt_logprob_rows
        else:
            # max_new_tokens=1: SGLang samples that token in the prefill that scores the prompt, so it costs nothing.
            payload = {"input_ids": tokens, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
                       "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}}
            answer = self._request("POST", "/generate", where, json=payload, k=k)
            rows = _field(answer, ("meta_info", "input_top_logprobs"), self.url, where)
            parse = sglang_input_top_logprob_rows
        if not isinstance(rows, list) or len(rows) != len(tokens):
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise ValueError(f"the {self.api} server at {self.url} answered {where} with {got} positions of log-probs "
                             f"for its {len(tokens)} tokens")
        try:
            return parse(rows, k)
        except ValueError as error:
            raise ValueError(f"the {self.api} server at {self.url} answered {where} with {error}") from None

    def _served_model_name(self) -> str:
        if self.api == "vllm":
            return str(_field(self._request("GET", "/v1/models", "the model query"), ("data", 0, "id"), self.url,
                              "the model query"))
        try:
            answer = self._request("GET", "/get_model_info", "the model query")
        except ServerRefused as refusal:
            if refusal.status != 404:
                raise
            answer = self._request("GET", "/model_info", "the model query")  # its newer name
        return str(_field(answer, ("model_path",), self.url, "the model query"))

    def _request(self, method: str, path: str, where: str, *, json=None, k: int | None = None):
        requests = self._requests
        last_error = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(MAX_BACKOFF_SECONDS, self.backoff * 2 ** (attempt - 1)) * random.uniform(1.0, 1.25)
                if self._closed.wait(delay):
                    raise RuntimeError(f"the served teacher at {self.url} was closed while retrying {where}")
            try:
                response = self._session().request(method, self.url + path, json=json,
                                                   timeout=(self.request_timeout, self.request_timeout))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                last_error = f"{type(error).__name__}: {error}"
                continue
            if response.status_code in RETRIED_STATUSES:
                last_error = f"HTTP {response.status_code}: {_server_message(response)}"
                continue
            if response.status_code != 200:
                raise ServerRefused(self._refusal(response, path, where, k), response.status_code)
            try:
                return response.json()
            except ValueError:
                last_error = f"an answer that is not JSON: {response.text[:200]!r}"
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        raise RuntimeError(f"the {self.api} server at {self.url} did not answer {where} after {attempts} (request "
                           f"timeout {self.request_timeout:g} s); last error: {last_error}")

    def _refusal(self, response, path: str, where: str, k: int | None) -> str:
        message = (f"the {self.api} server at {self.url} refused {where} ({path}) with HTTP {response.status_code}: "
                   f"{_server_message(response)}")
        if self.api == "vllm" and response.status_code == 400 and k is not None and k > VLLM_DEFAULT_MAX_LOGPROBS:
            message += (f". vLLM answers at most --max-logprobs log-probs per token ({VLLM_DEFAULT_MAX_LOGPROBS} by "
                        f"default): start it with --max-logprobs {k} or more, or ask for k <= "
                        f"{VLLM_DEFAULT_MAX_LOGPROBS}")
        return message

    def _session(self):
        # One session (one keep-alive connection) per pool thread: requests.Session is not documented thread-safe.
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._requests.Session()
            with self._sessions_lock:
                self._sessions.append(session)
        return session


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _field(answer, keys: tuple, url: str, where: str):
    value = answer
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            path = "".join(f"[{key!r}]" for key in keys)
            raise ValueError(f"the server at {url} answered {where} without {path}: {str(answer)[:300]}") from None
    return value


def _server_message(response) -> str:
    """The error's message, from vLLM's {"error": {"message"}} (older: {"message"}), SGLang's {"error": {"message"}},
    FastAPI's {"detail"}; else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason or ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return str(body)[:500]
