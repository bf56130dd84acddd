"""What DeSAP changes in a vLLM multimodal processor (a mixin over the model's own processor).

- Each image gets ``keep`` placeholder tokens instead of its full count (``placeholder_count``),
  so the scheduler, the KV cache and the positions all see the pruned prompt.
- Each image's prompt text (``prompt_texts``: the rule ``apply_desap`` reads it with) travels
  with the image as the field ``desap_text_ids`` to the model's ``embed_multimodal``; a
  model that prunes videos too (``desap_media_tokens``) sends each video's as ``desap_video_text_ids``.
- A request's own options (``mm_processor_kwargs={"desap": {...}}``, ``options.request_options``)
  are checked in ``apply`` (a bad one is a ValueError, a 400 from the server) and travel with each
  image as the field ``desap_options`` (videos: ``desap_video_options``); the placeholder count
  (``desap_item``) and the model's pruning both read them there.
- Each image's cache identity (``_get_mm_hashes``) folds in that text and the request's DeSAP
  options, so one image under two prompts or two budgets is two encoder-cache and prefix-cache
  entries, never one.

The text rides through vLLM's processing in ``hf_processor_mm_kwargs`` under ``TEXT_KEY`` (and
``VIDEO_TEXT_KEY``), next to the request's ``REQUEST_KEY``; all are taken out again before anything
reaches the Hugging Face processor.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from typing import Optional

import torch

from ..common.chat import ChatMarkers, user_turns
from ..common.prompt import config_ignored_ids
from ..common.sequence import image_text_tokens
from .options import DesapOptions, decode_request, encode_request, read_options, request_options

TEXT_KEY = "desap_text_ids"   # the per-image text: a processor kwarg on the way in, a field on the way out
VIDEO_TEXT_KEY = "desap_video_text_ids"   # the same per video
TEXT_KEYS = {"image": TEXT_KEY, "video": VIDEO_TEXT_KEY}
REQUEST_KEY = "desap"   # a request's options in its mm_processor_kwargs
OPTIONS_KEYS = {"image": "desap_options", "video": "desap_video_options"}   # per-item fields: encode_request


def _without_desap(kwargs: Mapping[str, object]) -> dict:
    """``kwargs`` as the model's own processor and the Hugging Face processor may see them."""
    return {k: v for k, v in kwargs.items() if k not in TEXT_KEYS.values() and k != REQUEST_KEY}


def placeholder_runs(prompt: list[int], token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``prompt``, in order."""
    runs, previous = [], None
    for token in prompt:
        if token == token_id:
            if previous == token_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


def prompt_texts(prompt: list[int], token_id: int, items: int, ignored: set[int],
                 chat: Optional[ChatMarkers], modality: str = "image") -> tuple[tuple[int, ...], ...]:
    """Per image (or video: ``modality``), the ids of the prompt text it reads, by the rule
    ``apply_desap`` reads it with (``sequence.image_text_tokens``): under ``chat``, the user's words
    of its own turn, before and after it; without, the text after it, or before it where nothing
    follows; never ``ignored`` ids."""
    if items == 0:
        return ()
    runs = placeholder_runs(prompt, token_id)
    count = sum(runs)
    lengths = [1] * items if count == items else runs
    if len(lengths) != items:
        raise ValueError(f"DeSAP found {count} {modality} placeholder tokens in {len(runs)} runs for {items} "
                         f"{modality}s: give each {modality} one placeholder in the prompt")
    ids = torch.tensor([prompt], dtype=torch.long)
    turns = None if chat is None else user_turns(ids, chat)
    text, mask = image_text_tokens(ids, None, token_id, lengths, ignored, turns)
    return tuple(tuple(int(t) for t in row[m]) for row, m in zip(text, mask))


class DesapProcessorMixin:
    """Put before the model's own multimodal processor class in the bases. Without ``desap`` in
    the config every method is the processor's own."""

    @property
    def desap(self) -> Optional[DesapOptions]:
        """The engine's options: every request's defaults and limits."""
        return read_options(self.info.get_hf_config())

    def desap_request(self, hf_processor_mm_kwargs: Mapping[str, object]) -> DesapOptions:
        """One request's options: its ``mm_processor_kwargs["desap"]`` over the engine's (checked)."""
        return request_options(self.desap, hf_processor_mm_kwargs.get(REQUEST_KEY))

    def desap_item(self, out_mm_kwargs, modality: str, index: int) -> DesapOptions:
        """The options of item ``index`` of ``modality`` among the items processed now (the
        ``out_mm_kwargs`` of ``_get_prompt_updates``): its request's, as the model prunes it with."""
        return decode_request(self.desap, out_mm_kwargs[modality][index][OPTIONS_KEYS[modality]].data)

    def desap_image_token(self) -> int:
        return self.info.get_hf_config().image_token_index

    def desap_media_tokens(self) -> dict[str, int]:
        """The placeholder id of each modality DeSAP prunes: images (Qwen2.5-VL adds videos)."""
        return {"image": self.desap_image_token()}

    @cached_property
    def desap_chat(self) -> Optional[ChatMarkers]:
        chat = self.desap.chat
        if chat is None:
            return None
        if chat is True:
            return ChatMarkers.from_tokenizer(self.info.get_tokenizer())
        return ChatMarkers(**chat)

    @cached_property
    def desap_ignored(self) -> set[int]:
        config = self.info.get_hf_config()
        generation = self.info.ctx.model_config.try_get_generation_config()
        return config_ignored_ids(config, generation, self.desap.exclude_token_ids)

    # --- the prompt's text, carried with each image ------------------------------------------

    def apply(self, inputs, timing_ctx):
        if self.desap is None:
            return super().apply(inputs, timing_ctx)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        self.desap_request(kwargs)   # a bad request option fails here, before any processing
        for modality, token in self.desap_media_tokens().items():
            items = len(inputs.mm_data_items.get(modality, ())) if modality in inputs.mm_data_items else 0
            kwargs[TEXT_KEYS[modality]] = prompt_texts(list(inputs.prompt), token, items, self.desap_ignored,
                                                       self.desap_chat, modality)
        return super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=_without_desap(
            inputs.hf_processor_mm_kwargs)))
        options = repr(self.desap_request(inputs.hf_processor_mm_kwargs))
        for modality, key in TEXT_KEYS.items():
            texts = inputs.hf_processor_mm_kwargs.get(key)
            if texts is None:
                continue
            folded = []
            for item_hash, text in zip(hashes.get(modality, ()), texts):
                digest = hashlib.sha256(f"{item_hash}|desap|{options}|{','.join(map(str, text))}".encode())
                folded.append(digest.hexdigest())
            if folded:
                hashes = {**hashes, modality: folded}
        return hashes

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        kwargs = super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached)
        for modality, key in TEXT_KEYS.items():
            texts = kwargs.get(key)
            if texts is None:
                continue
            cached = mm_is_cached.get(modality, [False] * len(texts))
            kwargs = {**kwargs, key: tuple(t for t, hit in zip(texts, cached) if not hit)}
        return kwargs

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed = super()._apply_hf_processor_main(mm_items, _without_desap(hf_kwargs))
        for modality, key in TEXT_KEYS.items():
            texts = hf_kwargs.get(key)
            if texts is not None and len(texts) > 0:
                processed[key] = [torch.tensor(t, dtype=torch.long) for t in texts]
                options = encode_request(self.desap_request(hf_kwargs))
                processed[OPTIONS_KEYS[modality]] = options.expand(len(texts), -1).clone()
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, _without_desap(hf_processor_mm_kwargs)))
        if self.desap is not None:
            for modality in self.desap_media_tokens():
                for key in (TEXT_KEYS[modality], OPTIONS_KEYS[modality]):
                    fields[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_mm_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        return super()._get_mm_prompt_updates(mm_items, _without_desap(hf_processor_mm_kwargs), out_mm_kwargs)
