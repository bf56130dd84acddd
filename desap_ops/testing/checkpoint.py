"""A transformers model (tiny, tiny for vLLM, or a real shape) saved as a checkpoint folder that
vLLM can load with no hub: the weights in the hub's key layout, a word-level tokenizer built here,
an image processor and a chat template. LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE).

vLLM reads LLaVA's hub key layout (``model.vision_tower.vision_model.*``); transformers 5's
``save_pretrained`` writes ``model.vision_tower.*``, so the tower's keys are renamed on saving.
vLLM's Qwen2.5-VL maps transformers 5's keys (``model.visual.*``, ``model.language_model.*``)
itself. The tokenizer knows a fixed list of words (``WORDS``) plus numbered filler words up to the
model's vocabulary, and the model's special tokens (image, video, vision start / end) at its ids;
prompts written in ``WORDS`` turn into the same ids in transformers and in vLLM. Each checkpoint
speaks its family's chat template: LLaVA's ``USER: ... ASSISTANT:``, Qwen2.5-VL's ChatML with its
default system prompt, the Qwen3 generation's ChatML without one (images and videos in both).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

MARKER = "desap_checkpoint.json"   # written last: a folder that holds it is complete
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
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen's ChatML templates as the published checkpoints ship them, for the parts a request can hold
# (text, image, video, as a string or a list): Qwen2.5-VL adds its default system prompt when the
# conversation has none, the Qwen3 generation (Qwen3-VL, Qwen3.5) adds none. The processor widens
# each pad to the image's (or video's) tokens.
_QWEN_PARTS = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
               "{% for content in message['content'] %}"
               "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
               f"{VISION_START}{IMAGE_PAD}{VISION_END}"
               "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
               f"{VISION_START}{VIDEO_PAD}{VISION_END}"
               "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}")
QWEN2_5_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{{% endif %}}"
                    f"{IM_START}{{{{ message['role'] }}}}\n" + _QWEN_PARTS + f"{IM_END}\n{{% endfor %}}"
                    f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}")
QWEN3_TEMPLATE = QWEN2_5_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}" f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
    "{% endif %}", "")
# ChatML's role words: plain words of the Qwen tokenizers (at the top of their vocabulary)
CHATML_WORDS = ("system", "user", "assistant")
# the tokenizer attributes the processors look their placeholders up by
TOKEN_ROLES = {IMAGE: "image_token", IMAGE_PAD: "image_token", VIDEO_PAD: "video_token"}


def build_tokenizer(vocab_size: int, specials: int | dict[str, int], pad_id: int = 0, bos_id: int = 1,
                    eos_id: int = 2, chat_template: str = LLAVA_TEMPLATE, words: dict[str, int] | None = None):
    """A word-level fast tokenizer over ``WORDS`` and filler words, ``vocab_size`` ids in all, with
    ``specials`` (token -> id; an int: LLaVA's ``<image>`` at that id) as added special tokens and
    ``words`` (word -> id) as further plain words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {IMAGE: specials} if isinstance(specials, int) else specials
    vocab = {PAD: pad_id, BOS: bos_id, EOS: eos_id, **specials, **(words or {})}
    taken = set(vocab.values())   # a set: the scan below is linear even at a real vocabulary's size
    free = (i for i in range(vocab_size) if i not in taken)
    vocab[UNK] = next(free)
    for word in WORDS:
        vocab[word] = next(free)
    for i in free:
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    roles = {TOKEN_ROLES[token]: token for token in specials if token in TOKEN_ROLES}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK, extra_special_tokens=roles)
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.chat_template = chat_template
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
    state = {hub_key(k): v for k, v in model.state_dict().items()}
    _save_model(model, folder, state, getattr(text, "tie_word_embeddings", False))
    return folder


