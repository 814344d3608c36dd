"""The small pair of vocabularies the cross-vocabulary tests share: a teacher of 13 strings tok0..tok12, a student of
11 holding seven of them in another order and four of its own (so both sides have unmatched tokens)."""

import kdfast

STUDENT_VOCAB, TEACHER_VOCAB = 11, 13


class Vocabulary:
    """A tokenizer as VocabMap.from_tokenizers reads one: its string -> id map."""

    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def small_vocab_map() -> kdfast.VocabMap:
    teacher = {f"tok{i}": i for i in range(TEACHER_VOCAB)}
    student = {**{f"tok{t}": s for s, t in enumerate([5, 0, 12, 3, 9, 7, 1])},
               **{f"own{s}": s for s in range(7, STUDENT_VOCAB)}}
    return kdfast.VocabMap.from_tokenizers(Vocabulary(student), Vocabulary(teacher))


def small_alignment() -> kdfast.TokenAlignment:
    """Two tokenizations of one text of 8 bytes, 4 tokens each, each side splitting one of the other's tokens."""
    return kdfast.align_tokenizations([1, 2, 3, 4], [[0, 1], [1, 3], [3, 4], [4, 8]], [5, 6, 7, 8],
                                      [[0, 3], [3, 4], [4, 6], [6, 8]])


def compiled_backends(cases: dict, gpu_backends: list) -> list:
    """(case, backend) pairs of the compile tests: every case on the C++ backend, where ULD and the hybrid go through
    the op; "mapped" also on torch and the GPU's backends (their ULD takes its gradient by autograd, which an op's
    kernel has not: a compiled step calls it as it is, tests/test_compile_steps.py)."""
    return ([(case, "cpu") for case in cases] +
            [(case, backend) for case in cases if cases[case]["method"] == "mapped"
             for backend in ["torch", *gpu_backends]])
