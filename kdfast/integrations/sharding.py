"""What the fused loss needs from a model that is wrapped or sharded for training: its forward entered through the
wrapper (DDP, a DeepSpeed engine, an FSDP2 root), its LM head's weight whole while the loss reads it (gathered under
DeepSpeed ZeRO-3, unsharded under FSDP2), and a teacher sharded as the student is."""

from __future__ import annotations

import contextlib

import torch

from kdfast.zero3 import gathered


def run_through_wrapper(wrapper, inner, fn, *args):
    """Calls fn(*args) as `inner`'s forward, entered through `wrapper` (DDP, a DeepSpeed engine), so the wrapper
    still does its per-forward work (DDP's gradient-sync set-up, ZeRO-3's hooks) though the loss skips the model's
    own forward. An FSDP2 model is its own wrapper: its forward hooks gather the root's parameters (embeddings, LM
    head), which calling its decoder directly would leave sharded. Without a wrapper it is fn(*args)."""
    if wrapper is inner and not _is_fsdp2(inner):
        return fn(*args)
    had_own_forward = "forward" in inner.__dict__
    original = inner.forward

    def restore():
        if had_own_forward:
            inner.forward = original
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*redirected_args):
        restore()  # fn may call the real forward itself
        return fn(*redirected_args)

    inner.forward = redirected
    try:
        return wrapper(*args)
    finally:
        restore()


def collective_forward(model) -> bool:
    """Whether every rank must run the model's forward together: FSDP2 modules in it, or parameters partitioned by
    DeepSpeed ZeRO-3 (each forward gathers them from the ranks)."""
    return any(_is_fsdp2(module) for module in model.modules()) or \
        any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def whole_head(model, head, *, frozen: bool = False):
    """The LM head's weight (and bias) whole for the duration of the loss, which reads them outside the head's own
    forward: gathered under DeepSpeed ZeRO-3, unsharded under FSDP2 when no forward has unsharded them. A no-op
    otherwise. `frozen`: the loss takes no gradient into this head (the teacher's). Read `head.weight` inside the
    context: FSDP2 swaps the module's parameters as it unshards."""
    if _is_dtensor(head.weight):
        trained = not frozen and torch.is_grad_enabled() and head.weight.requires_grad
        return _fsdp2_unsharded(model, head, trained)
    return gathered(head.weight, head.bias)


def whole_heads(student, student_head, teachers, teacher_heads):
    """`whole_head` of the student's head and of every teacher's (frozen) at once: a no-op where every one is whole
    already (which a compiled step traces; an ExitStack breaks its graph), else each one entered in turn."""
    contexts = [whole_head(student, student_head),
                *(whole_head(teacher, head, frozen=True) for teacher, head in zip(teachers, teacher_heads))]
    if all(isinstance(context, contextlib.nullcontext) for context in contexts):
        return contextlib.nullcontext()
    return _entered(contexts)


@contextlib.contextmanager
def _entered(contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@contextlib.contextmanager
def _fsdp2_unsharded(model, head, trained: bool):
    """Unshards the FSDP2 unit that owns the head (the head's own, as accelerate makes it, or an ancestor's). A
    `trained` head stays unsharded: FSDP2's end-of-backward callback runs the post-backward of every unit still
    unsharded, which reduce-scatters the head's gradient and reshards it (its forward never ran, so no hook of its own
    would). Otherwise (the teacher, evaluation) the unit is resharded on exit."""
    owner = _fsdp2_owner(model, head)
    owner.unshard()
    try:
        yield
    finally:
        if not trained:
            owner.reshard()


def _fsdp2_owner(model, head):
    from torch.distributed.fsdp import FSDPModule

    name = next(name for name, module in model.named_modules() if module is head)
    while True:
        module = model.get_submodule(name)
        if isinstance(module, FSDPModule):
            return module
        if not name:
            raise ValueError(f"the LM head of {type(model).__name__} is sharded (a DTensor) but no FSDP2 unit owns it")
        name = name.rpartition(".")[0]


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def fsdp2_sharded_teacher(accelerator, teacher):
    """The teacher sharded by accelerate's FSDP2 plugin exactly as the student is (each decoder layer, the embeddings
    and the head a unit), with no optimizer; in eval mode."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    # Frozen first: the plugin upcasts every trainable low-precision parameter to fp32 master weights.
    teacher.requires_grad_(False)
    return fsdp2_prepare_model(accelerator, teacher).eval()
