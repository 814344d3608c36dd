"""TRL's stable `DistillationTrainer` (on-policy distillation; TRL >= 1.16) on kdfast: its loss, TRL's generalized JSD
between the teacher's and the student's softmaxes at `temperature` over the completion tokens, comes from kdfast's
fused linear loss instead of TRL's chunked kernels. `chunked_divergence_loss` is a drop-in for TRL's
`_chunked_divergence_loss` (same arguments, same `(loss, entropy_sum, n_valid)`); the trainer overrides only
`_compute_loss`, so generation, `num_items_in_batch`, the wrapper redirection and the logged entropy stay TRL's."""

from __future__ import annotations

import inspect
import sys

import torch

from kdfast.integrations.causal_lm import (
    final_softcap,
    head_settings,
    logit_scale,
    no_cache,
    output_head,
)
from kdfast.integrations.example_routing import own_examples
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.sharding import whole_head, whole_heads
from kdfast.integrations.teacher_logits import check_mode, uses_own_logits
from kdfast.integrations.teacher_names import (
    check_dataset_teacher_ids,
    named_teachers,
    teacher_position,
    weights_in_order,
)
from kdfast.integrations.vision_inputs import MULTIMODAL_KEYS
from kdfast.linear_logits_teacher import fused_linear_student_loss
from kdfast.linear_loss import fused_linear_loss
from kdfast.linear_multi_teacher import fused_linear_multi_teacher_loss
from kdfast.multi_teacher import COMBINES
from kdfast.options import LossOptions
from kdfast.teacher_routing import check_route_values
from kdfast.teacher_weights import check_trainer_weights

try:
    from trl import DistillationTrainer as _TRLDistillationTrainer
    from trl.trainer.utils import create_model_from_path
except ImportError as error:
    raise ImportError("kdfast.integrations.trl.DistillationTrainer needs TRL >= 1.16 (trl.DistillationTrainer)") \
        from error


def trl_jsd_options(beta: float, temperature: float) -> LossOptions:
    """TRL's loss as kdfast settings: generalized JSD with `beta` (0 forward KL, 1 reverse KL) at `temperature`, no
    T² factor, summed over the rows (TRL divides by its own count)."""
    return LossOptions(divergence="jsd", beta=beta, temperature=temperature, t2_scale=False, reduction="sum",
                       return_components=True)


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, *, chunk_size="auto",
                            backend="auto"):
    """TRL's `_chunked_divergence_loss` on kdfast: hidden states [B, K, H_s] / [B, K, H_t] aligned with the completion
    tokens, heads [V, H_s] / [V, H_t] (+ biases), `completion_mask` [B, K] (nonzero: a token in the loss). Returns the
    loss (the divergence summed over the masked-in tokens, divided by `num_items_in_batch` when given, else by their
    count, at least 1), the sum of the student's entropy at `temperature` over them (detached), and their count.
    Only the masked-in tokens are projected, into float32 logits from operands in the GEMM's dtype, as TRL's
    kernel projects them (16-bit logits would move a 16-bit model's loss, entropy and gradients off TRL's: by 0.2%,
    28% and 44% in its bf16 test). The teacher is a constant."""
    total, entropy_sum, n_valid = divergence_sums(
        student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight, completion_mask,
        beta, student_lm_head_bias, teacher_lm_head_bias, student_logit_scale, teacher_logit_scale,
        student_final_logit_softcapping, teacher_final_logit_softcapping, temperature, chunk_size=chunk_size,
        backend=backend)
    return _divided(total, n_valid, num_items_in_batch), entropy_sum, n_valid


def divergence_sums(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                    completion_mask, beta, student_lm_head_bias=None, teacher_lm_head_bias=None,
                    student_logit_scale=1.0, teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                    teacher_final_logit_softcapping=None, temperature=1.0, *, chunk_size="auto", backend="auto"):
    """`chunked_divergence_loss` before its division: the divergence summed over the masked-in tokens, the sum of the
    student's entropy over them and their count."""
    valid = completion_mask.reshape(-1) != 0
    kept = valid.nonzero().squeeze(1)
    student, teacher = _kept_rows(student_hidden_states, kept), _kept_rows(teacher_hidden_states, kept)
    options = trl_jsd_options(beta, temperature).replace(backend=backend)
    total, parts = fused_linear_loss(
        student, student_lm_head_weight, teacher.detach(), teacher_lm_head_weight.detach(), None, options,
        student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias.detach() if teacher_lm_head_bias is not None else None,
        student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale, chunk_size=chunk_size,
        fp32_logits=True)
    return total, parts.entropy, valid.sum()


