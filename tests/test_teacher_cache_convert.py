"""Other tools' sparse teachers and kdfast's: each format made here from a tiny teacher cache (k=8, float32 log-probs)
converts back to that cache's rows (exactly, or within the format's stated precision), the peers' own losses
(ported from their code below) equal kdfast's sparse loss with the matching settings on the converted rows, the
collator and trainer read the peers' columns directly, and malformed input is a ValueError naming its column."""

import json
import math

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import kdfast
from kdfast.demo import models
from kdfast.demo.corpus import train_tokenizer
from kdfast.integrations.sparse_teacher import sparse_training_data
from kdfast.teacher_cache import (
    SparseTeacherCollator,
    axolotl_format,
    build_teacher_cache,
    distillkit_codec,
    peer_formats,
)
from kdfast.teacher_cache.convert import convert
from kdfast.teacher_cache.data import token_windows

TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(120))
K = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tokenizer = train_tokenizer([TEXT], 300)
    model = models.new_model(models.ModelSize(hidden=32, layers=1, heads=2), len(tokenizer) + 4, 16, seed=1)
    windows = token_windows(torch.tensor(tokenizer(TEXT)["input_ids"]), 17, max_windows=10)
    return build_teacher_cache(model.eval(), windows, tmp_path_factory.mktemp("cache"), tokenizer=tokenizer, k=K,
                               logprob_dtype="fp32", windows_per_shard=4, show_progress=False)


def items(cache):
    return [cache[index] for index in range(len(cache))]


def saved_rows(path):
    """A converted datasets folder (or .parquet / .jsonl file) read back as tensors."""
    if path.suffix == ".parquet":
        dataset = datasets.Dataset.from_parquet(str(path))
    elif path.suffix == ".jsonl":
        dataset = datasets.Dataset.from_json(str(path))
    else:
        dataset = datasets.load_from_disk(str(path))
    return [{name: torch.tensor(value) for name, value in row.items()} for row in dataset]


def assert_rows_equal(rows, expected):
    assert len(rows) == len(expected)
    for row, item in zip(rows, expected):
        assert torch.equal(row["input_ids"].long(), item["input_ids"])
        assert torch.equal(row["teacher_ids"].long(), item["teacher_ids"])
        assert torch.equal(row["teacher_logprobs"].float(), item["teacher_logprobs"])


def stacked(rows, name):
    return torch.stack([torch.as_tensor(row[name]) for row in rows])


def student_logits(cache, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(cache), cache.settings.window_tokens, cache.settings.vocab_size, generator=generator) * 2


# axolotl (src/axolotl/integrations/kd/kernels/liger.py, distillation_loss_fn with beta=0; trainer.py divides by the
# batch's label count): row t against the student's position t, T² times the sum over valid entries, per item.
def axolotl_loss(logits, target_token_ids, target_logprobs, target_mask, num_items, kd_temperature,
                 normalize_topk=False):
    scaled = logits.double() / kd_temperature
    student = scaled.gather(-1, target_token_ids) - scaled.logsumexp(-1, keepdim=True)
    if normalize_topk:  # utils.normalize_logprobs: the student's top-k renormalised over the K entries
        student = student - student.logsumexp(-1, keepdim=True)
    valid = target_mask.bool()
    teacher, student = target_logprobs.double()[valid], student[valid]
    return (teacher.exp() * (teacher - student)).sum() * kd_temperature**2 / num_items


