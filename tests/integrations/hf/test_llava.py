"""apply_desap on a tiny random-weight LLaVA-1.5 built from a config."""
import pytest
import torch

from desap_ops import reference
from desap_ops.testing.tiny import IMAGE_TOKEN_ID as IMG, tiny_llava
from desap_ops.integrations import apply_desap, last_prune, remove_desap
from desap_ops.integrations.hf.clip_tower import encoder_layers

from ..prompts import N, llava_pixels, llava_prompt, pad
from .fed import fed_rows, language_model_input
from .operator_by_hand import OPTIONS, PLANTED, check_record, contract_split, plant, plant_and_prune


@pytest.fixture
def pixels():
    return llava_pixels()


def test_keep_all_without_merge_leaves_llava_logits_unchanged(pixels):
    model = tiny_llava()
    ids = torch.tensor([llava_prompt([5, 6], 1, [7, 8, 9])])
    expected = model(input_ids=ids, pixel_values=pixels[:1]).logits
    apply_desap(model, keep=N, merge=False)
    assert torch.equal(model(input_ids=ids, pixel_values=pixels[:1]).logits, expected)


def _signals_by_hand(eager, pixels):
    """(hidden, attention branch in text space, saliency) of the patch tokens, read off an eager
    model: the feature layer's output, its attention module run again, its attention matrix's
    [CLS] row averaged over heads."""
    inner = eager.model
    with torch.no_grad():
        out = inner.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = encoder_layers(inner.vision_tower)[1]          # feature layer -2 of 3 layers
        branch = layer.self_attn(layer.layer_norm1(out.hidden_states[1]))[0]
        saliency = out.attentions[1][:, :, 0, :].mean(dim=1)
        return out.hidden_states[2][:, 1:], inner.multi_modal_projector(branch[:, 1:]), saliency[:, 1:]


def test_pruned_logits_equal_the_language_model_fed_the_reference_by_hand(pixels):
    keep, text = 5, [7, 8, 9, 10]
    model = tiny_llava()
    ids = torch.tensor([llava_prompt([5, 6], 1, text)])
    apply_desap(model, keep=keep, task_ratio=0.6)
    got = model(input_ids=ids, pixel_values=pixels[:1]).logits

    # by hand: signals read off an eager twin (the [CLS] row of its attention matrix), the reference
    # operator, the projector, a shortened prompt, and the language model
    eager = tiny_llava(attn_implementation="eager")
    inner = eager.model
    hidden, branch, saliency = _signals_by_hand(eager, pixels[:1])
    with torch.no_grad():
        embed = eager.get_input_embeddings()
        result = reference.prune(hidden, branch, embed(torch.tensor([text])), saliency, keep, task_ratio=0.6)
        short = torch.tensor([llava_prompt([5, 6], 1, text, per_image=keep)])
        embeds = embed(short)
        embeds[short == IMG] = inner.multi_modal_projector(result.tokens)[0]
        expected = eager.lm_head(inner.language_model(inputs_embeds=embeds).last_hidden_state)
    assert [r.indices.tolist() for r in last_prune(model)] == result.indices.tolist()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _sharpened(attn_implementation="sdpa"):
    """A tiny LLaVA whose feature layer attends sharply (queries x 10): a random model attends
    almost uniformly, so its tokens' attention branches are nearly parallel and no text token can
    single any of them out."""
    model = tiny_llava(attn_implementation=attn_implementation)
    with torch.no_grad():
        encoder_layers(model.model.vision_tower)[1].self_attn.q_proj.weight.mul_(10)
    return model


@pytest.mark.parametrize("options", OPTIONS)
def test_auto_split_and_text_budget_agree_with_the_operator_by_hand(pixels, options):
    keep, text = 6, [7, 8, PLANTED, 10, 11, 12]
    hidden, branch, saliency = _signals_by_hand(_sharpened("eager"), pixels[:1])
    model = _sharpened()
    by_hand, everything = plant_and_prune(model, hidden, branch, saliency, text, keep, options)
    apply_desap(model, keep=keep, **options)
    model(input_ids=torch.tensor([llava_prompt([5], 1, text)]), pixel_values=pixels[:1])
    check_record(last_prune(model), by_hand, everything, options)


@pytest.mark.parametrize("options", [dict(task_ratio=0.5), dict(task_ratio="auto")])
def test_a_text_budget_covering_the_text_changes_nothing(pixels, options):
    text = [7, 8, 9, 10]
    ids = torch.tensor([llava_prompt([5], 1, text)])
    model = apply_desap(tiny_llava(), keep=5, **options)
    expected = model(input_ids=ids, pixel_values=pixels[:1]).logits
    for budget in (len(text), 100):
        apply_desap(model, keep=5, text_budget=budget, **options)
        assert torch.equal(model(input_ids=ids, pixel_values=pixels[:1]).logits, expected)


