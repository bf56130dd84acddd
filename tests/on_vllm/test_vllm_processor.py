"""The plugin's processor in this process (no engine): placeholders, the prompt text carried with
each image, the cache identity; and what a config with ``desap`` is refused for at start-up."""
import pytest
from PIL import Image

from desap_ops.integrations.vllm import register
from desap_ops.integrations.vllm.options import read_options

register()   # what vLLM's plugin loader does in every process


def _processor(folder, overrides=None):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(folder), hf_overrides=overrides or {}, max_model_len=512)
    return MULTIMODAL_REGISTRY.create_processor(config)


def _process(processor, prompt, image_file):
    items = processor.info.parse_mm_data({"image": Image.open(image_file).convert("RGB")})
    return processor(prompt, items)


PROMPT_A = "USER: <image> what is the color of the sky ? ASSISTANT:"
PROMPT_B = "USER: <image> read the text on the sign ASSISTANT:"


def test_each_image_gets_keep_placeholders_and_its_prompt_text(checkpoints):
    processor = _processor(checkpoints["llava"], {"desap": {"keep": 5}})
    out = _process(processor, PROMPT_A, checkpoints["square"])
    tokenizer = processor.info.get_tokenizer()
    image_token = processor.info.get_hf_config().image_token_index
    assert out["prompt_token_ids"].count(image_token) == 5
    (item,) = out["mm_kwargs"]["image"]
    text = item["desap_text_ids"].data.tolist()
    # the user's words of the image's turn (the template's markers, the default): no "USER:", no
    # "ASSISTANT:", not the image token itself
    assert tokenizer.convert_ids_to_tokens(text) == "what is the color of the sky ?".split()


def test_one_image_under_two_prompts_is_two_cache_entries_only_with_desap(checkpoints):
    image = checkpoints["square"]
    plain = _processor(checkpoints["llava"])
    assert _process(plain, PROMPT_A, image)["mm_hashes"] == _process(plain, PROMPT_B, image)["mm_hashes"]
    assert _process(plain, PROMPT_A, image)["prompt_token_ids"].count(100) == 16   # vLLM's own count

    pruned = _processor(checkpoints["llava"], {"desap": {"keep": 5}})
    a, b = _process(pruned, PROMPT_A, image), _process(pruned, PROMPT_B, image)
    assert a["mm_hashes"]["image"] != b["mm_hashes"]["image"]
    assert _process(pruned, PROMPT_A, image)["mm_hashes"] == a["mm_hashes"]          # stable
    other_keep = _processor(checkpoints["llava"], {"desap": {"keep": 6}})
    assert _process(other_keep, PROMPT_A, image)["mm_hashes"] != a["mm_hashes"]      # the options count too


@pytest.mark.parametrize("desap, read", [
    ({"keep": 5}, "what is the color of the sky ?"),                  # the default: the template's markers
    ({"keep": 5, "chat": True}, "what is the color of the sky ?"),
    ({"keep": 5, "chat": False}, "what is the color of the sky ? ASSISTANT:"),   # plain: all after the image
])
def test_by_default_the_image_reads_its_user_turns_words_and_chat_false_reads_all_after_it(checkpoints, desap, read):
    processor = _processor(checkpoints["llava"], {"desap": desap})
    out = _process(processor, PROMPT_A, checkpoints["square"])
    (item,) = out["mm_kwargs"]["image"]
    words = processor.info.get_tokenizer().convert_ids_to_tokens(item["desap_text_ids"].data.tolist())
    assert words == read.split()


def test_a_question_before_the_image_is_read_and_an_error_names_the_modality(checkpoints):
    from desap_ops.integrations.vllm.processor import prompt_texts

    processor = _processor(checkpoints["llava"], {"desap": {"keep": 5}})
    question_first = PROMPT_A.replace("<image> what is the color of the sky ?", "what is the color of the sky ? <image>")
    assert question_first != PROMPT_A
    out = _process(processor, question_first, checkpoints["square"])
    (item,) = out["mm_kwargs"]["image"]
    words = processor.info.get_tokenizer().convert_ids_to_tokens(item["desap_text_ids"].data.tolist())
    assert words == "what is the color of the sky ?".split()
    with pytest.raises(ValueError, match="found 0 video placeholder tokens in 0 runs for 1 videos"):
        prompt_texts([1, 2, 3], 152, 1, set(), None, "video")


