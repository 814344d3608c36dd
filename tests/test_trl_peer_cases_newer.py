"""TRL's newer test cases for behaviour kdfast shares with it, the ones kdfast's earlier ports do not have yet: TRL's
inputs and expectations, kdfast's code under test, each test naming the TRL test it ports.

GOLD, from huggingface/trl tests/experimental/test_gold_trainer.py at 9a7518a (the last commit touching it in the
stored snapshot of TRL's main, f2cd577; the version the code index lists, 5fbcfbc of 2026-01-08, is older and its
cases are all in 9a7518a, one renamed). TRL's ULDLoss is unchanged there from the installed TRL 1.16.0's, so TRL's own
ULDLoss is the reference. Ported: test_chatml_collator_preserves_completion_llama, _llama_countdown and _smollm
(marked slow in TRL: Hub tokenizers and datasets). A batch of three chats through TRL's DataCollatorForChatML (the
`messages` path: it applies the chat template, tokenizes and takes byte offsets itself), the teacher's inputs rebuilt
from the student's decoded prompt and completion texts by TRL's build_teacher_inputs_from_texts (right-padded, the
student's batch left-padded, the two of different lengths), kdfast's aligner on each answer span, then hybrid ULD with
TRL's weights on random logits. The Hub tokenizers and datasets cannot be reached: three byte-level BPEs trained here
stand in (a "Llama" student whose header and end-of-turn markers are special tokens, a "SmolLM" student that splits
digits, a "Qwen" teacher that splits those markers into pieces, all three with pad = EOS), and a few chats in the
style of OpenR1-Math and Countdown (LaTeX, digits, multi-byte signs) stand in for the datasets. TRL asserts coverage
and a finite loss; the port also asserts kdfast's groups, loss, student-logit gradient and matched/unmatched parts are
TRL's.

Left out of the GOLD file, as TRL's own code that kdfast's GOLDTrainer inherits unchanged or that kdfast does not
have: test_on_policy_completion_byte_offsets_match_encode_offsets (the trainer's `_maybe_add_completion_byte_offsets`:
kdfast's aligner takes the offsets as given); the pad == EOS cases (generate_on_policy_outputs,
build_teacher_inputs_from_texts, _decode_completion_texts_from_labels), though the stand-ins here run with pad == EOS;
the collator's truncation and the dataset preparation cases; on-policy generation, vLLM and prompt budgeting; every
VLM case (Hub processors and images; test_vlm_alignment_groups_cover_all_tokens_smolvlm_qwen3vl and
test_vlm_chatml_collator_preserves_completion_* assert what the text cases here assert, after a VLM collator);
trainer construction checks; the Liger and train-step smoke runs (Hub models); and
TestGOLDTrainerLoss.test_loss_normalizes_by_num_items_in_batch, which tests the JSD path of a shared tokenizer,
left to TRL by kdfast's GOLDTrainer (TRL notes the ULD path is not covered by it). Every other loss-level case of
the file (merges, the "bayesian" shift and drops, positional ULD, answer spans, byte-offset groups, the vocabulary
map, the hybrid's weighting, JSD on probabilities) is in tests/test_trl_gold_peer_cases.py.

Async distillation, tests/experimental/test_async_distillation_trainer.py: nothing new to port. The newest stored
version is 361edd3 (the snapshot of TRL's main holds no such file); it is a subset of the 0574139 version that
tests/test_trl_async_peer_cases.py was ported from (no TestPerTeacherStats, TestEpochStop, TestRolloutStateCheckpoint,
TestRolloutRequestModel, PEFT or resume cases). Its loss-level cases, TestNarrowTop1ActualSupport (all nine),
TestSparseGeneralizedJSDMatchesFullVocabReference, test_train and test_train_with_nonzero_beta, are ported in
tests/test_sparse_peer_cases_more.py and tests/test_trl_async_peer_cases.py; the rest (TestPackingAwareBatching,
TestMetricReduction, TestRolloutWorkerProtocol, TestParseTeacherLogprobs, TestWorkerMetrics, TestMultiTeacherRouting,
TestBetaRange, test_init_minimal) are batching, metrics, the rollout worker and config checks, left out there."""

import os
import warnings

import pytest
import torch

import kdfast

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.gold")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gold.gold_trainer import ULDLoss as TRLULDLoss
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts
    from trl.experimental.utils import DataCollatorForChatML

from test_trl_gold_peer_cases import SENTENCES, build_config, kdfast_uld  # noqa: E402

from kdfast.demo.corpus import train_tokenizer  # noqa: E402

