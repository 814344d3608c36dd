"""Tiny vision-language models (Liger-Kernel's mini-model configs) and batches with images laid out as each family's
processor lays them out: tests/test_trainer_vision_language.py and the sharded trainer cases."""

import torch
from liger_mini_models import mm_gemma3, mm_llava, mm_qwen2_5_vl, mm_qwen2_vl, mm_qwen3_vl

LENGTH = 12


def _text_ids(seed, rows):
    return torch.randint(10, 400, (rows, LENGTH), generator=torch.Generator().manual_seed(seed))


def qwen_batch(model, seed, rows=2):
    """Examples with one 2x2-patch image each (one token after the 2x2 merge), between the vision start and end
    tokens, as Qwen's processor lays them out."""
    vision = model.config.vision_config
    ids = _text_ids(seed, rows)
    ids[:, 1:4] = torch.tensor([1, 4, 2])
    patches = torch.randn(4 * rows, 3 * vision.temporal_patch_size * vision.patch_size ** 2,
                          generator=torch.Generator().manual_seed(seed + 1))
    return dict(input_ids=ids, pixel_values=patches, image_grid_thw=torch.tensor([[1, 2, 2]] * rows),
                mm_token_type_ids=(ids == 4).long())


def llava_batch(model, seed, rows=2):
    ids = _text_ids(seed, rows)
    ids[:, 1:5] = model.config.image_token_index  # a 28x28 image of 14x14 patches: 4 tokens
    return dict(input_ids=ids, pixel_values=torch.randn(rows, 3, 28, 28, generator=torch.Generator().manual_seed(seed)))


def gemma3_batch(model, seed, rows=2):
    ids = _text_ids(seed, rows)
    ids[:, 1], ids[:, 2:6], ids[:, 6] = 4, 5, 6  # begin, mm_tokens_per_image image tokens, end
    return dict(input_ids=ids, pixel_values=torch.randn(rows, 3, 28, 28, generator=torch.Generator().manual_seed(seed)),
                token_type_ids=(ids == 5).long())


FAMILIES = {"qwen2_vl": (mm_qwen2_vl, qwen_batch), "qwen2_5_vl": (mm_qwen2_5_vl, qwen_batch),
            "qwen3_vl": (mm_qwen3_vl, qwen_batch), "llava": (mm_llava, llava_batch),
            "gemma3": (mm_gemma3, gemma3_batch)}
IMAGE_TOKENS = (3, 4, 5)  # every family's image placeholders above: no label


def vision_models(family, count=1):
    """A student and `count` teachers of one family, each its own random weights."""
    build, make_batch = FAMILIES[family]
    models = []
    for seed in range(count + 1):
        torch.manual_seed(seed)
        models.append(build())
    return models, make_batch


def with_labels(batch):
    labels = batch["input_ids"].clone()
    labels[torch.isin(labels, torch.tensor(IMAGE_TOKENS))] = -100
    labels[0, -3:] = -100  # a padded tail
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"]), "labels": labels}


def model_logits(model, batch):
    keys = set(batch) - {"labels", "teacher_id"}
    return model(**{key: batch[key] for key in keys}).logits[:, :-1]
