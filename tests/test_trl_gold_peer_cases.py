"""TRL's own GOLD test cases (huggingface/trl, tests/experimental/test_gold_trainer.py) for the behaviours kdfast
shares with it, ported: TRL's inputs and expectations, kdfast's code under test, each test naming the TRL test it ports.
GOLD's merge of split tokens ("observed", "bayesian"), its matched JSD on probabilities, the "bayesian" one-row shift
and the leading span it drops, positional ULD without byte offsets, answer spans, byte-offset groups of two
tokenizations, the vocabulary map and the hybrid's matched/unmatched weighting on whole sequences. TRL's tokenizers
(Llama 3.2, Qwen 2.5, SmolLM3) come from the Hub, which these tests cannot reach: two byte-level BPE tokenizers trained
here on the same sentences stand in for them. Where TRL only asserted that a loss is finite, the port also asserts its
value (TRL's formula, or TRL's own function on the same inputs)."""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kdfast

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gold.gold_trainer import ULDLoss as TRLULDLoss
    from trl.experimental.utils import encode_with_byte_offsets, pad_byte_offsets

from kdfast.demo.corpus import train_tokenizer  # noqa: E402
from kdfast.integrations.trl_gold import ULDLoss, _answer_spans  # noqa: E402


def build_config(**overrides):
    """TRL's `build_config`: the GOLDConfig fields ULDLoss reads, as a namespace."""
    base = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
                uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    base.update(overrides)
    return SimpleNamespace(**base)


