"""A sparse teacher for the trainers: a teacher cache (or dataset columns `teacher_ids` / `teacher_logprobs`, one row
per token) in place of a teacher model. Everything that can be checked is checked before training: the cache's
tokenizer against the student's, its windows against the training rows, its temperature against the loss's."""

from __future__ import annotations

import torch

from kdfast.sparse_options import SparseOptions

TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


class WithCachedTargets(torch.utils.data.Dataset):
    """The rows of `dataset` (already checked to be the cache's windows, in order) with the cache's targets added."""

    def __init__(self, dataset, cache):
        self.dataset, self.cache = dataset, cache

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        targets = self.cache[index]
        return {**self.dataset[index], **{name: targets[name] for name in TEACHER_COLUMNS}}


def _column_names(dataset) -> set:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    try:
        return set(dataset[0]) if len(dataset) else set()
    except (TypeError, KeyError, IndexError):
        return set()


def open_cache(teacher_cache):
    from kdfast.teacher_cache import TeacherCache

    return teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(teacher_cache)


def sparse_training_data(teacher_cache, train_dataset, tokenizer):
    """(the training dataset with teacher targets, the cache or None). Raises before training when the cache does
    not fit the student's tokenizer or data, or when there is no teacher at all."""
    if teacher_cache is None:
        if train_dataset is None or not set(TEACHER_COLUMNS) <= _column_names(train_dataset):
            raise ValueError("a teacher is required: teacher_model, teacher_cache (a `kdfast teacher-cache` folder), "
                             "or a train_dataset with teacher_ids and teacher_logprobs columns (one row of K per "
                             "token)")
        return train_dataset, None
    cache = open_cache(teacher_cache)
    if tokenizer is not None:
        cache.check_tokenizer(tokenizer)
    if train_dataset is None:
        return cache, cache
    cache.check_input_ids([row["input_ids"] for row in train_dataset])
    return WithCachedTargets(train_dataset, cache), cache


def sparse_options(cache, *, divergence, beta, temperature, teacher_temperature, tail, kd_weight, ce_weight, t2_scale,
                   backend, **ce_settings) -> SparseOptions:
    """The loss settings against a sparse teacher (`ce_settings`: label_smoothing, z_loss_weight); a cache's temperature
    must be the loss's for tail="bucket", and is the default `teacher_temperature` of tail="renormalize" (which
    re-tempers)."""
    if cache is not None:
        stored = cache.settings.temperature
        if tail == "renormalize" and teacher_temperature is None and stored != temperature:
            teacher_temperature = stored
        elif tail == "bucket" and stored != temperature:
            raise ValueError(f"the teacher cache holds log-probs at temperature {stored} but the loss's temperature is "
                             f"{temperature}: tail='bucket' needs them equal (pass temperature={stored}, or "
                             "tail='renormalize', which re-tempers them)")
    return SparseOptions(divergence=divergence, beta=beta, temperature=temperature,
                         teacher_temperature=teacher_temperature, tail=tail, kd_weight=kd_weight, ce_weight=ce_weight,
                         t2_scale=t2_scale, reduction="mean", backend=backend, **ce_settings)
