"""A stand-in for a vLLM or SGLang server, for tests and benchmarks: a local Hugging Face causal LM's top-k prompt
log-probs in each server's wire format (vLLM: GET /v1/models, POST /v1/completions; SGLang: GET /get_model_info,
POST /generate), computed as the teacher cache's writer computes them, so that a served teacher's targets equal the
local cache of the same model. Faults on demand: every n-th request a 500 (`fail_every`), no answer at all until
shutdown (`hang`), 503 after `max_requests`.

    python -m kdfast.teacher_cache.local_server --model DIR --api vllm --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from kdfast.teacher_cache.targets import top_k_targets

APIS = ("vllm", "sglang")
VLLM_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default


class Refused(ValueError):
    """A request the real server refuses: 400, or 404 for a model it does not serve."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class LogprobServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must not keep the process alive

    def __init__(self, model, *, api: str, vocab_size: int, model_name: str | None = None, tokenizer=None,
                 max_logprobs: int = VLLM_MAX_LOGPROBS, fail_every: int = 0, hang: bool = False,
                 max_requests: int | None = None, host: str = "127.0.0.1", port: int = 0):
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        super().__init__((host, port), _Handler)
        self.model, self.api, self.vocab_size, self.tokenizer = model.eval(), api, vocab_size, tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.max_logprobs, self.fail_every, self.hang, self.max_requests = max_logprobs, fail_every, hang, max_requests
        self.requests = 0  # scoring requests received, faults included
        self.released = threading.Event()  # set at shutdown: hanging handlers return
        self._count_lock, self._forward_lock = threading.Lock(), threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def fault(self) -> tuple[int, str] | None:
        """The injected failure for this scoring request, if any: (HTTP status, message), status 0 for no answer."""
        with self._count_lock:
            self.requests += 1
            count = self.requests
        if self.hang:
            self.released.wait()
            return 0, ""
        if self.max_requests is not None and count > self.max_requests:
            return 503, f"request limit of {self.max_requests} reached"
        if self.fail_every and count % self.fail_every == 0:
            return 500, f"injected failure of request {count}"
        return None

    def top_logprobs(self, tokens: list, k: int):
        """Per predicted position j (1..L-1): the top-k ids and log-probs, the prompt token's log-prob and its rank."""
        device = self.model.get_output_embeddings().weight.device
        with self._forward_lock, torch.no_grad():
            ids = torch.tensor(tokens, device=device)
            logits = self.model(input_ids=ids[None]).logits[0, :-1, :self.vocab_size].float()
        top_ids, top_values = top_k_targets(logits, k, 1.0)
        logprobs = torch.log_softmax(logits, dim=-1)  # top_k_targets' own values, for the prompt tokens
        own = logprobs.gather(-1, ids[1:, None])
        # 1 + the ids with a strictly larger log-prob (vLLM's rank; some versions count >= instead).
        ranks = (logprobs > own).sum(-1) + 1
        return top_ids.tolist(), top_values.tolist(), own[:, 0].tolist(), ranks.tolist()

    def decoded(self, token: int):
        return None if self.tokenizer is None else self.tokenizer.decode([token])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers: clients reuse their connections

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        if server.api == "vllm" and self.path == "/v1/models":
            self._answer(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                           "owned_by": "vllm", "max_model_len": None}]})
        elif server.api == "sglang" and self.path in ("/get_model_info", "/model_info"):
            self._answer(200, {"model_path": server.model_name, "tokenizer_path": server.model_name,
                               "is_generation": True})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self):
        server = self.server
        expected = "/v1/completions" if server.api == "vllm" else "/generate"
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if server.api == "vllm" and self.path == "/tokenize" and server.tokenizer is not None:
            request = json.loads(body)  # vLLM's tokenizer endpoint, for the trainer's tokenizer check
            ids = server.tokenizer(request["prompt"], add_special_tokens=request.get("add_special_tokens", True))
            return self._answer(200, {"tokens": ids["input_ids"], "count": len(ids["input_ids"])})
        if self.path != expected:
            return self._answer(404, {"detail": "Not Found"})
        fault = server.fault()
        if fault is not None:
            status, message = fault
            return self._answer(status, _error(message, status)) if status else self.close_without_answer()
        try:
            request = _json(body)
            answer = _vllm_answer(server, request) if server.api == "vllm" else _sglang_answer(server, request)
        except Refused as refusal:
            return self._answer(refusal.status, _error(str(refusal), refusal.status))
        self._answer(200, answer)

    def close_without_answer(self):
        self.close_connection = True

    def _answer(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _error(message: str, status: int) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _json(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except ValueError as error:
        raise Refused(f"the body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise Refused("the body must be a JSON object")
    return request


def _tokens(server: LogprobServer, tokens) -> list:
    if not (isinstance(tokens, list) and len(tokens) >= 2 and all(isinstance(t, int) for t in tokens)):
        raise Refused("the prompt must be a list of at least 2 token ids")
    if min(tokens) < 0 or max(tokens) >= server.vocab_size:
        raise Refused(f"token ids must be in [0, {server.vocab_size})")
    return tokens


def _vllm_answer(server: LogprobServer, request: dict) -> dict:
    if request.get("model") != server.model_name:
        raise Refused(f"The model `{request.get('model')}` does not exist.", 404)
    tokens, k = _tokens(server, request.get("prompt")), request.get("prompt_logprobs")
    if not isinstance(k, int) or k < 1:
        raise Refused("prompt_logprobs must be an int >= 1")
    if k > server.max_logprobs:
        raise Refused(f"Requested prompt logprobs of {k}, which is greater than max allowed: {server.max_logprobs}")
    rows = [None]
    for token, top_ids, top_values, own, rank in zip(tokens[1:], *server.top_logprobs(tokens, k)):
        # vLLM's dict: the prompt token first, then the top k; a top-k entry overwrites the prompt token's own.
        row = {str(token): {"logprob": own, "rank": rank, "decoded_token": server.decoded(token)}}
        for top_rank, (top_id, value) in enumerate(zip(top_ids, top_values), start=1):
            row[str(top_id)] = {"logprob": value, "rank": top_rank, "decoded_token": server.decoded(top_id)}
        rows.append(row)
    choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
              "prompt_logprobs": rows}
    return {"id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": [choice],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}}


def _sglang_answer(server: LogprobServer, request: dict) -> dict:
    tokens, k = _tokens(server, request.get("input_ids")), request.get("top_logprobs_num")
    if not request.get("return_logprob") or request.get("logprob_start_len") != 0:
        raise Refused("this stand-in answers return_logprob=true with logprob_start_len=0 only")
    if not isinstance(k, int) or k < 1:
        raise Refused("top_logprobs_num must be an int >= 1")
    top_ids, top_values, own, _ = server.top_logprobs(tokens, k)
    top = [None] + [[[value, token, None] for token, value in zip(*row)] for row in zip(top_ids, top_values)]
    token_logprobs = [[None, tokens[0], None]] + [[value, token, None] for value, token in zip(own, tokens[1:])]
    meta = {"id": f"{time.monotonic_ns():x}", "prompt_tokens": len(tokens), "completion_tokens": 0,
            "finish_reason": {"type": "length", "length": 0}, "input_token_logprobs": token_logprobs,
            "input_top_logprobs": top, "output_token_logprobs": [], "output_top_logprobs": []}
    return {"text": "", "output_ids": [], "meta_info": meta}


@contextlib.contextmanager
def serving(model, *, api: str, vocab_size: int, **options):
    """Serves `model` on 127.0.0.1 (a free port) in a daemon thread; yields the base URL; shuts down on exit.
    `options`: model_name, tokenizer, max_logprobs, fail_every, hang, max_requests."""
    server = LogprobServer(model, api=api, vocab_size=vocab_size, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.base_url
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face checkpoint folder")
    parser.add_argument("--api", choices=APIS, default="vllm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--vocab-size", type=int, help="ids kept (default: the tokenizer's, at most the LM head's)")
    parser.add_argument("--max-logprobs", type=int, default=VLLM_MAX_LOGPROBS, help="vLLM's --max-logprobs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
    model = model.to(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    head_rows = model.get_output_embeddings().weight.shape[0]
    vocab_size = args.vocab_size or (min(len(tokenizer), head_rows) if tokenizer is not None else head_rows)
    server = LogprobServer(model, api=args.api, vocab_size=vocab_size, model_name=args.model, tokenizer=tokenizer,
                           max_logprobs=args.max_logprobs, host=args.host, port=args.port)
    print(f"serving {args.model} as {args.api} at {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
