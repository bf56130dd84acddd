"""Prompts for the tiny Qwen models (desap_ops.testing.tiny): images and videos, as the processors
lay them out. A medium is ("image", h, w) or ("video", t, h, w), in patches (2 x 2 patches make a
language-model token; a video's t counts temporal patches, its "frames")."""
import torch

from desap_ops.testing.tiny import BOS, QWEN_IMAGE as IMG, QWEN_VIDEO as VID

from ..prompts import pad

START, END = 153, 154
PATCH_WIDTH = 3 * 2 * 14 * 14
TIMESTAMP = 20   # Qwen3's frames each follow a timestamp (text): TIMESTAMP + frame number here


def tokens(medium) -> int:
    """Language-model tokens of a medium."""
    frames = medium[1] if medium[0] == "video" else 1
    return frames * medium[-2] * medium[-1] // 4


def placeholders(medium, timestamps: bool) -> list:
    """A medium's placeholder layout: Qwen3 (``timestamps``) gives each video frame its own
    timestamp and vision markers; Qwen2.5-VL one run per video."""
    if medium[0] == "image" or not timestamps:
        return [START] + [IMG if medium[0] == "image" else VID] * tokens(medium) + [END]
    _, t, h, w = medium
    return sum(([TIMESTAMP + f, START] + [VID] * (h * w // 4) + [END] for f in range(t)), [])


def prompt(media, timestamps=True, before=(5,), after=(7, 8, 9)) -> list:
    ids = [BOS, *before]
    for medium in media:
        ids += placeholders(medium, timestamps)
    return ids + list(after)


def pixels(media, seed: int) -> dict:
    """pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw of ``media``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for kind, pixel_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                      ("video", "pixel_values_videos", "video_grid_thw")):
        grids = [[1, *m[1:]] if kind == "image" else list(m[1:]) for m in media if m[0] == kind]
        if grids:
            out[pixel_key] = torch.cat([torch.randn(t * h * w, PATCH_WIDTH, generator=gen) for t, h, w in grids])
            out[grid_key] = torch.tensor(grids)
    return out


def token_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMG).int() + 2 * (ids == VID).int()


def inputs(media, seed=0, timestamps=True, **prompt_args) -> dict:
    """One row: the prompt of ``media`` and their pixels."""
    ids = torch.tensor([prompt(media, timestamps, **prompt_args)])
    return dict(input_ids=ids, mm_token_type_ids=token_types(ids), **pixels(media, seed))


def batch(rows, left=True) -> dict:
    """Rows of ``inputs`` padded into one batch (pixels concatenated in row order)."""
    ids, mask = pad([r["input_ids"][0].tolist() for r in rows], left=left)
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=token_types(ids))
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = torch.cat(parts)
    return out
