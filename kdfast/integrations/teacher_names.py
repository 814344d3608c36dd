"""Several teachers by name, for both trainers: `teacher_model` as a dict {name: model}, and a `teacher_id` column that
holds each example's teacher as its name or its position."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

TEACHER_ID = "teacher_id"


def named_teachers(teacher_model):
    """(the teachers as given, or a dict's values as a list; the dict's names, or None)."""
    if isinstance(teacher_model, dict):
        return list(teacher_model.values()), [str(name) for name in teacher_model]
    return teacher_model, None


def weights_in_order(weights, names: list[str] | None):
    """`teacher_weights` as the loss takes them: a dict by name (teachers given as a dict) becomes its numbers in the
    teachers' order; anything else is as given."""
    if not isinstance(weights, dict):
        return weights
    if names is None:
        raise ValueError("teacher_weights as a dict weighs teachers by name: pass teacher_model as a dict of them")
    given = {str(name): value for name, value in weights.items()}
    if set(given) != set(names):
        missing, unknown = sorted(set(names) - set(given)), sorted(set(given) - set(names))
        raise ValueError(f"teacher_weights must name every teacher {names} once: missing {missing}, unknown {unknown}")
    return [given[name] for name in names]


def teacher_position(teacher_id, names: list[str]) -> int:
    """The position of an example's teacher: its name, or its position itself (an integer, numpy's or a 0-d tensor's
    included; not a bool)."""
    if isinstance(teacher_id, torch.Tensor) and teacher_id.numel() == 1 and not teacher_id.dtype.is_floating_point \
            and teacher_id.dtype != torch.bool:
        teacher_id = int(teacher_id)
    if isinstance(teacher_id, str) and teacher_id in names:
        return names.index(teacher_id)
    if isinstance(teacher_id, numbers.Integral) and not isinstance(teacher_id, bool) and \
            0 <= int(teacher_id) < len(names):
        return int(teacher_id)
    raise ValueError(f"the dataset's teacher_id column must name one of the teachers {names} (or be its position, "
                     f"0..{len(names) - 1}), got {teacher_id!r}")


def check_dataset_teacher_ids(dataset, names: list[str], what: str) -> None:
    """Every `teacher_id` of a map-style dataset (a `datasets.Dataset`, or a list of dicts) names a teacher, checked
    where the trainer is built rather than when that row's batch comes (minutes into a run, or at the first evaluation);
    `what` names the dataset in the error. An iterable dataset is checked as its batches come."""
    if isinstance(dataset, dict):  # several evaluation datasets by name
        for name, one in dataset.items():
            check_dataset_teacher_ids(one, names, f"{what}[{name!r}]")
        return
    if hasattr(dataset, "unique") and TEACHER_ID in (getattr(dataset, "column_names", None) or ()):
        values = dataset.unique(TEACHER_ID)  # a datasets.Dataset (an IterableDataset has no unique: not scanned)
    elif isinstance(dataset, list):
        values = [row[TEACHER_ID] for row in dataset if isinstance(row, Mapping) and TEACHER_ID in row]
    else:
        return
    for value in values:
        try:
            teacher_position(value, names)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None


class TeacherIdCollator:
    """A data collator whose examples' `teacher_id` (a name or a position) becomes the batch's [batch] int64 tensor of
    teacher positions. The wrapped collator never sees the column: the Trainer's default collator drops a string
    column without a word (the batch would then weigh every teacher alike), a tokenizer's padding refuses one."""

    def __init__(self, collator, names: list[str]):
        self.collator, self.names = collator, names

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or TEACHER_ID not in features[0]:
            return self.collator(features)
        missing = [index for index, feature in enumerate(features) if TEACHER_ID not in feature]
        if missing:
            raise ValueError(f"the batch's examples {missing} have no teacher_id where the others have one: route "
                             "every example or none")
        positions = [teacher_position(feature[TEACHER_ID], self.names) for feature in features]
        batch = self.collator([{key: value for key, value in feature.items() if key != TEACHER_ID}
                               for feature in features])
        batch[TEACHER_ID] = torch.tensor(positions, dtype=torch.int64)
        return batch
