"""DeSAP in vLLM's LLaVA-NeXT (``vllm.model_executor.models.llava_next``): one budget per image
(its request's ``keep``) over its base crop and AnyRes crops together, in the packed order, with
the image-newline tokens where the model puts them, counted toward ``keep`` (as ``apply_desap``
does). ``keep`` means at most (``sequence.image_budget``): an image with no more tokens passes
whole, and one whose newlines leave no room keeps its newlines and one visual token."""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next import LlavaNextMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..common.layout import crops_per_image, drops_cls, packed_budget, packed_grid, packed_sources, with_newlines
from ..common.pruning import tower_reads
from .hooks import registered_class
from .llava import check  # noqa: F401  (LLaVA-1.5's start-up check serves NeXT too: SUPPORTED names it here)
from .model import DesapModelMixin, registered_with
from .processor import DesapProcessorMixin


def layout(config, image_size) -> torch.Tensor:
    """(P,) the packed tokens of one image of ``image_size`` (``common.layout.packed_sources``)."""
    return packed_sources(config, [image_size])[0]


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
            return [token] * packed_budget(keep, layout(config, (height, width)))

        return [PromptReplacement(modality="image", target=[token], replacement=kept_placeholders)]


@registered_with(DesapLlavaNextProcessor, "LlavaNextForConditionalGeneration")
class DesapLlavaNextForConditionalGeneration(DesapModelMixin, registered_class("LlavaNextForConditionalGeneration")):
    """vLLM's LLaVA-NeXT with DeSAP in ``embed_multimodal``."""

    def desap_image_tokens(self, image_input) -> list[int]:
        return [layout(self.config, tuple(int(v) for v in size)).numel() for size in image_input["image_sizes"]]

    def desap_features(self, image_input, batch, texts, text_mask, options):
        config = self.config
        sizes = [tuple(int(v) for v in image_input["image_sizes"][i]) for i in batch]
        crops = crops_per_image(config, sizes)
        pixels = torch.cat([image_input["pixel_values"][i][:n] for i, n in zip(batch, crops)])
        signals = self.desap_signals(pixels, drops_cls(config), tower_reads(options))
        features = []
        for i, (image, size) in enumerate(zip(signals.split(crops), sizes)):
            sources = layout(config, size).to(signals.hidden.device)
            is_visual = sources >= 0
            visual = image.map(lambda t: t.flatten(0, 1)[sources[is_visual]][None])   # packed order, no newlines
            keep = packed_budget(options[i].keep, sources) - int((~is_visual).sum())
            result = self.desap_prune(visual, texts[i:i + 1], text_mask[i:i + 1], keep, options[i],
                                      packed_grid(config, sources))
            features.append(with_newlines(is_visual, result.indices[0], self.multi_modal_projector(result.tokens[0]),
                                          self.image_newline.to(visual.hidden.dtype)))
        return features
