"""What the trainers need from a Hugging Face causal LM to distil without its logits: the decoder's last hidden
states, the LM head's weight and bias, and the logit post-processing its config names. Generic over
architectures: only `get_decoder()` (the multimodal `base_model` for a batch with images), `get_output_embeddings()`
and config attributes are used. Every model gets the ids with what else the batch says of them (`decoder_inputs`):
packed examples' positions, images."""

from __future__ import annotations

import inspect

import torch

from kdfast.integrations.example_routing import example_routes, own_examples, token_routes
from kdfast.integrations.packed_sequences import packing_inputs
from kdfast.integrations.sharding import run_through_wrapper, whole_head, whole_heads
from kdfast.integrations.vision_inputs import IMAGE_KEYS, image_inputs, vision_backbone
from kdfast.linear_loss import fused_linear_loss
from kdfast.linear_multi_teacher import fused_linear_multi_teacher_loss
from kdfast.linear_sparse_loss import fused_linear_sparse_loss
from kdfast.options import LossOptions
from kdfast.sparse_options import SparseOptions
from kdfast.top_k_support import HeadMap


def output_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    # A ZeRO-3 partitioned weight is an empty tensor between gathers; its ds_shape is the whole one.
    if not isinstance(weight, torch.Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        raise ValueError(f"{type(model).__name__}.get_output_embeddings() must return a linear LM head with a "
                         f"[vocab, hidden] weight, got {type(head).__name__}")
    if hasattr(head, "base_layer"):
        # A PEFT adapter on the head: its base weight alone is not what the head computes.
        raise ValueError("the LM head carries a PEFT adapter, which the fused loss cannot apply: leave the head "
                         "out of LoraConfig(target_modules=...) or merge the adapter first")
    return head


def decoder_inputs(inputs) -> dict:
    """What a batch gives every model beside its ids and attention mask: the positions of packed examples (and
    flash-attention's lengths of them), and its images."""
    return {**packing_inputs(inputs), **image_inputs(inputs)}


def last_hidden_state(model, input_ids, attention_mask=None, extra=None) -> torch.Tensor:
    """The decoder's output before the LM head, [batch, seq, hidden]. `extra`: `decoder_inputs` of the batch; with
    images, the multimodal backbone's output: the images merged into the sequence where their placeholders stand."""
    extra = extra or {}
    images = any(key in extra for key in IMAGE_KEYS)
    decoder = vision_backbone(model, extra) if images else model.get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **extra, use_cache=False)
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# The names model families give the factor they multiply their logits by before any softcap, in the order TRL's
# DistillationTrainer reads them: Cohere's `logit_scale`, `output_multiplier`, Falcon-H1's `lm_head_multiplier`.
_SCALE_NAMES = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def logit_scale(model) -> float:
    """The factor a model applies to its logits (after the head's bias, before any softcap), read from its text
    config exactly as TRL reads it: the first of _SCALE_NAMES that is set (a real 0.0 kept), else `logits_scaling`,
    which Granite and MiniCPM3 divide by and HyperCLOVA X multiplies by; 1 for most models."""
    config = _text_config(model)
    for name in _SCALE_NAMES:
        scale = getattr(config, name, None)
        if scale is not None:
            return float(scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)


def final_softcap(model) -> float | None:
    """Gemma-2's `final_logit_softcapping`, applied after the logit scale (None: no cap)."""
    return getattr(_text_config(model), "final_logit_softcapping", None)


def head_settings(student, teacher=None) -> dict:
    """The fused linear loss's per-model logit keywords for two causal LMs (or the student alone, for a sparse
    teacher whose log-probs are final)."""
    if teacher is None:
        return {"softcap": final_softcap(student), "logit_scale": logit_scale(student)}
    return {"student_softcap": final_softcap(student), "teacher_softcap": final_softcap(teacher),
            "student_logit_scale": logit_scale(student), "teacher_logit_scale": logit_scale(teacher)}


def head_map(model, head, temperature: float, frozen: bool = False) -> HeadMap:
    """A causal LM's head and its logit map (bias, logit scale, softcap) at `temperature`; `frozen`: detached (a
    teacher's head, which may be the student's own: a live or a PEFT base teacher)."""
    settings = head_settings(model)
    weight, bias = head.weight, head.bias
    if frozen:
        weight, bias = weight.detach(), bias.detach() if bias is not None else None
    return HeadMap(weight, bias, settings["logit_scale"], settings["softcap"], float(temperature))


