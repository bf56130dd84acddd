"""Prompts and padded batches for the integration tests (tiny models from desap_ops.cli.models)."""
import torch

from desap_ops.cli.models import BOS, IMAGE_TOKEN_ID as IMG

N = 16  # patch tokens per image of the tiny LLaVA (4 x 4)


def llava_prompt(before, images, after, per_image=N):
    """BOS, ``before``, ``images`` runs of ``per_image`` image placeholders, ``after``."""
    return [BOS] + before + [IMG] * (per_image * images) + after


def llava_pixels(seed=0, images=2):
    return torch.randn(images, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def pad(rows, left):
    """(input_ids, attention_mask) of token lists padded with 0 to the longest, on the left or right."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask
