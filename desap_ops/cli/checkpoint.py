"""A model of ``models.MODELS`` saved as a checkpoint folder that vLLM can load with no hub: the
weights in the hub's key layout, a word-level tokenizer built here, an image processor and a chat
template.

vLLM reads the hub's key layout (``model.vision_tower.vision_model.*``); transformers 5's
``save_pretrained`` writes ``model.vision_tower.*``, so the tower's keys are renamed on saving.
The tokenizer knows a fixed list of words (``WORDS``) plus numbered filler words up to the model's
vocabulary, and the image token at the model's image token id; prompts written in ``WORDS`` turn
into the same ids in transformers and in vLLM.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE = "<image>"
# the words prompts are written in (tests and benches); everything else is filler
WORDS = ("USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "picture", "photo", "describe", "color", "of",
         "sky", "dog", "cat", "car", "a", "on", "left", "right", "top", "bottom", "how", "many", "people", "are",
         "there", "read", "text", "sign", "count", "red", "blue", "green", "where", "person", "tree", "?", "and",
         "this", "show", "me", "find", "small", "large", "object", "corner", "center", "face", "hand")
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
                  "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
                  "<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
                  "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string else "
                  "message['content'][0]['text'] }} {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tokenizer(vocab_size: int, image_token_id: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    """A word-level fast tokenizer over ``WORDS`` and filler words, ``vocab_size`` ids in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: pad_id, BOS: bos_id, EOS: eos_id, IMAGE: image_token_id}
    free = (i for i in range(vocab_size) if i not in vocab.values())
    vocab[UNK] = next(free)
    for word in WORDS:
        vocab[word] = next(free)
    for i in free:
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK, extra_special_tokens={"image_token": IMAGE})
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    return tokenizer


def hub_key(key: str) -> str:
    """A transformers 5 LLaVA state-dict key in the hub's layout, which vLLM reads."""
    prefix = "model.vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix):]
    return key


def save_llava_checkpoint(model: nn.Module, folder: str | Path) -> Path:
    """Save a LLaVA-1.5 or LLaVA-NeXT model (transformers) with a tokenizer, processor and chat
    template in ``folder`` for vLLM and transformers alike; returns the folder."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    text = config.text_config
    tokenizer = build_tokenizer(text.vocab_size, config.image_token_id)
    size = config.vision_config.image_size
    common = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    next_layout = hasattr(config, "image_grid_pinpoints")
    if next_layout:
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints, **common)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       patch_size=config.vision_config.patch_size,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                                       num_additional_image_tokens=1,
                                       chat_template=LLAVA_TEMPLATE)
    else:
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(**common), tokenizer=tokenizer,
                                   patch_size=config.vision_config.patch_size,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1,
                                   chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(folder)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    getattr(model, "generation_config", None) and model.generation_config.save_pretrained(folder)
    state = {hub_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(text, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "desap_checkpoint.json").write_text(json.dumps({"built_by": "desap_ops.cli.checkpoint"}))
    return folder


def tiny_vllm_llava(seed: int = 0, next_layout: bool = False) -> nn.Module:
    """A tiny LLaVA-1.5 (or LLaVA-NeXT) that vLLM's CPU backend runs: the tiny models' tower with a
    language model of head size 64 (the CPU attention refuses 16)."""
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    from .models import IMAGE_TOKEN_ID, _configs

    vision, _ = _configs()
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, vocab_size=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, max_position_embeddings=512)
    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if next_layout:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
        cls = LlavaNextForConditionalGeneration
    else:
        config, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    torch.manual_seed(seed)
    return cls(config).eval()