def distill_from_hidden(student, teacher, student_hidden, teacher_hidden, labels, options: LossOptions, *,
                        chunk_size="auto", fp32_logits=False, num_items_in_batch=None):
    """The fused loss between two causal LMs' heads over already-shifted hidden states and labels. Heads padded past
    the tokenizer are cut to `options.vocab_size` by the loss itself."""
    student_head, teacher_head = output_head(student), output_head(teacher)
    with whole_head(student, student_head), whole_head(teacher, teacher_head, frozen=True):
        # The teacher is frozen here even where its trainer left requires_grad on (TRL does).
        teacher_bias = teacher_head.bias.detach() if teacher_head.bias is not None else None
        return fused_linear_loss(student_hidden, student_head.weight, teacher_hidden.detach(),
                                 teacher_head.weight.detach(), labels, options, student_bias=student_head.bias,
                                 teacher_bias=teacher_bias, **head_settings(student, teacher), chunk_size=chunk_size,
                                 fp32_logits=fp32_logits,
                                 num_items_in_batch=num_items_in_batch)


def scored_positions(inputs):
    """(the positions whose next token the loss scores, as a slice of the sequence; their labels): positions [:-1]
    and `labels[:, 1:]`, or, where the batch holds `shift_labels` (already shifted: a collator's, or context
    parallelism's, whose split sequence's last position predicts the next split's first token), every position and
    those, as transformers' causal LM loss takes them."""
    shifted = inputs.get("shift_labels")
    if shifted is not None:
        return slice(None), shifted
    return slice(None, -1), inputs["labels"][:, 1:]


def no_cache(model) -> dict:
    """`use_cache=False` where the forward takes it (a remote-code model's may not)."""
    parameters = inspect.signature(model.forward).parameters
    takes = "use_cache" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {"use_cache": False} if takes else {}


def own_logits(model, input_ids, attention_mask=None, extra=None) -> torch.Tensor:
    """The model's own forward's logits, [batch, seq, V]: its output's `.logits`, or the output itself."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, **(extra or {}), **no_cache(model))
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the teacher's forward ({type(model).__name__}) must return its logits [batch, seq, vocab] "
                         f"for input_ids {tuple(input_ids.shape)} (a tensor, or an output with .logits), got {got}")
    return logits


def batch_distill_loss(student, teacher, inputs, options: LossOptions, *, chunk_size="auto", fp32_logits=False,
                       num_items_in_batch=None):
    """The fused loss of one batch: both decoders' last hidden states (the teacher's under no_grad), position i
    predicting `inputs["labels"][:, i + 1]` (`scored_positions`); the batch's `decoder_inputs` reach both models.
    Called under the caller's autocast."""
    input_ids, attention_mask, extra = inputs["input_ids"], inputs.get("attention_mask"), decoder_inputs(inputs)
    positions, labels = scored_positions(inputs)
    student_hidden = last_hidden_state(student, input_ids, attention_mask, extra)[:, positions]
    with torch.no_grad():
        # An FSDP2 teacher is entered through its own forward, which gathers its root's parameters (embeddings).
        teacher_hidden = run_through_wrapper(teacher, teacher, last_hidden_state, teacher, input_ids,
                                             attention_mask, extra)[:, positions]
    return distill_from_hidden(student, teacher, student_hidden, teacher_hidden, labels, options,
                               chunk_size=chunk_size, fp32_logits=fp32_logits,
                               num_items_in_batch=num_items_in_batch)


def batch_multi_teacher_loss(student, teachers: list, inputs, options: LossOptions, *, weights=None,
                             combine="mixture", chunk_size="auto", fp32_logits=False, num_items_in_batch=None,
                             own_logits_of=None):
    """The fused loss of one batch against several teacher models (each one's hidden states under no_grad, each
    head's own logit scale and softcap; or where `own_logits_of[m]`, teacher m's own forward's logits, read by the
    chunks as given: `kdfast.integrations.teacher_logits`). Without `weights`, a batch's `teacher_id` column
    ([batch] indices) routes each example to its teacher: each teacher model runs on its own examples alone (on all
    of them where its forward is a collective of sharded ranks, or the batch holds `decoder_inputs`) and the loss
    runs each row's own head alone."""
    input_ids, attention_mask, extra = inputs["input_ids"], inputs.get("attention_mask"), decoder_inputs(inputs)
    route = example_routes(inputs["teacher_id"], len(teachers)) if weights is None and "teacher_id" in inputs else None
    positions, labels = scored_positions(inputs)
    student_hidden = last_hidden_state(student, input_ids, attention_mask, extra)[:, positions]
    student_head = output_head(student)
    own = own_logits_of or [False] * len(teachers)
    with torch.no_grad():
        teacher_rows = [_teacher_rows(teacher, input_ids, attention_mask, extra, route, index, positions,
                                      student_head if given else None)
                        for index, (teacher, given) in enumerate(zip(teachers, own))]
    if route is not None:
        weights = token_routes(route, input_ids, extra.get("position_ids")).to(student_hidden.device)[:, positions]
    heads = [None if given else output_head(teacher) for teacher, given in zip(teachers, own)]
    fused = [(teacher, head) for teacher, head in zip(teachers, heads) if head is not None]
    with whole_heads(student, student_head, [teacher for teacher, _ in fused], [head for _, head in fused]):
        # A teacher given as its logits: no head, bias or map (its logits are final).
        return fused_linear_multi_teacher_loss(
            student_hidden, student_head.weight, teacher_rows,
            [head.weight.detach() if head is not None else None for head in heads], labels, options,
            student_bias=student_head.bias,
            teacher_bias=[head.bias.detach() if head is not None and head.bias is not None else None
                          for head in heads], weights=weights,
            combine=combine, student_softcap=final_softcap(student),
            teacher_softcap=[final_softcap(teacher) if head is not None else None
                             for teacher, head in zip(teachers, heads)],
            student_logit_scale=logit_scale(student),
            teacher_logit_scale=[logit_scale(teacher) if head is not None else 1.0
                                 for teacher, head in zip(teachers, heads)],
            chunk_size=chunk_size, fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch)