def kdfast_uld(config, student_tokenizer=None, teacher_tokenizer=None):
    loss_fn = ULDLoss(config, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
    # kdfast's ULDLoss subclasses TRL's: the method these cases call must be kdfast's, not the inherited one.
    assert type(loss_fn)._compute_distillation_loss is not TRLULDLoss._compute_distillation_loss
    return loss_fn


def sorted_l1_rows(student_rows, teacher_rows):
    """TRL's plain ULD of aligned rows, in float64: softmax, sort descending, zero-pad the narrower, L1 summed and
    divided by the rows (the expectation TRL writes out in its bayesian tests)."""
    student = torch.softmax(student_rows.double(), dim=-1).sort(dim=-1, descending=True).values
    teacher = torch.softmax(teacher_rows.double(), dim=-1).sort(dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    student = F.pad(student, (0, width - student.shape[-1]))
    teacher = F.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum() / student.shape[0]


# TRL's probabilities: row 0 the marginal over a 3-token vocabulary, row 1 the next position's; tokens [0, 1].
MERGE_PROBS = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
IDENTITY_MAP = kdfast.VocabMap(torch.arange(3), torch.arange(3), 3, 3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("merge, expected", [
    # test_merge_probabilities_multiplies_split_tokens_observed: probs[0] * probs[1, token_ids[1]] = probs[0] * 0.5
    ("observed", [0.30, 0.15, 0.05]),
    # test_merge_probabilities_multiplies_split_tokens_bayesian: probs[1] * probs[0, token_ids[0]] = probs[1] * 0.6
    ("bayesian", [0.12, 0.30, 0.18]),
])
def test_merge_multiplies_split_tokens(merge, expected, backend):
    """TRL merges a group of two student tokens into one unnormalised row. kdfast never builds that row, so it is
    read back from the loss: against a one-hot teacher at column j, the hybrid's matched forward KL of a group is
    -log(merged[j]) (the 1e-8 floor of the zero teacher columns adds ~1e-7), one group per column j."""
    teacher = torch.full((3, 3), -1e4)
    teacher[torch.arange(3), torch.arange(3)] = 0.0  # softmax: exactly one-hot in float32
    alignment = kdfast.TokenAlignment.cat([
        kdfast.align_tokenizations([0, 1], [[0, 1], [1, 2]], [j], [[0, 2]], student_rows=[0, 1], teacher_rows=[j],
                                   merge=merge)
        for j in range(3)])
    assert alignment.groups == 3 and alignment.student.extra_rows.numel() == 3  # one merged token per group
    _, parts = kdfast.cross_vocab_distill_loss(
        MERGE_PROBS.log(), teacher, vocab_map=IDENTITY_MAP, alignment=alignment, method="hybrid",
        divergence="forward_kl", matched_weight=1.0, unmatched_weight=0.0, t2_scale=False, reduction="none",
        return_components=True, backend=backend)
    torch.testing.assert_close(torch.exp(-parts.matched), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matched_jsd_on_probability_inputs(backend):
    """test_generalized_jsd_loss_accepts_probability_inputs: GOLD's JSD (beta 0.5) taken on probabilities, as its
    hybrid takes it on the matched columns; here the hybrid with every column matched and only its matched part."""
    student_probs = torch.tensor([[0.6, 0.3, 0.1]])
    teacher_probs = torch.tensor([[0.5, 0.4, 0.1]])
    mixture = 0.5 * (student_probs + teacher_probs)
    expected = 0.5 * (torch.sum(student_probs * (torch.log(student_probs) - torch.log(mixture)))
                      + torch.sum(teacher_probs * (torch.log(teacher_probs) - torch.log(mixture))))
    loss = kdfast.cross_vocab_distill_loss(
        student_probs.log(), teacher_probs.log(), vocab_map=IDENTITY_MAP, method="hybrid", divergence="jsd",
        beta=0.5, matched_weight=1.0, unmatched_weight=0.0, t2_scale=False, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_bayesian_reads_the_row_before_each_token():
    """test_compute_distillation_loss_bayesian_shifts_answer_logits: positional ULD, answer at positions [1, 2];
    "bayesian" scores rows [0, 1], "observed" rows [1, 2] (a different loss)."""
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    labels, input_ids = torch.tensor([[-100, 1, 2]]), torch.tensor([[0, 1, 2]])
    batch = (student_logits, teacher_logits, labels, labels, input_ids, input_ids)
    bayesian = kdfast_uld(build_config(use_extended_uld=False, uld_token_merge_strategy="bayesian"))
    result = bayesian._compute_distillation_loss(*batch)
    expected = sorted_l1_rows(student_logits[0, 0:2], teacher_logits[0, 0:2])
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)
    observed = kdfast_uld(build_config(use_extended_uld=False))._compute_distillation_loss(*batch)
    torch.testing.assert_close(observed.double(), sorted_l1_rows(student_logits[0, 1:3], teacher_logits[0, 1:3]),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(observed.double(), expected)


@pytest.mark.parametrize("extended", [False, True], ids=["positional", "extended"])
def test_bayesian_skips_a_span_starting_at_zero(extended):
    """test_compute_distillation_loss_bayesian_skips_zero_start_span_positional / _extended: an answer starting at
    index 0 (front truncation) has no row predicting its first token; "bayesian" drops it (positional: one position;
    extended: the first aligned group, here one token a side) instead of wrapping to row -1. TRL's expectation is
    rows [0, 1] for the positional case; with 1:1 byte offsets the extended case drops the same token, so the same
    value (TRL asserts only that it is finite there; its own ULDLoss is held to it too)."""
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    labels = input_ids = torch.tensor([[1, 2, 3]])  # start 0, size 3
    offsets = torch.tensor([[[0, 1], [1, 2], [2, 3]]]) if extended else None
    config = build_config(use_extended_uld=extended, uld_token_merge_strategy="bayesian")
    batch = dict(student_logits=student_logits, teacher_logits=teacher_logits, student_labels=labels,
                 teacher_labels=labels, student_input_ids=input_ids, teacher_input_ids=input_ids,
                 student_byte_offsets=offsets, teacher_byte_offsets=offsets)
    result = kdfast_uld(config)._compute_distillation_loss(**batch)
    assert torch.isfinite(result)
    expected = sorted_l1_rows(student_logits[0, 0:2], teacher_logits[0, 0:2])
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)
    trl_result = TRLULDLoss(config)._compute_distillation_loss(**batch)
    torch.testing.assert_close(result, trl_result, rtol=1e-5, atol=1e-6)


def test_bayesian_zero_loss_when_only_token_dropped():
    """test_compute_distillation_loss_bayesian_zero_loss_when_only_token_dropped: a one-token answer at index 0 leaves
    nothing to score after the drop: zero, no crash."""
    loss_fn = kdfast_uld(build_config(use_extended_uld=False, uld_token_merge_strategy="bayesian"))
    student_logits = torch.randn(1, 2, 4, requires_grad=True)
    labels, input_ids = torch.tensor([[5, -100]]), torch.tensor([[5, 0]])
    result = loss_fn._compute_distillation_loss(student_logits, torch.randn(1, 2, 4), labels, labels, input_ids,
                                                input_ids)
    torch.testing.assert_close(result, torch.zeros_like(result))
    result.sum().backward()  # still part of the graph (a zero gradient), as TRL's zero is
    assert student_logits.grad is not None and not student_logits.grad.any()


def test_positional_mode_needs_no_byte_offsets():
    """test_uldloss_positional_mode_does_not_require_byte_offsets: vocabularies 5 and 6, no offsets passed. TRL
    asserts a finite loss; its value is also held to the definition (answer rows [1, 2], the student's sorted
    probabilities zero-padded to 6) and to TRL's ULDLoss."""
    config = build_config(use_extended_uld=False)
    generator = torch.Generator().manual_seed(0)
    batch = dict(student_logits=torch.randn(1, 4, 5, generator=generator),
                 teacher_logits=torch.randn(1, 4, 6, generator=generator),
                 student_labels=torch.tensor([[-100, 1, 2, -100]]), teacher_labels=torch.tensor([[-100, 3, 4, -100]]),
                 student_input_ids=torch.tensor([[0, 1, 2, 0]]), teacher_input_ids=torch.tensor([[0, 3, 4, 0]]))
    loss = kdfast_uld(config)(**batch)
    assert torch.isfinite(loss)
    expected = sorted_l1_rows(batch["student_logits"][0, 1:3], batch["teacher_logits"][0, 1:3])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, TRLULDLoss(config)(**batch), rtol=1e-5, atol=1e-6)


def test_answer_spans_skip_prompt_tokens():
    """test_get_start_and_size_answers_skips_prompt_tokens: kdfast's replacement of `_get_start_and_size_answers`."""
    answers = torch.tensor([[-100, -100, -100, 10, 20, 30, -100, -100],
                            [-100, 5, 6, 7, -100, -100, -100, -100],
                            [-100, -100, -100, -100, -100, -100, -100, -100]])
    starts, sizes = _answer_spans(answers, -100)
    assert starts == [3, 1, 0]
    assert sizes == [3, 3, 0]


# Stand-ins for TRL's Hub tokenizers: two byte-level BPEs trained on different mixes of TRL's sentences, so they share
# most token strings and split some words differently. The first lines make TRL's "common tokens" whole tokens.
COMMON_TOKENS = ["Hello", "world", "-", "ol", "LM", "3", "B"]  # TRL's list for Llama 3.2 vs Qwen 2.5
SENTENCES = ["Hello there", "world peace", "ol ol", "LM LM", "Hello world, SmolLM3-3B says hi to you.",
             "User: Summarize the difference between llamas and alpacas.",
             "Assistant: Llamas are taller while alpacas have softer wool.",
             "User: Describe SmolLM3 in a sentence.", "Assistant: SmolLM3 is a compact yet capable language model.",
             "User: Explain how GOLD handles tokenizer mismatches.",
             "Assistant: GOLD merges aligned subwords and applies hybrid ULD loss."]


@pytest.fixture(scope="module")
def tokenizers():
    student = train_tokenizer(SENTENCES * 4 + ["emoji 😊 emoji 😊 emoji 😊"] * 4, 330)
    teacher = train_tokenizer(SENTENCES[::-1] * 3 + ["says hi says hi to 你好 to 你好"] * 5, 390)
    return student, teacher


def test_alignment_groups_cover_all_tokens(tokenizers):
    """test_alignment_groups_cover_all_tokens: TRL's sentence (an emoji, CJK) through both tokenizers' byte offsets
    (TRL's `encode_with_byte_offsets`): the groups partition each side's tokens, and each group spans the same bytes
    on both sides."""
    text = "SmolLM3-3B says hi 😊 to 你好."
    encoded = [encode_with_byte_offsets(tokenizer.backend_tokenizer, [text], add_special_tokens=False)[0]
               for tokenizer in tokenizers]
    (student_ids, student_offs), (teacher_ids, teacher_offs) = encoded
    alignment = kdfast.align_tokenizations(student_ids, student_offs, teacher_ids, teacher_offs)

    def groups(side):
        # The default rows are the token positions: a group's members are its base row and its merged-in rows.
        members = [[int(row)] for row in side.base]
        for row, group in zip(side.extra_rows.tolist(), side.extra_groups.tolist()):
            members[group].append(row)
        return [sorted(group) for group in members]

    student_groups, teacher_groups = groups(alignment.student), groups(alignment.teacher)
    assert len(student_groups) == len(teacher_groups) == alignment.groups
    assert sorted(idx for group in student_groups for idx in group) == list(range(len(student_ids)))
    assert sorted(idx for group in teacher_groups for idx in group) == list(range(len(teacher_ids)))
    for student_group, teacher_group in zip(student_groups, teacher_groups):
        assert student_group == list(range(student_group[0], student_group[-1] + 1))  # contiguous runs
        student_span = (student_offs[student_group[0]][0], student_offs[student_group[-1]][1])
        teacher_span = (teacher_offs[teacher_group[0]][0], teacher_offs[teacher_group[-1]][1])
        assert student_span == teacher_span
    # The case is only a test if the two tokenizations differ: groups of several tokens on both sides.
    assert any(len(group) > 1 for group in student_groups) and any(len(group) > 1 for group in teacher_groups)


def test_vocab_map_holds_common_tokens(tokenizers):
    """test_initialize_vocabulary_mapping_contains_common_tokens: every common token maps the teacher's id to the
    student's; and the whole map is the one TRL's hybrid ULDLoss builds from the same tokenizers."""
    student_tokenizer, teacher_tokenizer = tokenizers
    vocab_map = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    pairs = dict(zip(vocab_map.teacher_ids.tolist(), vocab_map.student_ids.tolist()))
    for token in COMMON_TOKENS:
        student_id = student_tokenizer.convert_tokens_to_ids(token)
        teacher_id = teacher_tokenizer.convert_tokens_to_ids(token)
        assert student_id is not None and teacher_id is not None, token
        assert pairs[teacher_id] == student_id, token
    config = build_config(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=1.0, uld_hybrid_unmatched_weight=0.0)
    trl_loss = TRLULDLoss(config, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
    assert pairs == trl_loss._vocab_mapping


def encode_prompt_completion(tokenizer, prompt, completion):
    """TRL's helper: prompt ids, the completion's ids and byte offsets (`encode_with_byte_offsets`), EOS appended at
    the zero-width offset (content_len, content_len); prompt positions labelled -100, offsets (0, 0)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    [(ids, offsets)] = encode_with_byte_offsets(tokenizer.backend_tokenizer, [completion], add_special_tokens=False)
    content_len = len(completion.encode("utf-8"))
    completion_ids = list(ids) + [tokenizer.eos_token_id]
    completion_offsets = list(offsets) + [(content_len, content_len)]
    return (prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids,
            [(0, 0)] * len(prompt_ids) + completion_offsets)


HYBRID_SEQUENCES = {
    # test_uldloss_handles_llama_student_qwen_teacher_sequence
    "llama_qwen": (dict(uld_hybrid_matched_weight=0.6, uld_hybrid_unmatched_weight=0.4),
                   "User: Summarize the difference between llamas and alpacas.",
                   "Assistant: Llamas are taller while alpacas have softer wool."),
    # test_uldloss_handles_smollm_student_qwen_teacher_sequence
    "smollm_qwen": (dict(uld_hybrid_matched_weight=0.5, uld_hybrid_unmatched_weight=0.5),
                    "User: Describe SmolLM3 in a sentence.",
                    "Assistant: SmolLM3 is a compact yet capable language model."),
    # test_uldloss_hybrid_config_beta_zero (its extra GOLDConfig fields do not reach ULDLoss)
    "beta_zero": (dict(uld_hybrid_matched_weight=0.0, uld_hybrid_unmatched_weight=1.0, beta=0.0),
                  "User: Explain how GOLD handles tokenizer mismatches.",
                  "Assistant: GOLD merges aligned subwords and applies hybrid ULD loss."),
}


@pytest.mark.parametrize("case", list(HYBRID_SEQUENCES))
def test_hybrid_sequence_weights_matched_and_unmatched(tokenizers, case):
    """One prompt/completion through both tokenizers, padded to one length, random logits of each vocabulary, hybrid
    ULD with fixed weights. TRL asserts a finite 0-dim loss with both parts set, and (beta_zero) that the loss is
    unmatched_weight * last_unmatched_loss; for one sample that is matched_weight * last_matched_loss +
    unmatched_weight * last_unmatched_loss in every case, asserted here, with the loss and parts also TRL's."""
    weights, prompt, completion = HYBRID_SEQUENCES[case]
    config = build_config(uld_use_hybrid_loss=True, **weights)
    sides = [encode_prompt_completion(tokenizer, prompt, completion) for tokenizer in tokenizers]
    length = max(len(ids) for ids, _, _ in sides)
    batch = {}
    for name, tokenizer, (ids, labels, offsets) in zip(("student", "teacher"), tokenizers, sides):
        pad = length - len(ids)
        batch[f"{name}_input_ids"] = torch.tensor([ids + [tokenizer.pad_token_id] * pad])
        batch[f"{name}_labels"] = torch.tensor([labels + [-100] * pad])
        batch[f"{name}_byte_offsets"] = pad_byte_offsets(offsets, length, padding_side="right").unsqueeze(0)
    generator = torch.Generator().manual_seed(0)
    logits = dict(student_logits=torch.randn(1, length, len(tokenizers[0]), generator=generator),
                  teacher_logits=torch.randn(1, length, len(tokenizers[1]), generator=generator))

    loss_fn = kdfast_uld(config, *tokenizers)
    assert loss_fn.method == "hybrid"
    loss = loss_fn(**logits, **batch)
    assert torch.isfinite(loss) and loss.dim() == 0
    assert loss_fn.last_matched_loss is not None and loss_fn.last_unmatched_loss is not None
    expected = (config.uld_hybrid_matched_weight * loss_fn.last_matched_loss
                + config.uld_hybrid_unmatched_weight * loss_fn.last_unmatched_loss)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)

    trl_fn = TRLULDLoss(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])
    torch.testing.assert_close(loss, trl_fn(**logits, **batch), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_fn.last_matched_loss, trl_fn.last_matched_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_fn.last_unmatched_loss, trl_fn.last_unmatched_loss, atol=1e-6, rtol=1e-5)
