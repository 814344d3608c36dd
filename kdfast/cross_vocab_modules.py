"""The `nn.Module` forms of the cross-vocabulary losses: `CrossVocabDistillLoss` (logits), `LinearCrossVocabDistillLoss`
(both heads fused) and `LinearStudentCrossVocabDistillLoss` (the teacher given as its logits). Each fixes the map,
the method and the settings at construction, checked there, and takes a batch's tensors (and its alignment) in
`forward`."""

from __future__ import annotations

import inspect

import torch

from kdfast.cross_vocab import check_settings, cross_vocab_distill_loss, cross_vocab_options
from kdfast.linear_cross_vocab import linear_cross_vocab_distill_loss, linear_student_cross_vocab_distill_loss
from kdfast.logit_maps import logit_maps
from kdfast.options import LossOptions
from kdfast.validation import check_chunk_settings

# What forward takes per batch rather than at construction.
_PER_BATCH = {"alignment", "num_items_in_batch", "labels"}


def _settings_of(owner: str, function, settings: dict) -> dict:
    """`settings` checked against the keywords `function` takes (those given per batch left out), then the loss
    settings built once (`cross_vocab_options`), so that a bad one fails where the module is built."""
    taken = {name for name, parameter in inspect.signature(function).parameters.items()
             if parameter.kind is inspect.Parameter.KEYWORD_ONLY} - _PER_BATCH
    unknown = sorted(set(settings) - taken)
    if unknown:
        raise TypeError(f"{owner} got unknown setting(s) {unknown}; the settings are {sorted(taken)}")
    loss_keywords = {name: value for name, value in settings.items() if name in LossOptions.FIELD_NAMES
                     and name != "temperature"}
    method, vocab_map = settings.get("method", "hybrid"), settings.get("vocab_map")
    opts, teacher_temperature = cross_vocab_options(method, vocab_map, settings.get("temperature", 1.0),
                                                    settings.get("student_temperature"),
                                                    settings.get("teacher_temperature"), **loss_keywords)
    # The method against the divergence and the map, on the map's own vocabularies (each call checks its tensors').
    check_settings(vocab_map, method, opts, teacher_temperature, (vocab_map.student_size, vocab_map.teacher_size),
                   ("the student's vocabulary", "the teacher's vocabulary"))
    return settings


def _repr(settings: dict) -> str:
    shown = ("method", "divergence", "beta", "temperature", "kd_weight", "ce_weight", "reduction", "chunk_size")
    return ", ".join(f"{name}={settings[name]!r}" for name in shown if name in settings)


class CrossVocabDistillLoss(torch.nn.Module):
    """`cross_vocab_distill_loss` with its settings fixed at construction (`vocab_map`, `method`, the hybrid's
    weights, every loss setting): `forward(student_logits, teacher_logits, labels=None, alignment=None,
    num_items_in_batch=None)`."""

    def __init__(self, *, vocab_map, **settings):
        super().__init__()
        self.settings = _settings_of("CrossVocabDistillLoss", cross_vocab_distill_loss,
                                     {"vocab_map": vocab_map, **settings})

    def forward(self, student_logits, teacher_logits, labels=None, alignment=None, num_items_in_batch=None):
        return cross_vocab_distill_loss(student_logits, teacher_logits, labels, alignment=alignment,
                                        num_items_in_batch=num_items_in_batch, **self.settings)

    def extra_repr(self) -> str:
        return _repr(self.settings)


class LinearCrossVocabDistillLoss(torch.nn.Module):
    """`linear_cross_vocab_distill_loss` with its settings fixed at construction (`vocab_map`, `method`, each head's
    scale and softcap, `chunk_size`, every loss setting): `forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, alignment=None, student_bias=None, teacher_bias=None, num_items_in_batch=None)`
    (`teacher_weight` None: `teacher_hidden` is the teacher's logits)."""

    def __init__(self, *, vocab_map, **settings):
        super().__init__()
        self.settings = _settings_of("LinearCrossVocabDistillLoss", linear_cross_vocab_distill_loss,
                                     {"vocab_map": vocab_map, **settings})
        check_chunk_settings(None, self.settings.get("chunk_size", "auto"))
        logit_maps(*(self.settings.get(name) for name in ("softcap", "student_softcap", "teacher_softcap")),
                   self.settings.get("student_logit_scale", 1.0), self.settings.get("teacher_logit_scale", 1.0))

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, alignment=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return linear_cross_vocab_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                               alignment=alignment, student_bias=student_bias,
                                               teacher_bias=teacher_bias, num_items_in_batch=num_items_in_batch,
                                               **self.settings)

    def extra_repr(self) -> str:
        return _repr(self.settings)


class LinearStudentCrossVocabDistillLoss(torch.nn.Module):
    """`linear_student_cross_vocab_distill_loss` with its settings fixed at construction (`vocab_map`, `method`, the
    student's `softcap` and `logit_scale`, `chunk_size`, every loss setting): `forward(student_hidden,
    student_weight, teacher_logits, labels=None, alignment=None, student_bias=None, num_items_in_batch=None)`."""

    def __init__(self, *, vocab_map, **settings):
        super().__init__()
        self.settings = _settings_of("LinearStudentCrossVocabDistillLoss", linear_student_cross_vocab_distill_loss,
                                     {"vocab_map": vocab_map, **settings})
        check_chunk_settings(self.settings.get("softcap"), self.settings.get("chunk_size", "auto"))
        logit_maps(self.settings.get("softcap"), student_logit_scale=self.settings.get("logit_scale", 1.0))

    def forward(self, student_hidden, student_weight, teacher_logits, labels=None, alignment=None, student_bias=None,
                num_items_in_batch=None):
        return linear_student_cross_vocab_distill_loss(student_hidden, student_weight, teacher_logits, labels,
                                                       alignment=alignment, student_bias=student_bias,
                                                       num_items_in_batch=num_items_in_batch, **self.settings)

    def extra_repr(self) -> str:
        return _repr(self.settings)