def sparse_distill_from_hidden(student, student_hidden, teacher_ids, teacher_logprobs, labels,
                               options: SparseOptions, *, chunk_size="auto", fp32_logits=False,
                               num_items_in_batch=None):
    """The fused loss of a causal LM's head against a sparse teacher, over already-aligned hidden states, teacher rows
    [..., K] and labels (a head padded past the tokenizer is cut to `options.vocab_size` by the loss itself)."""
    head = output_head(student)
    with whole_head(student, head):
        return fused_linear_sparse_loss(student_hidden, head.weight, teacher_ids, teacher_logprobs, labels, options,
                                        student_bias=head.bias, **head_settings(student), chunk_size=chunk_size,
                                        fp32_logits=fp32_logits,
                                        num_items_in_batch=num_items_in_batch)


def batch_sparse_distill_loss(student, inputs, options: SparseOptions, *, chunk_size="auto", fp32_logits=False,
                              num_items_in_batch=None):
    """The fused loss of one batch against a sparse teacher: `inputs["teacher_ids"]` / `["teacher_logprobs"]`
    [batch, seq, K], row j the teacher's distribution of token j (aligned with the labels, shifted with them)."""
    missing = [name for name in ("labels", "teacher_ids", "teacher_logprobs") if name not in inputs]
    if missing:
        raise ValueError(f"a batch against a sparse teacher needs labels, teacher_ids and teacher_logprobs; missing "
                         f"{missing} (kdfast.teacher_cache.SparseTeacherCollator makes such batches)")
    if inputs.get("shift_labels") is not None:
        # The teacher's rows are aligned with the unshifted labels and shift with them; context parallelism, which
        # brings shift_labels, splits the sequence but not these rows.
        raise ValueError("a batch against a sparse teacher takes labels, not shift_labels: teacher_ids and "
                         "teacher_logprobs are aligned with the unshifted labels")
    hidden = last_hidden_state(student, inputs["input_ids"], inputs.get("attention_mask"),
                               decoder_inputs(inputs))[:, :-1]
    return sparse_distill_from_hidden(student, hidden, inputs["teacher_ids"][:, 1:], inputs["teacher_logprobs"][:, 1:],
                                      inputs["labels"][:, 1:], options, chunk_size=chunk_size, fp32_logits=fp32_logits,
                                      num_items_in_batch=num_items_in_batch)


def _teacher_rows(teacher, input_ids, attention_mask, extra, route, index: int, positions,
                  student_head=None) -> torch.Tensor:
    """Teacher `index`'s last hidden states at the scored `positions`, or given the `student_head` (the teacher is
    distilled through its own logits) its own forward's logits there: of every example ([batch, positions, ·]), or
    routed, of its own examples only ([rows, ·], the loss's routed form; `own_examples`). A batch's
    `decoder_inputs` are not split by example (Qwen-VL's patches of all images are one tensor, flash-attention's
    lengths one list): with them each teacher runs on all."""
    mine = own_examples(route if not extra else None, index, teacher)
    if mine is None and student_head is not None:
        # The teacher's own forward, hooks and all: an FSDP2 or ZeRO-3 teacher gathers its parameters itself.
        return own_logits(teacher, input_ids, attention_mask, extra)[:, positions]
    if mine is None:
        return run_through_wrapper(teacher, teacher, last_hidden_state, teacher, input_ids, attention_mask,
                                   extra)[:, positions]
    mine = mine.to(input_ids.device)
    if mine.numel() == 0:  # no rows: [0, V] logits (the student's vocabulary) or [0, H_t] hidden states
        head = (student_head if student_head is not None else output_head(teacher)).weight
        shape = getattr(head, "ds_shape", head.shape)  # (a ZeRO-3 partitioned weight: its whole shape)
        return head.new_empty(0, shape[0] if student_head is not None else shape[-1])
    rows = (own_logits if student_head is not None else last_hidden_state)(
        teacher, input_ids.index_select(0, mine),
        attention_mask.index_select(0, mine) if attention_mask is not None else None)
    rows = rows[:, positions]
    return rows.reshape(-1, rows.shape[-1])

