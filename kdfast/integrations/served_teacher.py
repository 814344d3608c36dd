"""A teacher behind an inference server, asked during training: each batch's rows go to the server for their top-k
prompt log-probs while the student trains on the batch before (a background thread keeps one batch ahead), and come
back as the `teacher_ids` / `teacher_logprobs` columns a cached teacher gives, so the loss is the sparse one."""

from __future__ import annotations

import logging
import queue
import threading

import torch

logger = logging.getLogger(__name__)
PREFETCHED_BATCHES = 1  # one batch asked ahead hides the server's latency; more only holds more batches in memory
DEFAULT_REQUESTS_IN_FLIGHT = 8
# Text that tokenizers split differently when they differ: words, digits, accents, CJK, an emoji, code whitespace.
TOKENIZER_PROBE = "Distilling 1234.5 tokens: naïve café, 東京, 🙂\n\tdef f(x):\n\t\treturn x ** 2  # ok"


def served_teacher(teacher_server, tokenizer):
    """A `ServedTeacher` for `teacher_server` (a URL of a vLLM server, or a ServedTeacher for other settings or
    SGLang), its tokenizer checked against the student's where the server tokenizes (vLLM's /tokenize): its ids
    must mean the student's tokens."""
    from kdfast.teacher_cache.served import ServedTeacher

    served = teacher_server if isinstance(teacher_server, ServedTeacher) else \
        ServedTeacher(teacher_server, requests_in_flight=DEFAULT_REQUESTS_IN_FLIGHT)
    if tokenizer is None:
        return served
    theirs = served.tokenize(TOKENIZER_PROBE)
    if theirs is None:
        logger.warning("the %s server at %s does not tokenize text: its tokenizer cannot be checked against the "
                       "student's; make sure both are the same", served.api, served.url)
    elif theirs != tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"the teacher served at {served.url} ({served.model_name}) tokenizes text otherwise than "
                         "the student's tokenizer (processing_class): its token ids would not mean the student's "
                         "tokens. Serve a teacher with the student's tokenizer")
    return served


def batch_with_served_targets(batch: dict, served, k: int, vocab_size: int | None = None) -> dict:
    """`batch` plus `teacher_ids` [B, S, k] (-1 where no target: padding and each row's first token) and
    `teacher_logprobs` [B, S, k] (float32, 0 there), asked for every row's tokens (those of its attention mask)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    kept = (mask if mask is not None else torch.ones_like(input_ids)).bool().cpu()
    rows = [ids[keep] for ids, keep in zip(input_ids.cpu(), kept)]
    targets = served.row_targets(rows, k)
    teacher_ids = torch.full((*input_ids.shape, k), -1, dtype=torch.int64)
    teacher_logprobs = torch.zeros(*input_ids.shape, k)
    for row, (keep, (ids, logprobs)) in enumerate(zip(kept, targets)):
        if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(f"the server {served.url} returned token id {int(ids.max())}, outside the student's "
                             f"vocabulary [0, {vocab_size}): is it serving a model with the student's tokenizer?")
        positions = keep.nonzero().squeeze(-1)[1:]  # row j of the answer: the distribution of kept token j + 1
        teacher_ids[row, positions] = ids
        teacher_logprobs[row, positions] = logprobs
    return {**batch, "teacher_ids": teacher_ids.to(input_ids.device),
            "teacher_logprobs": teacher_logprobs.to(input_ids.device)}


class ServedTeacherLoader:
    """A DataLoader whose batches carry the served teacher's targets, each asked while the previous one trains.
    Everything else (len, sampler, set_epoch, ...) is the wrapped loader's."""

    def __init__(self, loader, served, k: int, vocab_size: int | None = None):
        self.loader, self.served, self.k, self.vocab_size = loader, served, k, vocab_size

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        ready = queue.Queue(maxsize=PREFETCHED_BATCHES)
        stop = threading.Event()
        finished = object()

        def put(item) -> bool:  # False once the training loop has stopped listening
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def ask():
            try:
                for batch in self.loader:
                    if not put(batch_with_served_targets(batch, self.served, self.k, self.vocab_size)):
                        return
                put(finished)
            except BaseException as error:  # re-raised in the training thread, where it can stop the run
                put(error)

        worker = threading.Thread(target=ask, name="kdfast-served-teacher", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is finished:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # an epoch left early (max_steps) stops the worker instead of leaving it blocked
            stop.set()
            worker.join(timeout=5)
