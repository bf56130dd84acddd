"""apply_desap on tiny random-weight LLaVA-1.5 and LLaVA-NeXT models built from configs."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from desap_ops import reference
from desap_ops.integrations import apply_desap, remove_desap
from desap_ops.integrations.sequence import first_placeholders, image_text_tokens, shrink_placeholders
from desap_ops.integrations.signals import capture, clip_layout, encoder_layers
from desap_ops.integrations.tiny import IMAGE_TOKEN_ID as IMG, tiny_llava, tiny_llava_next

N = 16  # patch tokens per image of the tiny LLaVA (4 x 4)


def _prompt(before, images, after, per_image=N):
    return [1] + before + [IMG] * (per_image * images) + after


def _pad(rows, left):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def test_keep_all_without_merge_leaves_llava_logits_unchanged(pixels):
    model = tiny_llava()
    ids = torch.tensor([_prompt([5, 6], 1, [7, 8, 9])])
    expected = model(input_ids=ids, pixel_values=pixels[:1]).logits
    apply_desap(model, keep=N, merge=False)
    assert torch.equal(model(input_ids=ids, pixel_values=pixels[:1]).logits, expected)


def test_pruned_logits_equal_the_language_model_fed_the_reference_by_hand(pixels):
    keep, text = 5, [7, 8, 9, 10]
    model = tiny_llava()
    ids = torch.tensor([_prompt([5, 6], 1, text)])
    apply_desap(model, keep=keep, task_ratio=0.6)
    got = model(input_ids=ids, pixel_values=pixels[:1]).logits

    # by hand: signals read off an eager twin (the [CLS] row of its attention matrix), the reference
    # operator, the projector, a shortened prompt, and the language model
    eager = tiny_llava(attn_implementation="eager")
    inner = eager.model
    with torch.no_grad():
        out = inner.vision_tower(pixels[:1], output_hidden_states=True, output_attentions=True)
        layer = encoder_layers(inner.vision_tower)[1]          # feature layer -2 of 3 layers
        branch = layer.self_attn(layer.layer_norm1(out.hidden_states[1]))[0]
        saliency = out.attentions[1][:, :, 0, :].mean(dim=1)
        hidden = out.hidden_states[2]
        embed = eager.get_input_embeddings()
        result = reference.prune(hidden[:, 1:], inner.multi_modal_projector(branch[:, 1:]),
                                 embed(torch.tensor([text])), saliency[:, 1:], keep, task_ratio=0.6)
        short = torch.tensor([_prompt([5, 6], 1, text, per_image=keep)])
        embeds = embed(short)
        embeds[short == IMG] = inner.multi_modal_projector(result.tokens)[0]
        expected = eager.lm_head(inner.language_model(inputs_embeds=embeds).last_hidden_state)
    assert model._desap.last["indices"].tolist() == result.indices.tolist()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cls_saliency_matches_the_eager_attention_matrix(pixels):
    eager = tiny_llava(attn_implementation="eager")
    tower = eager.model.vision_tower
    for index, layer in enumerate(encoder_layers(tower)):
        with capture(clip_layout(layer)) as signals:
            out = tower(pixels, output_attentions=True)
            saliency = signals.cls_saliency()
        torch.testing.assert_close(saliency, out.attentions[index][:, :, 0, :].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_generate_is_deterministic_and_starts_from_the_pruned_prefill(pixels):
    model = apply_desap(tiny_llava(), keep=4)
    ids = torch.tensor([_prompt([5], 1, [7, 8])])
    first = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=5, do_sample=False)
    second = model.generate(ids, pixel_values=pixels[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(first, second)
    prompt = first[:, :ids.shape[1] - (N - 4)]
    assert prompt.tolist() == [_prompt([5], 1, [7, 8], per_image=4)]
    logits = model(input_ids=ids, pixel_values=pixels[:1]).logits
    assert first[0, prompt.shape[1]] == logits[0, -1].argmax()


def test_batch_equals_its_rows_alone_with_right_padding(pixels):
    model = apply_desap(tiny_llava(), keep=6)
    rows = [_prompt([5], 1, [7, 8, 9, 10, 11]), _prompt([6, 3], 1, [9])]
    ids, mask = _pad(rows, left=False)
    batch = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1]).logits
        torch.testing.assert_close(batch[i, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_batch_generate_equals_its_rows_alone_with_left_padding(pixels):
    model = apply_desap(tiny_llava(), keep=6)
    rows = [_prompt([5], 1, [7, 8, 9, 10, 11]), _prompt([6, 3], 1, [9])]
    ids, mask = _pad(rows, left=True)
    batch = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1], max_new_tokens=4,
                               do_sample=False)
        assert batch[i, -4:].tolist() == alone[0, -4:].tolist()


def test_several_images_in_one_prompt(pixels):
    model = tiny_llava()
    ids = torch.tensor([_prompt([5], 2, [7, 8])])
    expected = model(input_ids=ids, pixel_values=pixels).logits
    apply_desap(model, keep=N, merge=False)
    assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)
    apply_desap(model, keep=3)
    out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape[1] == ids.shape[1] - 2 * (N - 3)
    assert out.image_hidden_states.shape == (6, 64)


def test_remove_desap_restores_the_model_exactly(pixels):
    model = tiny_llava()
    ids = torch.tensor([_prompt([5], 1, [7, 8])])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=ids, pixel_values=pixels[:1]).logits
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    apply_desap(model, keep=3)
    apply_desap(model, keep=5)  # applying twice replaces the first
    remove_desap(model)
    assert not hasattr(model, "_desap")
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert "get_image_features" not in model.model.__dict__
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(input_ids=ids, pixel_values=pixels[:1]).logits, before)


def test_unsupported_models_and_budgets_are_refused():
    tiny_lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        apply_desap(tiny_lm, keep=4)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        apply_desap(tiny_llava(), keep=17)
    with pytest.raises(ValueError, match="task_ratio"):
        apply_desap(tiny_llava(), keep=4, task_ratio=2.0)


def test_wrong_placeholder_count_is_explained(pixels):
    model = apply_desap(tiny_llava(), keep=4)
    ids = torch.tensor([[1, 5] + [IMG] * 10 + [7]])
    with pytest.raises(ValueError, match="expected 16"):
        model(input_ids=ids, pixel_values=pixels[:1])


# --- LLaVA-NeXT ---------------------------------------------------------------------------------

NEXT_SIZES = torch.tensor([[56, 112], [112, 112]])
NEXT_TOKENS = [52, 88]      # packed tokens (base 16 + unpadded grid + one newline per grid row)
NEXT_NEWLINES = [4, 8]


@pytest.fixture
def next_pixels():
    return torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_next_keep_all_without_merge_leaves_logits_unchanged(next_pixels):
    model = tiny_llava_next()
    ids = torch.tensor([_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[1])])
    args = dict(pixel_values=next_pixels[1:], image_sizes=NEXT_SIZES[1:])
    expected = model(input_ids=ids, **args).logits
    apply_desap(model, keep=NEXT_TOKENS[1], merge=False)
    torch.testing.assert_close(model(input_ids=ids, **args).logits, expected, rtol=1e-6, atol=1e-6)


def test_next_sends_exactly_keep_tokens_with_newlines_in_place(next_pixels):
    keep = 20
    model = apply_desap(tiny_llava_next(), keep=keep)
    rows = [_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[0]), _prompt([6], 1, [9], per_image=NEXT_TOKENS[1])]
    ids, mask = _pad(rows, left=True)
    out = model(input_ids=ids, pixel_values=next_pixels, image_sizes=NEXT_SIZES, attention_mask=mask)
    assert out.image_hidden_states.shape[0] == 2 * keep
    newline = model.model.image_newline
    for i, count in enumerate(NEXT_NEWLINES):
        rows_of_image = out.image_hidden_states[i * keep:(i + 1) * keep]
        is_newline = (rows_of_image == newline).all(dim=-1)
        assert int(is_newline.sum()) == count
        assert len(model._desap.last["indices"][i]) == keep - count
    assert is_newline[-1]  # the last grid row ends with its newline
    batch = model.generate(input_ids=ids, pixel_values=next_pixels, image_sizes=NEXT_SIZES, attention_mask=mask,
                           max_new_tokens=3, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), pixel_values=next_pixels[i:i + 1],
                               image_sizes=NEXT_SIZES[i:i + 1], max_new_tokens=3, do_sample=False)
        assert batch[i, -3:].tolist() == alone[0, -3:].tolist()


def test_next_budget_must_cover_the_newlines(next_pixels):
    model = apply_desap(tiny_llava_next(), keep=4)
    ids = torch.tensor([_prompt([5], 1, [7], per_image=NEXT_TOKENS[0])])
    with pytest.raises(ValueError, match="image-newline"):
        model(input_ids=ids, pixel_values=next_pixels[:1], image_sizes=NEXT_SIZES[:1])


# --- sequence surgery ---------------------------------------------------------------------------

def test_shrink_keeps_the_first_placeholders_and_repads():
    ids = torch.tensor([[0, 0, 1, IMG, IMG, IMG, 5], [1, IMG, IMG, IMG, IMG, IMG, IMG]])
    mask = (ids != 0).long()
    labels = torch.arange(14).view(2, 7)
    shrunk = shrink_placeholders(first_placeholders([3, 3, 3], 2), IMG, 0, ids, mask, labels)
    new_ids, new_mask, new_labels = shrunk["input_ids"], shrunk["attention_mask"], shrunk["labels"]
    assert new_ids.tolist() == [[0, 1, IMG, IMG, 5], [1, IMG, IMG, IMG, IMG]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, 2, 3, 4, 6], [7, 8, 9, 11, 12]]


def test_each_image_reads_the_text_after_it():
    ids = torch.tensor([[1, 5, IMG, IMG, 6, 7, IMG, IMG, 8, 2], [0, 1, IMG, IMG, 9, 2, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    text, text_mask = image_text_tokens(ids, mask, IMG, [2, 2, 2], ignored_ids={0, 1, 2, IMG})
    got = [t[m].tolist() for t, m in zip(text, text_mask)]
    assert got == [[6, 7, 8], [8], [9]]
