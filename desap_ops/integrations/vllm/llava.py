"""DeSAP in vLLM's LLaVA-1.5 (``vllm.model_executor.models.llava``): every image becomes ``keep``
tokens, chosen and merged inside ``embed_multimodal`` from vLLM's own CLIP tower."""
from __future__ import annotations

from vllm.model_executor.models.llava import LlavaForConditionalGeneration, LlavaMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..clip_tower import drops_cls, tokens_per_crop
from .model import DesapModelMixin, registered_with
from .options import DesapOptions
from .processor import DesapProcessorMixin


def check(hf_config, options: DesapOptions) -> None:
    """Refuse at start-up what cannot run: a ``keep`` above an image's tokens."""
    from ...validation import check_keep

    if type(hf_config.vision_config).__name__ != "CLIPVisionConfig":
        raise ValueError(f"DeSAP in vLLM reads a CLIP vision tower; this LLaVA has {type(hf_config.vision_config).__name__}")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(f"DeSAP needs a single vision_feature_layer, the model uses {hf_config.vision_feature_layer}")
    check_keep(options.keep, tokens_per_crop(hf_config))


class DesapLlavaProcessor(DesapProcessorMixin, LlavaMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self.desap is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        tokens = [self.desap_image_token()] * self.desap.keep
        return [PromptReplacement(modality="image", target=[self.desap_image_token()], replacement=tokens)]


@registered_with(DesapLlavaProcessor, LlavaForConditionalGeneration)
class DesapLlavaForConditionalGeneration(DesapModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with DeSAP in ``embed_multimodal``."""

    def desap_features(self, image_input, texts, text_mask):
        signals = self.desap_signals(image_input["pixel_values"], drops_cls(self.config))
        result = self.desap_prune(signals, texts, text_mask, self.desap.keep)
        return list(self.multi_modal_projector(result.tokens))
