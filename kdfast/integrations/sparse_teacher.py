"""A sparse teacher for the trainers: a teacher cache (or dataset columns `teacher_ids` / `teacher_logprobs`, one row
per token, or a peer's: axolotl's target_token_ids / target_logprobs / target_mask, DistillKit's token_ids /
top_values) in place of a teacher model. Everything that can be checked is checked before training: the cache's
tokenizer against the student's, its windows against the training rows, its temperature against the loss's."""

from __future__ import annotations

import torch

from kdfast.sparse_options import SparseOptions

TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")
SERVED_TEMPERATURE = 1.0  # inference servers return the raw model's log-probs


class WithCachedTargets(torch.utils.data.Dataset):
    """The rows of `dataset` (already checked to be the cache's windows, in order) with the cache's targets added."""

    def __init__(self, dataset, cache):
        self.dataset, self.cache = dataset, cache

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        targets = self.cache[index]
        return {**self.dataset[index], **{name: targets[name] for name in TEACHER_COLUMNS}}


class WithPeerTargets(torch.utils.data.Dataset):
    """The rows of `dataset`, whose teacher is in a peer's columns, with kdfast's columns in their place: read per
    item, before the Trainer's column filter (which keeps kdfast's columns, not the peers') sees them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from kdfast.teacher_cache.peer_formats import as_kdfast_example

        return as_kdfast_example(self.dataset[index], f"row {index}")


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
        return _dataset_teacher(train_dataset), None
    cache = open_cache(teacher_cache)
    if tokenizer is not None:
        cache.check_tokenizer(tokenizer)
    if train_dataset is None:
        return cache, cache
    cache.check_input_ids([row["input_ids"] for row in train_dataset])
    return WithCachedTargets(train_dataset, cache), cache


def _dataset_teacher(train_dataset):
    """`train_dataset` if its rows carry kdfast's teacher columns, wrapped if a peer's; else a ValueError."""
    from kdfast.teacher_cache.peer_formats import DIRECT_FORMATS, EXAMPLE_FORMATS, teacher_format

    columns = _column_names(train_dataset) if train_dataset is not None else set()
    found = teacher_format(columns)
    if found is not None and not set(EXAMPLE_FORMATS[found]) <= columns:
        raise ValueError(f"the train_dataset has {found}'s teacher columns but lacks "
                         f"{sorted(set(EXAMPLE_FORMATS[found]) - columns)}")
    if found == "kdfast":
        return train_dataset
    if found in DIRECT_FORMATS:
        return WithPeerTargets(train_dataset)
    if found == "distillkit":
        raise ValueError("the train_dataset holds DistillKit's compressed rows, which decode only with the config "
                         "they were written with: convert them first (kdfast teacher-cache convert --from distillkit)")
    raise ValueError("a teacher is required: teacher_model, teacher_cache (a `kdfast teacher-cache` folder), or a "
                     "train_dataset with teacher_ids and teacher_logprobs columns (one row of K per token), or a "
                     "peer's: axolotl's target_token_ids, target_logprobs and target_mask, or DistillKit's token_ids "
                     "and top_values")


def sparse_options(stored_temperature, *, divergence, beta, temperature, teacher_temperature, tail, kd_weight,
                   ce_weight, t2_scale, backend, source="the teacher cache", **ce_settings) -> SparseOptions:
    """The loss settings against a sparse teacher (`ce_settings`: label_smoothing, z_loss_weight). The temperature of
    the stored (or served) log-probs, when known, must be the loss's for tail="bucket", and is the default
    `teacher_temperature` of tail="renormalize" (which re-tempers)."""
    if tail == "given":  # no cache, column or server holds a rest beside the K log-probs
        holder = source or "a dataset's teacher columns"
        raise ValueError(f"tail='given' needs each row's rest after its K log-probs, which {holder} does not hold: "
                         f"use tail='bucket' (the rest 1 - sum p) or tail='renormalize'")
    if stored_temperature is not None:
        if tail == "renormalize" and teacher_temperature is None and stored_temperature != temperature:
            teacher_temperature = stored_temperature
        elif tail == "bucket" and stored_temperature != temperature:
            raise ValueError(f"{source} holds log-probs at temperature {stored_temperature} but the loss's temperature "
                             f"is {temperature}: tail='bucket' needs them equal (pass temperature={stored_temperature}"
                             ", or tail='renormalize', which re-tempers them)")
    return SparseOptions(divergence=divergence, beta=beta, temperature=temperature,
                         teacher_temperature=teacher_temperature, tail=tail, kd_weight=kd_weight, ce_weight=ce_weight,
                         t2_scale=t2_scale, reduction="mean", backend=backend, **ce_settings)