# Stand-ins for HuggingFaceTB/OpenR1-Math-220k-default-verified and Countdown-Tasks-3to4 (three rows each, as TRL's
# split="train[:3]"): answers with <think> blocks, LaTeX, digits and multi-byte signs (−, ×, °, ²).
OPENR1 = [
    [{"role": "user", "content": "Find all real x with x² − 5x + 6 = 0."},
     {"role": "assistant", "content": "<think>\nFactor: (x − 2)(x − 3) = 0, so x = 2 or x = 3.\n</think>\n"
                                      "The roots are $x=2$ and $x=3$, i.e. \\boxed{2, 3}."}],
    [{"role": "user", "content": "A 30° angle: what is sin(30°)?"},
     {"role": "assistant", "content": "sin(30°) = 1/2, so \\boxed{\\frac{1}{2}}."}],
    [{"role": "user", "content": "Compute 12 × 34."},
     {"role": "assistant", "content": "<think>12 × 34 = 12 × 30 + 12 × 4 = 360 + 48 = 408.</think>\n\\boxed{408}"}],
]
COUNTDOWN = [
    [{"role": "user", "content": "Using the numbers [19, 36, 55, 7], create an equation that equals 65. Use each "
                                 "number once."},
     {"role": "assistant", "content": "<think>55 + 36 = 91, 91 − 19 = 72, 72 − 7 = 65.</think>\n"
                                      "<answer>55 + 36 - 19 - 7</answer>"}],
    [{"role": "user", "content": "Using the numbers [3, 8, 25], create an equation that equals 49."},
     {"role": "assistant", "content": "<think>25 × 3 = 75; too big. 8 × 3 = 24, 24 + 25 = 49.</think>\n"
                                      "<answer>8 * 3 + 25</answer>"}],
    [{"role": "user", "content": "Using the numbers [44, 2, 90, 11], create an equation that equals 68."},
     {"role": "assistant", "content": "<think>90 - 44 = 46; 46 + 11 × 2 = 68.</think>\n"
                                      "<answer>90 - 44 + 11 * 2</answer>"}],
]
LLAMA_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                  "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                  "\n\n{% endif %}")
SMOLLM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizers():
    """Trained on different parts of the chats and TRL's sentences, so each splits some words differently from the
    teacher (groups of 1 student token to 2-4 teacher tokens and back); the "Llama" student's end-of-turn is one
    special token where the teacher has ten pieces, as Llama 3's <|eot_id|> against Qwen's tokenizer."""
    texts = [message["content"] for chat in OPENR1 + COUNTDOWN for message in chat]
    llama = train_tokenizer(SENTENCES * 4 + texts[1::2] * 3 + texts[::4] * 2, 420)
    llama.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    llama.chat_template = LLAMA_TEMPLATE
    smollm = train_tokenizer(SENTENCES * 2 + texts * 4, 480, split_digits=True)
    smollm.chat_template = SMOLLM_TEMPLATE
    qwen = train_tokenizer(SENTENCES[::-1] * 3 + texts[::-1][::3] * 2, 460)
    return {"llama": llama, "smollm": smollm, "qwen": qwen}


def teacher_inputs_from_collator(student_tokenizer, teacher_tokenizer, batch):
    """TRL's `_teacher_inputs_from_collator`: the student's prompt (pad ids dropped) and labelled completion decoded
    with special tokens kept, then TRL's build_teacher_inputs_from_texts on the teacher's tokenizer."""
    prompt_texts, completion_texts = [], []
    for prompt_ids, input_ids, labels in zip(batch["prompts"], batch["input_ids"], batch["labels"], strict=True):
        prompt_ids = [token for token in prompt_ids.tolist() if token != student_tokenizer.pad_token_id]
        prompt_texts.append(student_tokenizer.decode(prompt_ids, skip_special_tokens=False))
        completion = [token for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True) if label != -100]
        completion_texts.append(student_tokenizer.decode(completion, skip_special_tokens=False))
    teacher_input_ids, teacher_labels, _, teacher_byte_offsets = build_teacher_inputs_from_texts(
        teacher_tokenizer, prompt_texts, completion_texts)
    return teacher_input_ids, teacher_labels, completion_texts, teacher_byte_offsets


def group_members(side):
    """A side's groups as lists of token positions: with the default rows (the positions), a group's base row and
    the rows merged into it."""
    members = [[int(row)] for row in side.base]
    for row, group in zip(side.extra_rows.tolist(), side.extra_groups.tolist(), strict=True):
        members[group].append(row)
    return [sorted(group) for group in members]


