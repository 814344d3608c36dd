"""A teacher that is not in memory: its top-k (or sampled) next-token log-probs, computed once (here, by many
processes, or by a server: `ServedTeacher`) and stored in resumable shards (`build_teacher_cache`, `kdfast
teacher-cache`), read back as a Dataset (`TeacherCache`) and batched with the labels (`SparseTeacherCollator`) for
`linear_sparse_distill_loss`; other tools' top-k datasets converted (`convert`). Reading and writing need
safetensors, the command transformers too: imported on first use, so that `kdfast`'s other commands do not."""

import importlib

_EXPORTS = {"SparseTeacherCollator": "collate", "ServedTeacher": "served", "TeacherCache": "reader",
            "build_teacher_cache": "writer", "convert": "convert"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