# DistillKit (distillkit/lossfuncs/common.py get_logprobs / get_target_logprobs, lossfuncs/kl.py sparse_kl_div_inner
# and KLDLoss): row r against the student's position r, the teacher re-tempered from its generation temperature.
def distillkit_loss(logits, ids, values, mask, temperature, generation_temperature=1.0, missing="zero", eps=1e-8):
    student = logits.double() / temperature
    student = student.gather(-1, ids) - student.logsumexp(-1, keepdim=True)
    values, alpha = values.double(), generation_temperature / temperature
    if missing == "symmetric_uniform" and math.isclose(alpha, 1.0):
        teacher = values
    else:
        leftover = (1 - values.logsumexp(-1, keepdim=True).exp()).clamp(0, 1)
        alpha_lse = (alpha * values).logsumexp(-1, keepdim=True)
        total = (alpha_lse.exp() + leftover**alpha).log() if missing == "symmetric_uniform" else alpha_lse
        teacher = alpha * values - total
    inner = (teacher.exp() * (teacher - student)).sum(-1) * mask
    if missing == "symmetric_uniform":
        teacher_missing = torch.log1p(-teacher.exp().sum(-1).clamp(eps, 1 - eps))
        student_missing = torch.log1p(-student.exp().sum(-1).clamp(eps, 1 - eps))
        inner = inner + teacher_missing.exp() * (teacher_missing - student_missing) * mask
    return inner.sum() * temperature**2 / mask.sum()


@pytest.mark.parametrize("suffix", ["", ".parquet", ".jsonl"])
def test_cache_to_axolotl_and_back_is_identical(cache, tmp_path, suffix):
    axolotl = tmp_path / f"axolotl{suffix}"
    stats = convert(cache.folder, "kdfast", axolotl, "axolotl", normalize=False)
    assert stats["examples"] == len(cache) and stats["k"] == K and stats["rows_dropped"] == 0
    first, item = saved_rows(axolotl)[0], cache[0]
    assert torch.equal(first["target_token_ids"][:-1].long(), item["teacher_ids"][1:]), "row t: token t + 1"
    assert first["target_mask"][-1].eq(0).all() and first["target_mask"][:-1].eq(1).all()
    assert first["target_logprobs"][-1].eq(axolotl_format.PAD_LOGPROB).all()
    back = tmp_path / "kdfast"
    stats = convert(axolotl, "axolotl", back)
    assert stats["rows_dropped"] == 0 and stats["rows_with_targets"] == len(cache) * (item["input_ids"].numel() - 1)
    assert_rows_equal(saved_rows(back), items(cache))