def test_a_model_desap_does_not_support_fails_at_start_up(tmp_path):
    from transformers import LlamaConfig

    from desap_ops.testing.checkpoint import build_tokenizer

    LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, head_dim=64,
                vocab_size=128, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    build_tokenizer(128, 100).save_pretrained(tmp_path)
    from vllm.config import ModelConfig

    ModelConfig(model=str(tmp_path), max_model_len=64)   # fine without desap
    with pytest.raises(ValueError, match="DeSAP in vLLM supports LlavaForConditionalGeneration.*this model is "
                                         "LlamaForCausalLM"):
        ModelConfig(model=str(tmp_path), hf_overrides={"desap": {"keep": 4}}, max_model_len=64)


@pytest.mark.parametrize("desap, message", [
    ({"keep": 0}, "keep"),
    ({"keep": 4, "ratio": 0.5}, "unknown option"),
    ({"keep": 4, "task_ratio": 1.5}, "task_ratio"),
    ({"keep": 4, "text_budget": 0}, "text_budget"),
])
def test_bad_options_fail_at_start_up_naming_the_option(checkpoints, desap, message):
    from vllm.config import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig(model=str(checkpoints["llava"]), hf_overrides={"desap": desap}, max_model_len=512)


def test_options_of_the_wrong_type_are_refused_by_name():
    class Config:
        desap = {"keep": 4, "chat": "yes"}
    with pytest.raises(TypeError, match=r'hf_overrides\["desap"\]\["chat"\]'):
        read_options(Config)
    Config.desap = [4]
    with pytest.raises(TypeError, match=r'hf_overrides\["desap"\] must be a dict'):
        read_options(Config)
    Config.desap = {"keep": 4, "task_ratio": "auto", "text_budget": 8, "merge": False}
    options = read_options(Config)
    assert (options.keep, options.task_ratio, options.text_budget, options.merge) == (4, "auto", 8, False)


def test_llava_keep_above_the_images_tokens_passes_it_whole(checkpoints):
    # the tiny LLaVA has 16 tokens per image; keep means at most, as in apply_desap
    processor = _processor(checkpoints["llava"], {"desap": {"keep": 17}})
    assert _process(processor, PROMPT_A, checkpoints["square"])["prompt_token_ids"].count(100) == 16


@pytest.mark.parametrize("keep, placeholders", [
    (4, 5),     # the 4 image-newline tokens leave no room: they and one visual token
    (12, 12),
    (60, 52),   # more than the image's 48 visual and 4 newline tokens: the whole image
])
def test_llava_next_placeholders_per_image_follow_image_budget(checkpoints, keep, placeholders):
    # a 112 x 56 image packs 48 visual and 4 image-newline tokens
    processor = _processor(checkpoints["llava_next"], {"desap": {"keep": keep}})
    assert _process(processor, PROMPT_A, checkpoints["wide"])["prompt_token_ids"].count(100) == placeholders


QWEN_A = "USER: <|vision_start|><|image_pad|><|vision_end|> what is the color of the sky ? ASSISTANT:"


def test_qwen_image_gets_keep_placeholders_and_a_smaller_image_all_of_its_tokens(checkpoints):
    processor = _processor(checkpoints["qwen2_5_vl"], {"desap": {"keep": 6}})
    image_token = processor.info.get_hf_config().image_token_id
    assert _process(processor, QWEN_A, checkpoints["large"])["prompt_token_ids"].count(image_token) == 6
    # 56 x 56: 2 x 2 tokens, fewer than keep, pass whole
    assert _process(processor, QWEN_A, checkpoints["square"])["prompt_token_ids"].count(image_token) == 4


def test_qwen_ships_the_raw_uint8_pixels_and_the_tower_normalizes_them_under_desap(checkpoints):
    # DeSAP leaves vLLM's device normalization on: a quarter of the bytes of float32 pixels
    # (random's seed reads the pixels' order, the same raw or normalized: methods.order_rows)
    processor = _processor(checkpoints["qwen2_5_vl"], {"desap": {"keep": 6}})
    assert processor.info.ctx.model_config.multimodal_config.mm_device_do_normalize is True
    (item,) = _process(processor, QWEN_A, checkpoints["large"])["mm_kwargs"]["image"]
    assert str(item["pixel_values"].data.dtype) == "torch.uint8"


