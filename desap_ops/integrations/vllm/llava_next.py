"""DeSAP in vLLM's LLaVA-NeXT (``vllm.model_executor.models.llava_next``): one budget per image
(its request's ``keep``) over its base crop and AnyRes crops together, in the packed order, with
the image-newline tokens where the model puts them, counted toward ``keep`` (as ``apply_desap``
does). ``keep`` means at most (``sequence.image_budget``): an image with no more tokens passes
whole, and one whose newlines leave no room keeps its newlines and one visual token."""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next import LlavaNextMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..anyres import packed_sources
from ..clip_tower import drops_cls, tokens_per_crop
from ..sequence import image_budget
from .hooks import registered_class
from .llava import check  # noqa: F401  (LLaVA-1.5's start-up check serves NeXT too: SUPPORTED names it here)
from .model import DesapModelMixin, registered_with
from .processor import DesapProcessorMixin


def crops_of(config, image_size) -> int:
    """How many crops (base included) AnyRes cuts an image of ``image_size`` (height, width) into."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(image_size=[int(s) for s in image_size],
                                         grid_pinpoints=config.image_grid_pinpoints,
                                         patch_size=config.vision_config.image_size))


def layout(config, image_size) -> torch.Tensor:
    """(P,) the packed tokens of one image: crop-token positions, -1 for image-newline tokens."""
    return packed_sources(config, [crops_of(config, image_size)], [image_size], tokens_per_crop(config))[0]


def budget_of(keep: int, packed: torch.Tensor) -> int:
    """An image's tokens under ``keep`` from its :func:`layout`, newlines counted."""
    return image_budget(keep, packed.numel(), int((packed < 0).sum()))


class DesapLlavaNextProcessor(DesapProcessorMixin, LlavaNextMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self.desap is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        token, config = self.desap_image_token(), self.info.get_hf_config()

        def kept_placeholders(i: int) -> list[int]:
            # vLLM resolves this only for images processed now, whose fields are in out_mm_kwargs;
            # a cached image brings its resolved count from the cache, and mm_items may then be empty
            fields = out_mm_kwargs["image"][i]
            if "image_sizes" not in fields:
                raise ValueError("DeSAP prunes from pixels; this request gave image embeddings")
            height, width = (int(v) for v in fields["image_sizes"].data)
            keep = self.desap_item(out_mm_kwargs, "image", i).keep
            return [token] * budget_of(keep, layout(config, (height, width)))

        return [PromptReplacement(modality="image", target=[token], replacement=kept_placeholders)]


@registered_with(DesapLlavaNextProcessor, "LlavaNextForConditionalGeneration")
class DesapLlavaNextForConditionalGeneration(DesapModelMixin, registered_class("LlavaNextForConditionalGeneration")):
    """vLLM's LLaVA-NeXT with DeSAP in ``embed_multimodal``."""

    def desap_image_tokens(self, image_input) -> list[int]:
        return [layout(self.config, tuple(int(v) for v in size)).numel() for size in image_input["image_sizes"]]

    def desap_features(self, image_input, batch, texts, text_mask, options):
        config = self.config
        sizes = [tuple(int(v) for v in image_input["image_sizes"][i]) for i in batch]
        crops = [crops_of(config, size) for size in sizes]
        pixels = torch.cat([image_input["pixel_values"][i][:n] for i, n in zip(batch, crops)])
        signals = self.desap_signals(pixels, drops_cls(config))
        parts = zip(*(torch.split(t, crops) for t in signals))
        features = []
        for i, ((hidden, branch, saliency), size) in enumerate(zip(parts, sizes)):
            sources = layout(config, size).to(hidden.device)
            budget = budget_of(options[i].keep, sources)
            is_visual = sources >= 0
            picked = sources[is_visual]
            h, b = hidden.flatten(0, 1)[picked], branch.flatten(0, 1)[picked]
            s = saliency.flatten()[picked]
            result = self.desap_prune(type(signals)(h[None], b[None], s[None]), texts[i:i + 1], text_mask[i:i + 1],
                                      budget - int((~is_visual).sum()), options[i])
            slots = torch.zeros_like(is_visual)
            slots[is_visual.nonzero()[:, 0][result.indices[0]]] = True
            slots |= ~is_visual
            out = self.image_newline.to(h.dtype).expand(budget, -1).clone()
            out[is_visual[slots]] = self.multi_modal_projector(result.tokens[0]).to(out.dtype)
            features.append(out)
        return features
