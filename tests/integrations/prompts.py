"""Prompts, padded batches and templated chats for the integration tests (tiny models from
desap_ops.testing.tiny)."""
import torch

from desap_ops.testing.tiny import BOS, IMAGE_TOKEN_ID as IMG, QWEN_IMAGE, tiny_llava, tiny_qwen2_5_vl

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


# --- templated chats: word-level tokenizers whose ids fit the tiny models' vocabularies ----------

WORDS = ("USER ASSISTANT : what is this a cat colour the user wants assistant system You are helpful ."
         .split())
LLAVA_SPECIALS = {"<image>": IMG}
CHATML_SPECIALS = {"<|image_pad|>": 151, "<|vision_start|>": 153, "<|vision_end|>": 154,
                   "<|im_start|>": 155, "<|im_end|>": 156}

# the chat templates of LLaVA-1.5 (llava-hf) and Qwen2.5-VL, reduced to what they render for
# messages whose content is a list of {"type": "image"} and {"type": "text", "text": ...} parts
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% for part in m['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in m['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# "what colour : the user wants" about the image (a lone ':' and 'user' are words), the answer
# "a cat", then the follow-up "what is this": only the image's own turn is its text
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour : the user wants"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this"}]}]
USER_WORDS = "what colour : the user wants".split()


def word_tokenizer(specials: dict, template: str):
    """A word-level tokenizer (words split at spaces and punctuation, "USER:" -> "USER", ":")
    with ``specials`` as special tokens and ``template`` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}, **specials}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(list(specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def chat_ids(tokenizer, messages, image_token: int, per_image: int) -> list:
    """The templated prompt's ids (with the generation prompt), each image token repeated
    ``per_image`` times as the processor does."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        ids += [token] * (per_image if token == image_token else 1)
    return ids


def token_ids(tokenizer, text: str) -> tuple:
    """The ids of ``text``'s space-separated tokens."""
    return tuple(tokenizer.convert_tokens_to_ids(text.split()))


STYLES = {  # chat style -> (word-level tokenizer, image token, its tiny model's builder)
    "llava": (word_tokenizer(LLAVA_SPECIALS, LLAVA_TEMPLATE), IMG, tiny_llava),
    "chatml": (word_tokenizer(CHATML_SPECIALS, CHATML_TEMPLATE), QWEN_IMAGE, tiny_qwen2_5_vl),
}