def test_qwen_image_without_vision_start_gets_keep_placeholders(checkpoints):
    # the plugin's M-RoPE step places each image from its own channels, not from the marker before it
    processor = _processor(checkpoints["qwen2_5_vl"], {"desap": {"keep": 6}})
    ids = _process(processor, "USER: <|image_pad|> what is in the image ? ASSISTANT:", checkpoints["large"])
    assert ids["prompt_token_ids"].count(processor.info.get_hf_config().image_token_id) == 6


@pytest.mark.parametrize("setting, message", [
    ({"video_pruning_rate": 0.5}, "video_pruning_rate"),
    ({"compile_mm_encoder": True}, "compile_mm_encoder"),
])
def test_qwen_engine_settings_that_would_lose_positions_or_signals_are_refused(setting, message):
    from types import SimpleNamespace

    from desap_ops.integrations.vllm.qwen2_5_vl import check_engine

    def config(video_pruning_rate=None, compile_mm_encoder=False):
        # no use_v2_model_runner: vLLM 0.34 removed it, so the check must not read it
        return SimpleNamespace(
            parallel_config=SimpleNamespace(pipeline_parallel_size=1),
            model_config=SimpleNamespace(multimodal_config=SimpleNamespace(video_pruning_rate=video_pruning_rate),
                                         enable_prompt_embeds=False),
            compilation_config=SimpleNamespace(compile_mm_encoder=compile_mm_encoder),
            speculative_config=None, lora_config=None)

    with pytest.raises(ValueError, match=message):
        check_engine(config(**setting))
    check_engine(config())   # vLLM's CPU defaults pass


@pytest.mark.parametrize("kind, model, parallel, message", [
    ("qwen2_5_vl", {"mm_encoder_tp_mode": "data"}, {}, 'mm_encoder_tp_mode="data"'),
    ("qwen2_5_vl", {}, {"pipeline_parallel_size": 2}, "pipeline_parallel_size must be 1"),
])
def test_engine_settings_desap_cannot_run_are_refused_when_vllm_builds_the_config(checkpoints, kind, model, parallel,
                                                                                 message):
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig

    def build(desap, **settings):
        overrides = {"desap": {"keep": 4}} if desap else {}
        config = ModelConfig(model=str(checkpoints[kind]), hf_overrides=overrides, max_model_len=512, **model)
        return VllmConfig(model_config=config, parallel_config=ParallelConfig(**parallel))

    build(desap=False)   # vLLM alone accepts the setting
    with pytest.raises(ValueError, match=message):
        build(desap=True)


def test_llava_encoder_data_parallel_falls_back_to_weights_before_desap_reads_the_tower(checkpoints):
    # vLLM's LLaVA towers have no data-parallel mode: vLLM itself turns "data" into "weights"
    from vllm.config import ModelConfig

    for kind in ("llava", "llava_next"):
        config = ModelConfig(model=str(checkpoints[kind]), hf_overrides={"desap": {"keep": 4}}, max_model_len=512,
                             mm_encoder_tp_mode="data")
        assert config.multimodal_config.mm_encoder_tp_mode == "weights"


def test_one_path_without_then_with_desap_in_one_process_gets_the_desap_processor(checkpoints):
    # vLLM caches resolved classes by model path, not by hf_overrides: the plugin must not let a
    # plain config of a path decide the class of a later DeSAP config of the same path
    plain = _processor(checkpoints["llava"])
    assert _process(plain, PROMPT_A, checkpoints["square"])["prompt_token_ids"].count(
        plain.info.get_hf_config().image_token_index) == 16
    pruned = _processor(checkpoints["llava"], {"desap": {"keep": 5}})
    assert _process(pruned, PROMPT_A, checkpoints["square"])["prompt_token_ids"].count(
        pruned.info.get_hf_config().image_token_index) == 5
    again = _processor(checkpoints["llava"])
    assert _process(again, PROMPT_A, checkpoints["square"])["prompt_token_ids"].count(
        again.info.get_hf_config().image_token_index) == 16