def test_generate_under_auto_and_a_text_budget_starts_from_the_pruned_prefill_with_the_contracts_split(pixels):
    keep, text = 4, [7, 8, PLANTED, 10]
    model = _sharpened()
    plant(model, *_signals_by_hand(_sharpened("eager"), pixels[:1]), keep)   # one token the prompt singles out
    apply_desap(model, keep=keep, task_ratio="auto", text_budget=2)
    ids = torch.tensor([llava_prompt([5], 1, text)])
    out = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :-3], ids)    # the caller's prompt, then the new tokens
    assert out[0, -3] == model(input_ids=ids, pixel_values=pixels[:1]).logits[0, -1].argmax()
    # the planted token stands about 6.4 robust deviations above the typical score: "auto" gives the
    # task score 2 of 4 (0.75 * 4 * (6.4 - 4) / 4 = 1.8), by the contract's formula on the record's own scores
    (record,) = last_prune(model)
    assert record.task_keep == contract_split(record.task_scores, keep) == 2


def test_generate_is_deterministic_and_starts_from_the_pruned_prefill(pixels):
    model = apply_desap(tiny_llava(), keep=4)
    ids = torch.tensor([llava_prompt([5], 1, [7, 8])])
    first = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=5, do_sample=False)
    second = model.generate(ids, pixel_values=pixels[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :ids.shape[1]], ids)
    with language_model_input(model) as seen:   # one new token: the only forward is the prefill
        model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=1, do_sample=False)
    assert seen.input_ids.tolist() == [llava_prompt([5], 1, [7, 8], per_image=4)]
    logits = model(input_ids=ids, pixel_values=pixels[:1]).logits
    assert first[0, ids.shape[1]] == logits[0, -1].argmax()


def test_batch_equals_its_rows_alone_with_right_padding(pixels):
    model = apply_desap(tiny_llava(), keep=6)
    rows = [llava_prompt([5], 1, [7, 8, 9, 10, 11]), llava_prompt([6, 3], 1, [9])]
    ids, mask = pad(rows, left=False)
    batch = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1]).logits
        torch.testing.assert_close(batch[i, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_batch_generate_equals_its_rows_alone_with_left_padding(pixels):
    model = apply_desap(tiny_llava(), keep=6)
    rows = [llava_prompt([5], 1, [7, 8, 9, 10, 11]), llava_prompt([6, 3], 1, [9])]
    ids, mask = pad(rows, left=True)
    batch = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), pixel_values=pixels[i:i + 1], max_new_tokens=4,
                               do_sample=False)
        assert batch[i, -4:].tolist() == alone[0, -4:].tolist()


def test_several_images_in_one_prompt(pixels):
    model = tiny_llava()
    ids = torch.tensor([llava_prompt([5], 2, [7, 8])])
    expected = model(input_ids=ids, pixel_values=pixels).logits
    apply_desap(model, keep=N, merge=False)
    assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)
    apply_desap(model, keep=3)
    with language_model_input(model) as seen:
        out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape[1] == ids.shape[1] - 2 * (N - 3)
    # each image's 3 slots hold the projected means of its merge groups, in image order
    hidden = _signals_by_hand(tiny_llava(attn_implementation="eager"), pixels)[0]
    records = last_prune(model)
    expected = [torch.stack([hidden[i][records[i].assignment == k].mean(dim=0) for k in range(3)]) for i in range(2)]
    with torch.no_grad():
        expected = model.model.multi_modal_projector(torch.cat(expected))
    torch.testing.assert_close(fed_rows(seen, IMG), expected, rtol=1e-5, atol=1e-5)


def test_remove_desap_restores_the_model_exactly(pixels):
    model = tiny_llava()
    ids = torch.tensor([llava_prompt([5], 1, [7, 8])])
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


def test_a_keep_above_an_images_tokens_sends_it_whole_and_bad_budgets_are_refused(pixels):
    model = tiny_llava()
    ids = torch.tensor([llava_prompt([5], 2, [7, 8])])
    expected = model(input_ids=ids, pixel_values=pixels).logits
    apply_desap(model, keep=N + 1)    # keep means at most
    assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)
    with pytest.raises(ValueError, match="keep"):
        apply_desap(tiny_llava(), keep=0)
    with pytest.raises(ValueError, match="task_ratio"):
        apply_desap(tiny_llava(), keep=4, task_ratio=2.0)


def test_a_list_of_feature_layers_is_refused():
    model = tiny_llava()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        apply_desap(model, keep=4)
    assert not hasattr(model, "_desap")


def test_wrong_placeholder_count_is_explained(pixels):
    model = apply_desap(tiny_llava(), keep=4)
    ids = torch.tensor([[1, 5] + [IMG] * 10 + [7]])
    with pytest.raises(ValueError, match="expected 16"):
        model(input_ids=ids, pixel_values=pixels[:1])