def divergence_sums_of_logits(student_hidden_states, teacher_logits, student_lm_head_weight, completion_mask, beta,
                              student_lm_head_bias=None, student_logit_scale=1.0, student_final_logit_softcapping=None,
                              temperature=1.0, *, chunk_size="auto", backend="auto"):
    """`divergence_sums` against the teacher's own logits [B, K, V] at the completion tokens (its forward's, final:
    a teacher whose head is not all of its logits), the student's head fused: only the masked-in tokens' rows are
    read (`kdfast.linear_student_distill_loss`)."""
    valid = completion_mask.reshape(-1) != 0
    kept = valid.nonzero().squeeze(1)
    student, teacher = _kept_rows(student_hidden_states, kept), _kept_rows(teacher_logits, kept)
    options = trl_jsd_options(beta, temperature).replace(backend=backend)
    total, parts = fused_linear_student_loss(
        student, student_lm_head_weight, teacher.detach(), None, options, student_bias=student_lm_head_bias,
        softcap=student_final_logit_softcapping, logit_scale=student_logit_scale, chunk_size=chunk_size,
        fp32_logits=True)
    return total, parts.entropy, valid.sum()


def _kept_rows(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The rows [n, ·] of `tensor` [B, K, ·] at the masked-in tokens `kept` (flat indices), on its device."""
    return tensor.reshape(-1, tensor.shape[-1]).index_select(0, kept.to(tensor.device))


def _routed_rows(teacher_hidden_states: list, completion_mask, teacher_index):
    """Each teacher's hidden states of its own kept tokens ([n_m, H_m], in token order) and each kept token's teacher
    ([n] int64), from `teacher_index` [B] and hidden states of every sequence [B, K, H_m] or of the teacher's own
    [B_m, K, H_m]."""
    batch = completion_mask.shape[0]
    route = torch.as_tensor(teacher_index).reshape(-1).to("cpu", torch.int64)
    if route.numel() != batch:
        raise ValueError(f"teacher_index must hold one teacher per sequence ([{batch}]), got {route.numel()} values")
    check_route_values(route, len(teacher_hidden_states))
    valid = (completion_mask != 0).cpu()
    rows = []
    for index, hidden in enumerate(teacher_hidden_states):
        mine = route == index
        own = hidden.shape[0] != batch or bool(mine.all())  # only its sequences (the same thing when it has all)
        if own and hidden.shape[0] != int(mine.sum()):
            raise ValueError(f"teacher_hidden_states[{index}] holds {hidden.shape[0]} sequences: it must hold every "
                             f"sequence ({batch}) or only the {int(mine.sum())} routed to teacher {index}")
        tokens = (valid[mine] if own else valid & mine[:, None]).reshape(-1).nonzero().squeeze(1)
        rows.append(hidden.reshape(-1, hidden.shape[-1]).index_select(0, tokens.to(hidden.device)).detach())
    per_token = route[:, None].expand(valid.shape).reshape(-1)[valid.reshape(-1)]
    return rows, per_token.to(completion_mask.device)


def _divided(total, n_valid, num_items_in_batch):
    """The summed divergence over `num_items_in_batch`, else over the tokens, clamped as TRL clamps it: a fully masked
    batch is a differentiable 0, not 0 / 0."""
    if num_items_in_batch is None:
        return total / n_valid.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_multi_teacher_divergence_loss(student_hidden_states, teacher_hidden_states: list, student_lm_head_weight,
                                          teacher_lm_head_weights: list, completion_mask, beta,
                                          num_items_in_batch=None, student_lm_head_bias=None,
                                          teacher_lm_head_biases=None, student_logit_scale=1.0,
                                          teacher_logit_scales=1.0, student_final_logit_softcapping=None,
                                          teacher_final_logit_softcappings=None, temperature=1.0, *, weights=None,
                                          combine="mixture", completion_ids=None, teacher_index=None,
                                          chunk_size="auto", backend="auto"):
    """`chunked_divergence_loss` against several teachers (lists, one entry per teacher; hidden sizes may differ),
    mixed or averaged with `weights` as `kdfast.linear_multi_teacher_distill_loss` takes them (per-row weights:
    [B, K, M]; "confidence" and "min_ce" weigh each teacher by its probability of the completion's token,
    `completion_ids` [B, K]), or routed: `teacher_index` [B] each sequence's one teacher, whose head alone runs on its
    tokens and whose hidden states may be its own sequences' alone ([B_m, K, H_m], in order). A teacher whose
    `teacher_lm_head_weights` entry is None is given as its own logits in `teacher_hidden_states` ([B, K, V], final).
    Returns TRL's triple and each teacher's own divergence summed over the tokens ([M], detached; routed, over its own
    tokens)."""
    valid = completion_mask.reshape(-1) != 0
    kept = valid.nonzero().squeeze(1)
    student = _kept_rows(student_hidden_states, kept)
    if teacher_index is not None:
        if weights is not None:
            raise ValueError("teacher_index routes each sequence to one teacher: pass weights=None with it")
        teachers, weights = _routed_rows(teacher_hidden_states, completion_mask, teacher_index)
    else:
        teachers = [_kept_rows(hidden, kept).detach() for hidden in teacher_hidden_states]
    if isinstance(weights, torch.Tensor) and weights.dim() > 1:
        weights = _kept_rows(weights, kept)
    labels = None
    if isinstance(weights, str):  # the teachers' confidence in the tokens the policy sampled
        if completion_ids is None:
            raise ValueError(f"weights={weights!r} weighs each teacher by its probability of the completion's token: "
                             "pass completion_ids")
        labels = completion_ids.reshape(-1).to(kept.device).index_select(0, kept)
    options = trl_jsd_options(beta, temperature).replace(backend=backend)
    total, parts = fused_linear_multi_teacher_loss(
        student, student_lm_head_weight, teachers,
        [weight.detach() if weight is not None else None for weight in teacher_lm_head_weights], labels,
        options, student_bias=student_lm_head_bias,
        teacher_bias=[b.detach() if b is not None else None for b in teacher_lm_head_biases or [None] * len(teachers)],
        weights=weights, combine=combine, student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcappings, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scales, chunk_size=chunk_size, fp32_logits=True)
    n_valid = valid.sum()
    return _divided(total, n_valid, num_items_in_batch), parts.entropy, n_valid, parts.teachers


class DistillationTrainer(_TRLDistillationTrainer):
    """TRL's `DistillationTrainer` (same arguments, `trl.DistillationConfig`) whose loss is kdfast's fused linear one:
    the same loss, logged entropy and gradients as TRL's, with each model's logit scale and softcap read as TRL reads
    them. Generation (and everything else) is TRL's.

    `teacher_model` may also be a list of models (or paths, loaded as TRL loads its teacher), or a dict of them by
    name: TRL prepares the first, kdfast the others the same way (a ZeRO-3 or FSDP engine, or accelerate's evaluation
    wrapper), and the divergence is to their mixture (`teacher_combine="mixture"`) or the weighted sum of each one's
    (`"average"`), with `teacher_weights` as `kdfast.linear_multi_teacher_distill_loss` takes them (or by name). Without
    `teacher_weights`, a dataset column `teacher_id` (a teacher's position, or its name in the dict) routes each
    prompt to one teacher: each teacher model runs on its own sequences alone (on all of them where its forward is a
    collective of sharded ranks, or with images) and only its head scores their tokens. Each teacher's own divergence
    per token it scores is logged as `divergence/teacher_<m>` (its name in the dict), and routed, its share of the
    tokens as `tokens/teacher_<m>`.

    `teacher_logits` as kdfast's own `DistillationTrainer` takes it, for each teacher model: by default ("auto") a
    teacher whose own logits are not its head's (a head that normalises its rows, logits scaled by a name no config
    shares; TRL's kernel would read the head's weight and distil other logits than the teacher's) is distilled
    through its own forward's logits at the completion tokens, with a warning, the student's head still fused; "own"
    takes every teacher's own logits, "head" refuses such a teacher."""

    def __init__(self, model=None, teacher_model=None, args=None, *rest, teacher_weights=None,
                 teacher_combine="mixture", teacher_logits="auto", **kwargs):
        check_mode(teacher_logits, teacher_models=True)
        self.teacher_logits = teacher_logits
        teacher_model, names = named_teachers(teacher_model)
        teacher_weights = weights_in_order(teacher_weights, names)
        several = isinstance(teacher_model, (list, tuple))
        if several and not teacher_model:
            raise ValueError("teacher_model is empty: pass one teacher model or several")
        if several and not all(isinstance(teacher, str) or hasattr(teacher, "get_output_embeddings")
                               for teacher in teacher_model):
            raise ValueError("teacher_model as a list or dict takes causal LMs (models with get_output_embeddings()) "
                             "or their paths")
        if not several and (teacher_weights is not None or teacher_combine != "mixture"):
            raise ValueError("teacher_weights and teacher_combine weigh several teachers: pass teacher_model as a "
                             "list of models")
        if teacher_combine not in COMBINES:
            raise ValueError(f"teacher_combine must be one of {COMBINES}, got {teacher_combine!r}")
        if several:
            check_trainer_weights(teacher_weights, len(teacher_model))
        super().__init__(model, teacher_model[0] if several else teacher_model, args, *rest, **kwargs)
        self.teacher_weights, self.teacher_combine = teacher_weights, teacher_combine
        self._teacher_divergences, self._teacher_windows = None, {}
        self.teacher_names = (names or [str(index) for index in range(len(teacher_model))]) if several else None
        self.teacher_models = None
        if several:
            others = [self._loaded_teacher(teacher) for teacher in teacher_model[1:]]
            for name, teacher in zip(self.teacher_names[1:], others):
                self._check_vocabulary(name, teacher)  # TRL checks the first one's
            self.teacher_models = [self.teacher_model, *(self._prepared_teacher(teacher) for teacher in others)]
            if teacher_weights is None:  # the datasets' routes, here rather than when their rows' batches come
                check_dataset_teacher_ids(self.train_dataset, self.teacher_names, "train_dataset")
                check_dataset_teacher_ids(self.eval_dataset, self.teacher_names, "eval_dataset")

    def _check_vocabulary(self, name: str, teacher) -> None:
        """A teacher's vocabulary is the student's, as TRL checks its one teacher's."""
        student, theirs = (model.config.get_text_config().vocab_size for model in (self.model, teacher))
        if student != theirs:
            raise ValueError(f"teacher_model[{name!r}] has vocab_size {theirs} but the student model has vocab_size "
                             f"{student}: distillation compares the full next-token distributions, which needs one "
                             "vocabulary (a teacher of another tokenizer: GOLDTrainer)")

    def _loaded_teacher(self, teacher):
        """A teacher given by its path, loaded as TRL loads its own (trl.DistillationTrainer.__init__:
        `teacher_model_init_kwargs`, `teacher_model_revision`, remote code, no device_map across processes)."""
        if not isinstance(teacher, str):
            return teacher
        kwargs = dict(self.args.teacher_model_init_kwargs or {})
        dtype = kwargs.get("dtype")
        kwargs["dtype"] = dtype if dtype in ("auto", None) else getattr(torch, dtype)
        if self.args.teacher_model_revision is not None:
            kwargs.setdefault("revision", self.args.teacher_model_revision)
        if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        return create_model_from_path(teacher, **kwargs)

    def _prepared_teacher(self, teacher):
        """A teacher prepared as TRL prepares its own (trl.DistillationTrainer.__init__)."""
        if self.is_deepspeed_enabled:
            return sys.modules[_TRLDistillationTrainer.__module__].prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.teacher_models is not None and "teacher_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "teacher_id"]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.teacher_models is not None and self.teacher_weights is None and "teacher_id" in inputs[0]:
            # A [B] tensor, so that TRL's shuffle and split of the generation batch carry it with its rows.
            positions = [teacher_position(row["teacher_id"], self.teacher_names) for row in inputs]
            output["teacher_id"] = torch.tensor(positions, device=output["prompt_ids"].device)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._teacher_divergences is not None:  # gathered here, outside the wrapped forward (as TRL's entropy)
            sums, tokens = self._teacher_divergences
            sums = self.accelerator.gather_for_metrics(sums.reshape(1, -1)).sum(0)
            tokens = self.accelerator.gather_for_metrics(tokens.reshape(1, -1)).sum(0)
            window = self._teacher_windows.setdefault("train" if self.model.training else "eval",
                                                      [[0.0] * len(sums), [0.0] * len(sums), False])
            window[0] = [kept + new for kept, new in zip(window[0], sums.tolist())]
            window[1] = [kept + new for kept, new in zip(window[1], tokens.tolist())]
            window[2] = window[2] or "teacher_id" in inputs
            self._teacher_divergences = None
        return result

    def log(self, logs, start_time=None):
        # Each teacher's divergence per token over the window's tokens (not a mean of its micro-batches' means), left
        # out for a teacher that scored none (a mean over no token); routed, its share of the window's tokens.
        mode = "train" if self.model.training else "eval"
        window = self._teacher_windows.pop(mode, None)
        if window is not None:
            sums, counts, routed = window
            for name, total, count in zip(self.teacher_names, sums, counts):
                if count > 0:
                    self._metrics[mode][f"divergence/teacher_{name}"] = [total / count]
                if routed:
                    self._metrics[mode][f"tokens/teacher_{name}"] = [count / max(sum(counts), 1.0)]
        return super().log(logs, start_time)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: tool outputs are not the student's to learn
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
        teachers = self.teacher_models if self.teacher_models is not None else [self.teacher_model]
        probe = {"input_ids": input_ids, "attention_mask": attention_mask, **multimodal}
        # Each model's own logits against the loss's, on its first call (head_check.py); a teacher that fails it (or
        # every one, "own") is distilled through its own logits (teacher_logits.py).
        check_head_map(unwrapped_student, probe)
        own = [uses_own_logits(self.teacher_logits, self.accelerator.unwrap_model(teacher), probe)
               for teacher in teachers if teacher is not None]
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        if self.teacher_models is not None and len(self.teacher_models) > 1:
            return self._several_teachers_loss(unwrapped_student, student_hidden, input_ids, attention_mask,
                                               logits_to_keep, multimodal, loss_mask, num_items_in_batch, inputs, own)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        student_head = output_head(unwrapped_student)
        if own and own[0]:
            with torch.no_grad():
                teacher_logits = self._own_logits(self.teacher_model, unwrapped_teacher, input_ids, attention_mask,
                                                  logits_to_keep, multimodal)
            with whole_head(unwrapped_student, student_head):
                device = student_head.weight.device
                total, entropy_sum, n_valid = divergence_sums_of_logits(
                    student_hidden.to(device), teacher_logits.to(device), student_head.weight, loss_mask.to(device),
                    self.beta, student_head.bias, logit_scale(unwrapped_student), final_softcap(unwrapped_student),
                    self.temperature)
        else:
            total, entropy_sum, n_valid = self._fused_heads_sums(unwrapped_student, student_head, unwrapped_teacher,
                                                                 student_hidden, input_ids, attention_mask,
                                                                 logits_to_keep, multimodal, loss_mask)
        if self.teacher_models is not None:  # one teacher by name: the one teacher's arithmetic, its metrics
            self._teacher_divergences = (total.detach().reshape(1), n_valid.detach().reshape(1))
        return _divided(total, n_valid, num_items_in_batch), entropy_sum, n_valid

    def _fused_heads_sums(self, unwrapped_student, student_head, unwrapped_teacher, student_hidden, input_ids,
                          attention_mask, logits_to_keep, multimodal, loss_mask):
        """`divergence_sums` of the student's and the one teacher's heads, fused."""
        with torch.no_grad():
            # Through the teacher's own wrapper, so FSDP / DeepSpeed gather its shards for the backbone.
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        teacher_head = output_head(unwrapped_teacher)
        settings = head_settings(unwrapped_student, unwrapped_teacher)
        with whole_head(unwrapped_student, student_head), whole_head(unwrapped_teacher, teacher_head, frozen=True):
            device = student_head.weight.device
            return divergence_sums(
                student_hidden.to(device), teacher_hidden.to(device), student_head.weight, teacher_head.weight,
                loss_mask.to(device), self.beta, student_head.bias, teacher_head.bias,
                settings["student_logit_scale"], settings["teacher_logit_scale"], settings["student_softcap"],
                settings["teacher_softcap"], self.temperature)

    def _own_logits(self, teacher, unwrapped, input_ids, attention_mask, logits_to_keep, multimodal):
        """The teacher's own forward's logits at the positions that predict the completion tokens ([B, K, V]), as
        `_get_last_hidden_state` takes its hidden states there; its whole forward, through its own wrapper (FSDP and
        DeepSpeed gather its shards)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **multimodal, **no_cache(unwrapped)}
        if "logits_to_keep" in inspect.signature(unwrapped.forward).parameters:
            inputs["logits_to_keep"] = logits_to_keep + 1  # the last position predicts past the completion
        logits = teacher(**inputs).logits
        return logits[:, :-1][:, -logits_to_keep:]

    def _several_teachers_loss(self, unwrapped_student, student_hidden, input_ids, attention_mask, logits_to_keep,
                               multimodal, loss_mask, num_items_in_batch, inputs, own):
        route = inputs.get("teacher_id") if self.teacher_weights is None else None
        student_head = output_head(unwrapped_student)
        unwrapped, rows = [], []
        for index, teacher in enumerate(self.teacher_models):
            teacher.eval()
            unwrapped.append(self.accelerator.unwrap_model(teacher))
            # Routed, a teacher runs on its own sequences alone (`own_examples`), but on all of them where images
            # ride along (their tensors are not per sequence).
            mine = own_examples(route, index, unwrapped[-1]) if not multimodal else None
            if mine is not None and mine.numel() == 0:  # no sequence: [0, K, V] logits or [0, K, H_m] hidden states
                head = (student_head if own[index] else output_head(unwrapped[-1])).weight
                shape = getattr(head, "ds_shape", head.shape)  # (a ZeRO-3 partitioned weight: its whole shape)
                rows.append(head.new_empty(0, logits_to_keep, shape[0] if own[index] else shape[-1]))
                continue
            ids, mask = (input_ids, attention_mask) if mine is None else \
                (input_ids.index_select(0, mine), attention_mask.index_select(0, mine))
            with torch.no_grad():
                rows.append(self._own_logits(teacher, unwrapped[-1], ids, mask, logits_to_keep, multimodal)
                            if own[index] else
                            self._forward_redirection(teacher, unwrapped[-1], self._get_last_hidden_state,
                                                      unwrapped[-1], ids, mask, logits_to_keep, **multimodal))
        # A teacher given as its own logits has no head in the loss (None), nor a map (its logits are final).
        heads = [None if given else output_head(teacher) for teacher, given in zip(unwrapped, own)]
        fused = [(teacher, head) for teacher, head in zip(unwrapped, heads) if head is not None]
        with whole_heads(unwrapped_student, student_head, [t for t, _ in fused], [h for _, h in fused]):
            device = student_head.weight.device
            loss, entropy_sum, n_valid, per_teacher = chunked_multi_teacher_divergence_loss(
                student_hidden.to(device), [r.to(device) for r in rows], student_head.weight,
                [head.weight if head is not None else None for head in heads], loss_mask.to(device), self.beta,
                num_items_in_batch, student_head.bias, [head.bias if head is not None else None for head in heads],
                logit_scale(unwrapped_student),
                [logit_scale(teacher) if head is not None else 1.0 for teacher, head in zip(unwrapped, heads)],
                final_softcap(unwrapped_student),
                [final_softcap(teacher) if head is not None else None for teacher, head in zip(unwrapped, heads)],
                self.temperature, weights=self.teacher_weights, combine=self.teacher_combine,
                completion_ids=inputs["completion_ids"], teacher_index=route)
        # The tokens each teacher scored: all of them, or routed, its own sequences'.
        tokens = n_valid.expand(len(heads)) if route is None else torch.stack(
            [(loss_mask[route == index] != 0).sum() for index in range(len(heads))])
        self._teacher_divergences = (per_teacher.detach(), tokens.detach())
        return loss, entropy_sum, n_valid