def test_axolotl_rows_are_renormalised_and_retempered_as_its_loss_expects(cache, tmp_path):
    """Written for kd_temperature 2 from a cache at T = 1: each row is p^(1/2) renormalised over the top-k, as
    axolotl's strategy re-tempers; read back, the ids are the cache's and the log-probs that row, exactly."""
    convert(cache.folder, "kdfast", tmp_path / "axolotl", "axolotl", kd_temperature=2.0)
    convert(tmp_path / "axolotl", "axolotl", tmp_path / "back")
    for row, item in zip(saved_rows(tmp_path / "back"), items(cache)):
        assert torch.equal(row["teacher_ids"].long(), item["teacher_ids"])
        expected = torch.log_softmax(item["teacher_logprobs"][1:].double() / 2.0, -1).float()
        torch.testing.assert_close(row["teacher_logprobs"][1:], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
def test_axolotls_loss_on_converted_rows_is_kdfasts_renormalize_tail(cache, kd_temperature):
    """axolotl's top-k forward KL (kd_normalize_topk off) on the rows written for it equals kdfast's tail="renormalize"
    on the cache, re-tempered from the cache's temperature (teacher_temperature), T²-scaled, over the same count; a
    prompt's labels (-100) mask the rows that predict its tokens on both sides.
    With kd_normalize_topk on, axolotl also renormalises the student over the K ids: its loss is then lower than
    kdfast's by T² · mean -log(the student's probability of the K ids), a term kdfast has no setting to drop."""
    cached, logits = items(cache), student_logits(cache)
    labels = stacked(cached, "input_ids").clone()
    labels[:, :5] = -100
    scale = cache.settings.temperature / kd_temperature
    rows = [axolotl_format.write_example(item["input_ids"], item["teacher_ids"], item["teacher_logprobs"], row_labels,
                                         scale=scale) for item, row_labels in zip(cached, labels)]
    assert rows[0]["target_mask"][:4].eq(0).all() and rows[0]["target_mask"][4:-1].eq(1).all()
    num_items = int((labels[:, 1:] != -100).sum())  # kdfast's count: the shifted labels
    ids = stacked(rows, "target_token_ids")
    expected = axolotl_loss(logits, ids, stacked(rows, "target_logprobs"), stacked(rows, "target_mask"), num_items,
                            kd_temperature)
    teacher_ids, teacher_logprobs = stacked(cached, "teacher_ids")[:, 1:], stacked(cached, "teacher_logprobs")[:, 1:]
    loss = kdfast.sparse_distill_loss(logits[:, :-1], teacher_ids, teacher_logprobs, labels[:, 1:],
                                      tail="renormalize", temperature=kd_temperature,
                                      teacher_temperature=cache.settings.temperature, num_items_in_batch=num_items)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    normalized = axolotl_loss(logits, ids, stacked(rows, "target_logprobs"), stacked(rows, "target_mask"),
                              num_items, kd_temperature, normalize_topk=True)
    scaled = logits[:, :-1].double() / kd_temperature
    top_mass = (scaled.gather(-1, teacher_ids) - scaled.logsumexp(-1, keepdim=True)).logsumexp(-1)
    kept = labels[:, 1:] != -100
    torch.testing.assert_close(normalized - expected, top_mass[kept].sum() * kd_temperature**2 / num_items)


def test_axolotl_rows_made_for_its_first_trainer_read_with_rows_same(cache):
    """rows="same": axolotl row t is the distribution of token t (its dataset strategy's placement, for the trainer
    that shifted targets); read as "next", every row lands one token late and the last has no place."""
    item = cache[0]
    same = axolotl_format.write_example(item["input_ids"], item["teacher_ids"], item["teacher_logprobs"], rows="same",
                                        normalize=False)
    assert torch.equal(same["target_token_ids"][1:], item["teacher_ids"][1:]) and same["target_mask"][0].eq(0).all()
    rows, dropped = axolotl_format.read_example(same, rows="same")
    assert dropped == 0 and torch.equal(rows["teacher_ids"], item["teacher_ids"])
    assert torch.equal(rows["teacher_logprobs"], item["teacher_logprobs"])
    assert axolotl_format.read_example(same, rows="next")[1] == 1


def test_axolotl_raw_logprob_lists_read_at_their_tokens(cache, tmp_path):
    """axolotl's raw dataset field: per position [{"token": "token_id:N", "logprob": x}], right-aligned with the
    tokens; k is their most common width (one row listing two more entries is cut to it)."""
    records = []
    for item in items(cache):
        lists = [[{"token": f"token_id:{int(i)}", "logprob": float(v)} for i, v in zip(ids, values)]
                 for ids, values in zip(item["teacher_ids"][1:], item["teacher_logprobs"][1:])]
        lists[3] = lists[3] + [{"token": "token_id:1", "logprob": -20.0}] * 2
        records.append({"input_ids": item["input_ids"].tolist(), "logprobs": lists})
    (tmp_path / "raw.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    stats = convert(tmp_path / "raw.jsonl", "axolotl", tmp_path / "kdfast")
    assert stats["k"] == K
    assert_rows_equal(saved_rows(tmp_path / "kdfast"), items(cache))
    with pytest.raises(ValueError, match="logprobs\\[0\\]\\[0\\]: token 'abc' is not 'token_id:<id>'"):
        axolotl_format.read_legacy_example({"input_ids": [1, 2], "logprobs": [[{"token": "abc", "logprob": 0}]]}, 1)


def distillkit_records(cache, packed=False):
    """DistillKit's rows: r + 1 tokens and r rows (row r: token r + 1), as its capture writes them; `packed`: input_ids
    cut to the rows' count and two sequences per record, numbered in attention_mask, as its packing leaves them."""
    records = [{"input_ids": item["input_ids"].tolist(), "token_ids": item["teacher_ids"][1:].tolist(),
                "top_values": item["teacher_logprobs"][1:].tolist()} for item in items(cache)]
    if not packed:
        return records
    for record in records:
        record["input_ids"] = record["input_ids"][:-1]
    return [{name: a[name] + b[name] for name in a} | {"attention_mask": [1] * len(a["input_ids"]) +
                                                       [2] * len(b["input_ids"])}
            for a, b in zip(records[::2], records[1::2])]


def test_distillkit_raw_rows_convert_exactly(cache, tmp_path):
    pq.write_table(pa.Table.from_pylist(distillkit_records(cache)), tmp_path / "raw.parquet")
    stats = convert(tmp_path / "raw.parquet", "distillkit", tmp_path / "kdfast", vocab_size=cache.settings.vocab_size)
    assert stats["rows_dropped"] == 0 and stats["teacher_temperature"] == 1.0
    assert_rows_equal(saved_rows(tmp_path / "kdfast"), items(cache))


def test_distillkit_packed_rows_lose_the_rows_past_each_sequence(cache, tmp_path):
    """Packed, each sequence's last row predicts a token that packing cut: one row dropped per sequence, and the
    second sequence's first token (given the first's last row by the packing) left without one."""
    pq.write_table(pa.Table.from_pylist(distillkit_records(cache, packed=True)), tmp_path / "packed.parquet")
    stats = convert(tmp_path / "packed.parquet", "distillkit", tmp_path / "kdfast")
    assert stats["rows_dropped"] == len(cache)
    length = cache.settings.window_tokens - 1
    for row, a, b in zip(saved_rows(tmp_path / "kdfast"), items(cache)[::2], items(cache)[1::2]):
        assert torch.equal(row["teacher_ids"][:length].long(), a["teacher_ids"][:length])
        assert torch.equal(row["teacher_ids"][length:].long(), b["teacher_ids"][:length])


@pytest.mark.parametrize("missing,tail,temperature", [("zero", "renormalize", 2.0), ("zero", "renormalize", 1.0),
                                                      ("symmetric_uniform", "bucket", 1.0)])
def test_distillkits_loss_on_its_rows_is_kdfasts(cache, missing, tail, temperature):
    """DistillKit's sparse KL with missing-probability handling "zero" renormalises the top-k (re-tempered from its
    generation temperature 1): kdfast's tail="renormalize" with teacher_temperature=1. "symmetric_uniform" adds the
    rest as one more bucket on both sides: kdfast's tail="bucket" (at the generation temperature only: DistillKit
    also re-tempers that bucket, which kdfast does not)."""
    records = distillkit_records(cache)
    logits = student_logits(cache, seed=1)
    mask = torch.ones(logits.shape[0], logits.shape[1] - 1)  # labels >= 0 everywhere
    expected = distillkit_loss(logits[:, :-1], stacked(records, "token_ids"), stacked(records, "top_values"), mask,
                               temperature, missing=missing)
    rows = [peer_formats.distillkit_example(record)[0] for record in records]
    loss = kdfast.sparse_distill_loss(logits[:, :-1], stacked(rows, "teacher_ids")[:, 1:],
                                      stacked(rows, "teacher_logprobs")[:, 1:], tail=tail, temperature=temperature,
                                      teacher_temperature=1.0 if tail == "renormalize" else None)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# Bytes written by DistillKit's own LogprobCompressor (distillkit/compression) for two rows of ids and log-probs,
# and what its decoder returns for them: bfloat16 exact values, a polynomial and 4-bit residuals, delta-encoded; and
# float32 exact values, float16 terms, 1- and 7-bit residual bins with error diffusion and normalize_t.
GOLDEN = {
    "recommended": (dict(d=300, k=8, exact_k=2, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, "sqrt"],
                         residual_bins=[dict(scale_dtype="float16", element_bits=4, num_elements=6)],
                         delta_encoding=True, error_diffusion=False),
                    ["9abeb3bf8c1200bfc2b0c93f1bbe73beeeebc7bf3c2e87c0e6",
                     "80bf4dbe0f483dbf61b0063f71c76dbebf28393e3f3186ad0b"],
                    ["028465600151900efa", "018040404040404040"],
                    [[-0.3007812, -1.703125, -2.203125, -3.015625, -3.140625, -4.53125, -5.09375, -7.34375],
                     [-1.0, -1.203125, -1.9375, -2.53125, -2.5625, -2.6875, -5.96875, -9.0]]),
    "diffused": (dict(d=1000, k=8, exact_k=3, exact_dtype="float32", polynomial_terms=[0, "exp"], term_dtype="float16",
                      residual_bins=[dict(scale_dtype="bfloat16", element_bits=1, num_elements=2),
                                     dict(scale_dtype="float32", element_bits=7, num_elements=3)],
                      delta_encoding=True, error_diffusion=True, normalize_t=True),
                 ["9a9999be3433b3bffeffffbe4737afba053f000040503c37fcf0",
                  "000080bfd0cc4cbe323333bfd23fb3bf213f006626973cf80278"],
                 ["014114ac000a86401cfa", "00c01008040201008040"],
                 [[-0.3, -1.7, -2.2, -3.1001465, -4.2378416, -5.6300077, -6.1427183, -8.391284],
                  [-1.0, -1.2, -1.9, -2.4986329, -3.6451173, -3.7568116, -7.0568113, -10.0593443]]),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_distillkit_compressed_rows_decode_as_distillkit_decodes_them(name):
    settings, logprob_bytes, index_bytes, expected = GOLDEN[name]
    config = distillkit_codec.CompressionConfig.from_mapping({"logprob_compressor": settings})
    example = {"input_ids": [9, 5, 3], "compressed_logprobs": [list(bytes.fromhex(row)) for row in logprob_bytes],
               "bytepacked_indices": [list(bytes.fromhex(row)) for row in index_bytes]}
    rows, _ = peer_formats.distillkit_example(example, config=config)
    assert rows["teacher_ids"][1:].tolist() == [[5, 17, 299, 0, 42, 100, 7, 250], [3, 1, 2, 4, 8, 16, 32, 64]]
    torch.testing.assert_close(rows["teacher_logprobs"][1:], torch.tensor(expected), rtol=0, atol=1e-6)


def distillkit_compressed(ids: torch.Tensor, logprobs: torch.Tensor, index_bits: int):
    """DistillKit's layout for 2 exact float32 values and one bin of 8-bit residuals (float32 scale), no polynomial,
    no delta encoding: bytes per row for the log-probs and for the ids."""
    def packed(values, bits):
        stream = (values.numpy()[..., None] >> np.arange(bits - 1, -1, -1)) & 1
        return np.packbits(stream.reshape(values.shape[0], -1).astype(np.uint8), axis=-1)

    residual = logprobs[:, 2:].double()
    scale = (residual.abs().amax(-1, keepdim=True) / 128).float()
    levels = (residual / scale.double()).round().clamp(-128, 127).long() + 128
    data = np.concatenate([logprobs[:, :2].numpy().astype("<f4").view(np.uint8),
                           scale.numpy().astype("<f4").view(np.uint8), packed(levels, 8)], 1)
    return data.tolist(), packed(ids, index_bits).tolist()


def test_distillkit_compressed_rows_convert_within_their_precision(cache, tmp_path):
    """The two exact values per row come back as stored; each 8-bit residual within half a quantisation step (its
    row's largest residual / 256). The config is found beside the parquet files, as DistillKit's capture writes it."""
    vocab = cache.settings.vocab_size
    config = dict(d=vocab, k=K, exact_k=2, exact_dtype="float32", polynomial_terms=None,
                  residual_bins=[dict(scale_dtype="float32", element_bits=8, num_elements=K - 2)],
                  delta_encoding=False, error_diffusion=False)
    folder = tmp_path / "capture"
    folder.mkdir()
    (folder / distillkit_codec.CONFIG_FILE).write_text(yaml.safe_dump(config))
    bits = distillkit_codec.CompressionConfig.from_mapping(config).index_bits
    records = []
    for item in items(cache):
        data, indices = distillkit_compressed(item["teacher_ids"][1:], item["teacher_logprobs"][1:], bits)
        records.append({"input_ids": item["input_ids"].tolist(), "compressed_logprobs": data,
                        "bytepacked_indices": indices})
    schema = pa.schema([("input_ids", pa.list_(pa.uint64())), ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), folder / "data_0.parquet")
    convert(folder, "distillkit", tmp_path / "kdfast", vocab_size=vocab)
    for row, item in zip(saved_rows(tmp_path / "kdfast"), items(cache)):
        assert torch.equal(row["teacher_ids"].long(), item["teacher_ids"])
        assert torch.equal(row["teacher_logprobs"][:, :2], item["teacher_logprobs"][:, :2])
        residual = item["teacher_logprobs"][1:, 2:]
        step = residual.abs().amax(-1, keepdim=True) / 128
        assert bool(((row["teacher_logprobs"][1:, 2:] - residual).abs() <= step / 2 * (1 + 1e-5)).all())


def vllm_choice(item, k=K):
    """A vLLM /v1/completions choice for the item's tokens: prompt_logprobs[j] lists the prompt token first (its own
    rank, k + 3 here, when outside the top k), then the top k with ranks 1..k."""
    entries = [None]
    for token, ids, values in zip(item["input_ids"][1:].tolist(), item["teacher_ids"][1:].tolist(),
                                  item["teacher_logprobs"][1:].tolist()):
        top = {str(i): {"logprob": v, "rank": rank, "decoded_token": f"t{i}"}
               for rank, (i, v) in enumerate(zip(ids, values), start=1)}
        own = top.get(str(token), {"logprob": values[-1] - 1.0, "rank": k + 3, "decoded_token": f"t{token}"})
        entries.append({str(token): own, **top})
    return {"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries}


def test_vllm_jsonl_in_each_accepted_layout_converts_exactly(cache, tmp_path):
    cached = items(cache)
    lines = [{"id": "cmpl-0", "object": "text_completion", "model": "teacher",
              "choices": [{**vllm_choice(cached[0]), "prompt_token_ids": cached[0]["input_ids"].tolist()}]},
             {"prompt_token_ids": cached[1]["input_ids"].tolist(), "choices": [vllm_choice(cached[1])]},
             {"prompt": cached[2]["input_ids"].tolist(), "response": {"choices": [vllm_choice(cached[2])]}},
             {"prompt": [item["input_ids"].tolist() for item in cached[3:]],
              "response": {"choices": [vllm_choice(item) for item in cached[3:]]}}]
    (tmp_path / "responses.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    stats = convert(tmp_path / "responses.jsonl", "vllm-jsonl", tmp_path / "kdfast")
    assert stats["k"] == K and stats["examples"] == len(cache)
    assert_rows_equal(saved_rows(tmp_path / "kdfast"), cached)
    convert(tmp_path / "responses.jsonl", "vllm-jsonl", tmp_path / "top4", top_k=4)
    assert saved_rows(tmp_path / "top4")[0]["teacher_ids"].shape == (cache.settings.window_tokens, 4)
    wrong = {"prompt": cached[1]["input_ids"].tolist(), "response": {"choices": [vllm_choice(cached[0])]}}
    (tmp_path / "wrong.jsonl").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="does not list the prompt token"):
        convert(tmp_path / "wrong.jsonl", "vllm-jsonl", tmp_path / "wrong", top_k=K)


def peer_examples(cache, tmp_path):
    convert(cache.folder, "kdfast", tmp_path / "axolotl", "axolotl", normalize=False)
    return {"axolotl": datasets.load_from_disk(str(tmp_path / "axolotl")), "distillkit-raw": distillkit_records(cache)}


@pytest.mark.parametrize("peer", ["axolotl", "distillkit-raw"])
def test_collator_and_trainer_read_a_peers_columns(cache, tmp_path, peer):
    dataset = peer_examples(cache, tmp_path)[peer]
    expected = SparseTeacherCollator()(items(cache))
    batch = SparseTeacherCollator()([dataset[index] for index in range(len(cache))])
    for name in ("input_ids", "labels", "teacher_ids", "teacher_logprobs"):
        assert torch.equal(batch[name], expected[name]), name
    train, _ = sparse_training_data(None, dataset, None)
    assert torch.equal(torch.as_tensor(train[3]["teacher_ids"]), expected["teacher_ids"][3])


def test_trainer_dataloader_keeps_a_peers_columns(cache, tmp_path):
    """A datasets.Dataset of axolotl's columns through DistillationTrainer: the Trainer's column filter would drop
    them; read per item as kdfast's, the batches are the cache's."""
    from tiny_models import student_and_teacher, training_args

    from kdfast.integrations.transformers import DistillationTrainer

    student, _ = student_and_teacher()
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), tail="renormalize",
                                  train_dataset=peer_examples(cache, tmp_path)["axolotl"])
    batch = next(iter(trainer.get_train_dataloader()))
    by_tokens = {tuple(item["input_ids"].tolist()): item for item in items(cache)}
    assert batch["teacher_ids"].shape[0] == 4
    for tokens, teacher_ids in zip(batch["input_ids"], batch["teacher_ids"]):
        assert torch.equal(teacher_ids.cpu(), by_tokens[tuple(tokens.tolist())]["teacher_ids"])


def test_bad_input_names_its_column(cache, tmp_path):
    item = cache[0]
    axolotl = axolotl_format.write_example(item["input_ids"], item["teacher_ids"], item["teacher_logprobs"])
    cases = [({k: v for k, v in axolotl.items() if k != "target_mask"}, {}, "missing column target_mask"),
             ({**axolotl, "target_logprobs": axolotl["target_logprobs"][:, :5]}, {},
              r"target_logprobs has shape \(17, 5\) but target_token_ids \(17, 8\)"),
             ({**axolotl, "target_token_ids": axolotl["target_token_ids"] + 1000}, {"vocab_size": 500},
              "target_token_ids holds id .* past vocab_size 500")]
    for example, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            axolotl_format.read_example(example, **settings)
    record = distillkit_records(cache)[0]
    with pytest.raises(ValueError, match=r"top_values has shape \(16, 7\) but token_ids \(16, 8\)"):
        peer_formats.distillkit_example({**record, "top_values": [row[:7] for row in record["top_values"]]})
    with pytest.raises(ValueError, match="missing column token_ids"):
        peer_formats.distillkit_example({"input_ids": [1, 2], "top_values": [[0.0]]})
    with pytest.raises(ValueError, match="teacher_ids holds id 900, past vocab_size"):
        peer_formats.kdfast_example({**item, "teacher_ids": item["teacher_ids"].clamp(min=900)}, vocab_size=500)
    config = distillkit_codec.CompressionConfig.from_mapping(GOLDEN["recommended"][0])
    with pytest.raises(ValueError, match="compressed_logprobs holds 24 bytes per row but the compression config"):
        distillkit_codec.decode_logprobs([[0] * 24], config)
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2], "token_ids": [[1]]}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet record 0: missing column top_values"):
        convert(tmp_path / "bad.parquet", "distillkit", tmp_path / "out")
    with pytest.raises(ValueError, match="missing column target_token_ids, target_logprobs, target_mask"):
        convert(tmp_path / "bad.parquet", "axolotl", tmp_path / "out")
    with pytest.raises(ValueError, match="lacks \\['target_mask'\\]"):
        sparse_training_data(None, [{k: v for k, v in axolotl.items() if k != "target_mask"}], None)


def test_the_command_converts_and_names_bad_input(cache, tmp_path, capsys):
    from kdfast.cli import main

    axolotl = tmp_path / "axolotl.parquet"
    assert main(["teacher-cache", "convert", str(cache.folder), "--from", "kdfast", "--to", "axolotl", "--out",
                 str(axolotl), "--raw-logprobs"]) == 0
    assert main(["teacher-cache", "convert", str(axolotl), "--from", "axolotl", "--out", str(tmp_path / "back")]) == 0
    assert f"{len(cache)} examples" in capsys.readouterr().out
    assert_rows_equal(saved_rows(tmp_path / "back"), items(cache))
    with pytest.raises(SystemExit, match="convert: error: .*target_token_ids"):
        main(["teacher-cache", "convert", str(tmp_path / "back"), "--from", "axolotl", "--out", str(tmp_path / "x")])