def save_qwen_checkpoint(model: nn.Module, folder: str | Path) -> Path:
    """Save a Qwen2.5-VL, Qwen3-VL or Qwen3.5 model (dense or MoE; transformers) with a tokenizer,
    processor and chat template in ``folder`` for vLLM and transformers alike; returns the folder.
    Images are resized to multiples of two merged patches (28 pixels for Qwen2.5-VL, 32 for the
    Qwen3 generation) between 2 x 2 and 4 x 4 of them (4 to 16 tokens an image; video frames too):
    Qwen2.5-VL makes 4 tokens of 56 x 56, 8 of 112 x 56, 16 of 112 x 112 pixels, and so does
    the Qwen3 generation of 64 x 64, 128 x 64, 128 x 128. The Qwen3 generation's video processor
    keeps the frames it is given (vLLM and transformers would otherwise sample them each its own way)."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    vision = config.vision_config
    qwen2_5 = config.model_type == "qwen2_5_vl"
    template = QWEN2_5_TEMPLATE if qwen2_5 else QWEN3_TEMPLATE
    tokenizer = qwen_tokenizer(config)
    side = 2 * vision.patch_size * vision.spatial_merge_size   # two merged patches
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size,
                 size={"shortest_edge": side * side, "longest_edge": 4 * side * side})
    processor_class, video_class = (("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor") if qwen2_5 else
                                    ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"))
    if not qwen2_5:   # the published checkpoints' mean and std; vLLM normalizes videos with the image's
        sizes.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_sizes = sizes if qwen2_5 else dict(sizes, do_sample_frames=False,
                                              size={"shortest_edge": side * side, "longest_edge": 64 * side * side})
    processor = getattr(transformers, processor_class)(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
        video_processor=getattr(transformers, video_class)(**video_sizes), chat_template=template)
    processor.save_pretrained(folder)
    _save_model(model, folder, qwen_hub_experts(model.state_dict(), config.model_type), config.tie_word_embeddings)
    return folder


def qwen_tokenizer(config):
    """The tokenizer :func:`save_qwen_checkpoint` saves beside a Qwen2.5-VL, Qwen3-VL or Qwen3.5
    model of ``config``, its family's chat template included."""
    template = QWEN2_5_TEMPLATE if config.model_type == "qwen2_5_vl" else QWEN3_TEMPLATE
    vocab_size = config.text_config.vocab_size
    specials = {IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id,
                VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id}
    # ChatML's markers and role words on the highest free ids (prompts write filler words from 54 up)
    top = [i for i in range(vocab_size - 1, -1, -1) if i not in specials.values()][:2 + len(CHATML_WORDS)]
    specials.update({IM_START: top[0], IM_END: top[1]})
    return build_tokenizer(vocab_size, specials, chat_template=template, words=dict(zip(CHATML_WORDS, top[2:])))


def qwen_hub_experts(state: dict, model_type: str) -> dict:
    """``state`` with a Qwen MoE's experts in the published checkpoints' layout, which vLLM reads:
    transformers 5 holds each layer's experts as ``gate_up_proj`` (E, 2 * I, H) and ``down_proj``
    (E, H, I). Qwen3-VL-MoE publishes both transposed; Qwen3.5-MoE one gate, up and down
    projection per expert. Other models' states are returned as they are."""
    fused = [k for k in state if k.endswith("experts.gate_up_proj")]
    if model_type not in ("qwen3_vl_moe", "qwen3_5_moe") or not fused:
        return state
    state = dict(state)
    for key in fused:
        prefix = key[:-len("gate_up_proj")]
        gate_up, down = state.pop(key), state.pop(prefix + "down_proj")
        if model_type == "qwen3_vl_moe":
            state[key], state[prefix + "down_proj"] = gate_up.transpose(1, 2), down.transpose(1, 2)
            continue
        for expert, (gate, up) in enumerate(zip(*gate_up.chunk(2, dim=1))):
            state[f"{prefix}{expert}.gate_proj.weight"] = gate
            state[f"{prefix}{expert}.up_proj.weight"] = up
            state[f"{prefix}{expert}.down_proj.weight"] = down[expert]
    return state


def _save_model(model: nn.Module, folder: Path, state: dict, tied: bool) -> None:
    """The config (naming the architecture), generation config, weights (``state``, without the
    output head when it is tied to the embeddings) and the marker of a folder built here."""
    from safetensors.torch import save_file

    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    getattr(model, "generation_config", None) and model.generation_config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if tied:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / MARKER).write_text(json.dumps({"built_by": "desap_ops.testing.checkpoint"}))