def assert_alignment_covers_completion(batch, teacher_input_ids, teacher_labels, teacher_byte_offsets):
    """TRL's `_assert_alignment_covers_completion` on kdfast's aligner: per sample, the answer spans' offsets (from
    the first to the last labelled position, as TRL slices them) aligned as kdfast's ULDLoss aligns them (strict=False,
    GOLD's walk). TRL asserts its walk's groups partition both sides' answer tokens. kdfast's aligner does not make a
    group with no token on one side (TRL's loss drops those): here that is the teacher's appended zero-width EOS alone,
    so kdfast's groups must be TRL's walk's groups less those, the student's cover every answer token, and the
    teacher's every one but the EOS."""
    for i in range(batch["input_ids"].shape[0]):
        student_positions = (batch["labels"][i] != -100).nonzero(as_tuple=True)[0]
        teacher_positions = (teacher_labels[i] != -100).nonzero(as_tuple=True)[0]
        student_span = slice(int(student_positions[0]), int(student_positions[-1]) + 1)
        teacher_span = slice(int(teacher_positions[0]), int(teacher_positions[-1]) + 1)
        student_offsets = batch["byte_offsets"][i, student_span].tolist()
        teacher_offsets = teacher_byte_offsets[i, teacher_span].tolist()
        alignment = kdfast.align_tokenizations(batch["input_ids"][i, student_span], student_offsets,
                                               teacher_input_ids[i, teacher_span], teacher_offsets, strict=False)
        student_groups, teacher_groups = group_members(alignment.student), group_members(alignment.teacher)
        assert student_groups and teacher_groups, "Student and teacher alignment groups must not be empty"

        trl_pairs = list(zip(*TRLULDLoss._align_by_byte_offsets(student_offsets, teacher_offsets), strict=True))
        assert [(s, t) for s, t in trl_pairs if not (s and t)] == [([], [len(teacher_offsets) - 1])]
        assert list(zip(student_groups, teacher_groups, strict=True)) == [(s, t) for s, t in trl_pairs if s and t]
        assert sorted(k for group in student_groups for k in group) == list(range(len(student_offsets)))
        assert sorted(k for group in teacher_groups for k in group) == list(range(len(teacher_offsets) - 1))
        # The case tests merging only if the tokenizations differ: groups of several tokens on either side.
        assert any(len(s) != len(t) for s, t in zip(student_groups, teacher_groups, strict=True))


CHATML_CASES = {
    # test_chatml_collator_preserves_completion_llama: Llama 3.2 student, Qwen 2.5 teacher, OpenR1, torch seed 0
    "llama_openr1": ("llama", OPENR1, 0.6, 0.4, 0),
    # test_chatml_collator_preserves_completion_llama_countdown: Countdown, seed 2
    "llama_countdown": ("llama", COUNTDOWN, 0.6, 0.4, 2),
    # test_chatml_collator_preserves_completion_smollm: SmolLM3 student, weights 0.5 / 0.5, seed 1
    "smollm_openr1": ("smollm", OPENR1, 0.5, 0.5, 1),
}


@pytest.mark.parametrize("case", list(CHATML_CASES))
def test_chatml_collator_batch_aligns_and_distills(chat_tokenizers, case):
    """test_chatml_collator_preserves_completion_{llama, llama_countdown, smollm}: the collated batch keeps each
    answer, the teacher's rebuilt completion holds it, the alignment covers the completion, and hybrid ULD on random
    logits of both vocabularies is finite; and kdfast's loss, student-logit gradient and matched/unmatched parts are
    TRL's ULDLoss's on the same batch."""
    student_name, examples, matched_weight, unmatched_weight, seed = CHATML_CASES[case]
    student_tokenizer, teacher_tokenizer = chat_tokenizers[student_name], chat_tokenizers["qwen"]
    batch = DataCollatorForChatML(tokenizer=student_tokenizer, max_length=512)([{"messages": m} for m in examples])

    assistant_texts = [example[-1]["content"] for example in examples]
    decoded_batch = student_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=False)
    for decoded, assistant in zip(decoded_batch, assistant_texts, strict=True):
        assert assistant.strip() in decoded
    teacher_input_ids, teacher_labels, completion_texts, teacher_byte_offsets = teacher_inputs_from_collator(
        student_tokenizer, teacher_tokenizer, batch)
    for completion, assistant in zip(completion_texts, assistant_texts, strict=True):
        assert assistant.strip() in completion
        assert completion.strip()

    assert_alignment_covers_completion(batch, teacher_input_ids, teacher_labels, teacher_byte_offsets)

    config = build_config(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=matched_weight,
                          uld_hybrid_unmatched_weight=unmatched_weight)
    generator = torch.Generator().manual_seed(seed)  # TRL's torch.manual_seed(seed), its shapes
    batch_size, seq_len = batch["input_ids"].shape
    student_logits = torch.randn(batch_size, seq_len, len(student_tokenizer), generator=generator)
    teacher_logits = torch.randn(batch_size, teacher_input_ids.shape[1], len(teacher_tokenizer), generator=generator)
    inputs = dict(teacher_logits=teacher_logits, student_labels=batch["labels"], teacher_labels=teacher_labels,
                  student_input_ids=batch["input_ids"], teacher_input_ids=teacher_input_ids,
                  student_byte_offsets=batch["byte_offsets"], teacher_byte_offsets=teacher_byte_offsets)

    results = []
    for loss_fn in (kdfast_uld(config, student_tokenizer, teacher_tokenizer),
                    TRLULDLoss(config, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)):
        student = student_logits.clone().requires_grad_()
        loss = loss_fn(student_logits=student, **inputs)
        loss.backward()
        results.append((loss.detach(), student.grad, loss_fn))
    (loss, grad, loss_fn), (trl_loss, trl_grad, trl_fn) = results
    assert loss_fn.method == "hybrid"
    assert torch.isfinite(loss)  # TRL's assertion
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    error = (grad - trl_grad).norm() / trl_grad.norm()
    assert error <= 1e-5, f"student-logit gradient: relative L2 error {error:.2e} against TRL's"
    for name in ("last_matched_loss", "last_unmatched_loss"):
        torch.testing.assert_close(getattr(loss_fn, name), getattr(trl_fn, name).detach(), rtol=1e-5, atol=1e-7,
                                   msg=name)
