"""DeSAP in vLLM's LLaVA-1.5 (``vllm.model_executor.models.llava``): every image becomes at most
its request's ``keep`` tokens (``sequence.image_budget``; with fewer it passes whole), chosen and
merged inside ``embed_multimodal`` from vLLM's own CLIP tower."""
from __future__ import annotations

from vllm.model_executor.models.llava import LlavaMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..common.layout import crop_grid, drops_cls, tokens_per_crop
from ..common.pruning import tower_reads
from ..common.sequence import image_budget
from .hooks import registered_class
from .model import DesapModelMixin, equal_runs, registered_with
from .options import DesapOptions
from .processor import DesapProcessorMixin


def check(hf_config, options: DesapOptions) -> None:
    """Refuse at start-up what cannot run: another tower than CLIP, several feature layers. (A
    ``keep`` above an image's tokens is no error: the image passes whole.)"""
    if type(hf_config.vision_config).__name__ != "CLIPVisionConfig":
        raise ValueError(f"DeSAP in vLLM reads a CLIP vision tower; this LLaVA has {type(hf_config.vision_config).__name__}")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(f"DeSAP needs a single vision_feature_layer, the model uses {hf_config.vision_feature_layer}")


class DesapLlavaProcessor(DesapProcessorMixin, LlavaMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self.desap is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        token, tokens = self.desap_image_token(), tokens_per_crop(self.info.get_hf_config())

        def kept_placeholders(i: int) -> list[int]:
            return [token] * image_budget(self.desap_item(out_mm_kwargs, "image", i).keep, tokens)

        return [PromptReplacement(modality="image", target=[token], replacement=kept_placeholders)]


@registered_with(DesapLlavaProcessor, "LlavaForConditionalGeneration")
class DesapLlavaForConditionalGeneration(DesapModelMixin, registered_class("LlavaForConditionalGeneration")):
    """vLLM's LLaVA-1.5 with DeSAP in ``embed_multimodal``."""

    def desap_image_tokens(self, image_input) -> list[int]:
        return [tokens_per_crop(self.config)] * len(image_input["pixel_values"])

    def desap_features(self, image_input, batch, texts, text_mask, options):
        signals = self.desap_signals(image_input["pixel_values"][batch.start:batch.stop], drops_cls(self.config),
                                     tower_reads(options))
        features = []
        for run in equal_runs(options):   # one operator call per run of images sharing their options
            part = signals.map(lambda t: t[run.start:run.stop])
            keep = image_budget(options[run.start].keep, signals.hidden.shape[1])
            result = self.desap_prune(part, texts[run.start:run.stop], text_mask[run.start:run.stop], keep,
                                      options[run.start], crop_grid(self.config))
            features += list(self.multi_modal_projector(result.tokens))
        return features
