"""apply_desap(model, keep=K, method=m): every built-in method and a registered one, on every family,
with one semantics. Keep means at most and a small image passes whole; the kept tokens the record
shows are exactly the ones the language model gets, at their original places (LLaVA-NeXT's newlines,
the Qwen models' 3D positions and DeepStack levels, one budget per video clip); the tower captures
attention only for a method that reads saliency or the attention branch, and the prompt is embedded
only for one that reads text. Which tokens each method keeps is checked against the method run on
signals read independently off the unpatched model (tests/methods checks the methods themselves)."""
import functools
from collections import Counter
from contextlib import contextmanager
from typing import Optional

import pytest
import torch

from desap_ops import reference
from desap_ops.integrations import apply_desap, last_prune, remove_desap
from desap_ops.integrations.common.layout import drops_cls
from desap_ops.integrations.common.signals import captures
from desap_ops.integrations.hf import qwen2_5_vl, qwen3_vl
from desap_ops.integrations.hf.clip_tower import encoder_layers, feature_layer
from desap_ops.methods import (BUILTIN, MethodFailure, MethodInputs, Selection, Signal, available_methods, content_rows,
                               content_seeds, get_method, order_rows, register_method, run_method, unregister_method)
from desap_ops.methods.builtin import hiprune_anchors
from desap_ops.testing.tiny import (BOS, IMAGE_TOKEN_ID as IMG, VIDEO_TOKEN_ID as VID, tiny_llava, tiny_llava_next,
                                  tiny_llava_next_video, tiny_qwen2_5_vl, tiny_qwen3_5, tiny_qwen3_vl, tiny_video_llava)
from methods.method_plugin import entry_points_on_path
from methods.test_method_builtins import naive_divprune

from ..prompts import N, llava_pixels, llava_prompt
from .fed import fed_rows, language_model_input
from .qwen_checks import group_means
from .qwen_inputs import IMG as QWEN_IMG, VID as QWEN_VID, inputs as qwen_inputs, tokens

METHODS = tuple(method.name for method in BUILTIN) + ("test-largest-norm",)
TOL = dict(rtol=1e-5, atol=1e-5)


def largest_norm(inputs: MethodInputs) -> torch.Tensor:
    return inputs.hidden.float().norm(dim=-1).topk(inputs.keep, dim=-1).indices.sort(dim=-1).values


@pytest.fixture(scope="module", autouse=True)
def registered_methods():
    """A method registered by the user (reads no signal), and one that gives back a wrong order."""
    register_method("test-largest-norm", largest_norm, reads=())
    register_method("test-broken-order", lambda inputs: largest_norm(inputs).flip(-1), reads=())
    yield
    unregister_method("test-largest-norm")
    unregister_method("test-broken-order")


@pytest.fixture
def work(monkeypatch):
    """Counts of the pruning work a call did: attention captures in a tower, prompt text embedded."""
    from desap_ops.integrations.common import signals
    from desap_ops.integrations.hf import text

    counts = Counter()
    for module, name, key in ((signals, "capture", "capture"), (text, "image_text_tokens", "text")):
        def counting(*args, original=getattr(module, name), key=key, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    return counts


def check_work(counts: Counter, method: str) -> None:
    reads = get_method(method).reads
    assert bool(counts["capture"]) == captures(reads), f"{method} reads {sorted(reads)}: capture {counts}"
    assert bool(counts["text"]) == (Signal.TEXT in reads), f"{method} reads {sorted(reads)}: text {counts}"
    counts.clear()


def expected_indices(method: str, keep: int, hidden: torch.Tensor, seed_content: torch.Tensor, desap_run,
                     projected: torch.Tensor, received: Optional[torch.Tensor] = None):
    """(K,) the tokens ``method`` keeps of one item whose tokens are ``hidden`` (N, D), the rows the
    language model receives ``projected`` (N, C) and pixel hashes ``seed_content`` (N,): the
    method itself on those signals; DivPrune by hand in float64 on the projected rows (as its
    authors' code selects); for the scored methods, DeSAP with its whole budget on saliency
    (task_ratio 0) or on the task score (task_ratio 1), which by the contract keeps the same
    tokens. None for DeSAP itself (tests of each family check it), and for dart-input and cdpruner-lm,
    which read the prompt beside the projected rows and whose choice tests/methods checks against
    their naive forms. ``received`` (N,): the attention each token receives, read by hand (CLIP
    towers); None where it is the saliency itself (Qwen)."""
    if method == "saliency":
        return desap_run(0.0)
    if method == "similarity":
        return desap_run(1.0)
    if method in ("desap", "dart-input", "cdpruner-lm", "visionzip"):   # VisionZip: its own check (visionzip_expected)
        return None
    if method == "hiprune":   # budgets here take no anchor: the K receiving most (test_hiprune.py: anchors)
        assert hiprune_anchors(keep) == 0
        if received is None:
            return desap_run(0.0)
        return sorted(sorted(range(len(received)), key=lambda i: (-float(received[i]), i))[:keep])
    if method == "divprune":
        return naive_divprune_without_near_ties(projected, keep)
    inputs = MethodInputs(hidden=hidden[None], keep=keep, seed=content_seeds(seed_content[None]),
                          projected=projected[None])
    return run_method(get_method(method), inputs, merge=False).indices[0]


def naive_divprune_without_near_ties(projected: torch.Tensor, keep: int) -> list:
    """DivPrune by hand (float64) on ``projected`` (N, C); these inputs hold no near-tie."""
    kept = naive_divprune(projected.detach(), keep)
    assert kept is not None, "a near-tie in DivPrune's choice: pick other inputs"
    return kept


# --- visionzip: its contextual tokens are its own merge, checked on signals read by hand ------------

def clip_hand_signals(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(saliency, keys, received) of a CLIP-style tower's feature layer read by hand off the
    unpatched model: the [CLS] query's softmax over the layer's keys, mean over heads; the keys,
    mean over heads (from the layer's own q and k projections); the attention each token receives,
    mean over heads and over all queries; without [CLS] under the "default" strategy."""
    attention = encoder_layers(model.model.vision_tower)[feature_layer(model.config) - 1].self_attn
    seen = {}
    handles = [module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
               for name, module in (("q", attention.q_proj), ("k", attention.k_proj))]
    with torch.no_grad():
        model.model.vision_tower(pixels)
    for handle in handles:
        handle.remove()
    batch, length, _ = seen["k"].shape
    query = seen["q"].view(batch, length, attention.num_heads, -1)[:, 0].double()      # (B, H, d): [CLS]
    keys = seen["k"].view(batch, length, attention.num_heads, -1).double()             # (B, T, H, d)
    saliency = (torch.einsum("bhd,bthd->bht", query, keys) * attention.scale).softmax(dim=-1).mean(dim=1)
    queries = seen["q"].view(batch, length, attention.num_heads, -1).double()
    weights = (torch.einsum("bqhd,bthd->bhqt", queries, keys) * attention.scale).softmax(dim=-1)
    received = weights.mean(dim=(1, 2))
    first = 1 if drops_cls(model.config) else 0
    return saliency[:, first:].float(), keys.mean(dim=2)[:, first:].float(), received[:, first:]


def visionzip_expected(hidden, saliency, keys, keep: int, merge: bool):
    """What VisionZip gives one item: the method on its signals (tests/methods checks the method)."""
    return run_method(get_method("visionzip"), MethodInputs(hidden=hidden[None], keep=keep, saliency=saliency[None],
                                                            keys=keys[None]), merge)


QWEN_READERS = {"qwen2.5-vl": qwen2_5_vl.read_tower, "qwen3-vl": qwen3_vl.read_tower, "qwen3.5": qwen3_vl.read_tower}


def test_clip_keys_are_the_feature_layers_keys_and_read_only_for_a_method_that_reads_them():
    from desap_ops.integrations.hf.clip_tower import read_tower

    model, pixels = tiny_llava(), llava_pixels(seed=2)
    _, keys, _ = clip_hand_signals(model, pixels)
    with torch.no_grad():
        read, _ = read_tower(model.model.vision_tower, pixels, feature_layer(model.config), True,
                             frozenset({Signal.KEYS}))
        plain, _ = read_tower(model.model.vision_tower, pixels, feature_layer(model.config), True,
                              frozenset({Signal.SALIENCY}))
    torch.testing.assert_close(read.keys, keys, rtol=1e-5, atol=1e-6)
    assert plain.keys is None


def test_qwen_keys_are_the_blocks_keys_as_its_attention_gets_them_mean_over_each_2x2(monkeypatch):
    """Qwen3-VL: the last block's keys (rotary applied) recorded in its eager attention, mean over
    heads, then over each merged token's 4 patches."""
    import sys

    model = tiny_qwen3_vl(attn_implementation="eager")
    data = qwen_inputs([IMAGE, SMALL], seed=3, timestamps=True, after=(7, 8))
    visual = model.model.visual
    modeling = sys.modules[type(visual).__module__]
    last, recorded, original = visual.blocks[-1].attn, [], modeling.eager_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        if module is last:
            recorded.append(key[0].double().mean(dim=0))   # (H, T, d) of one image -> (T, d)
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    with torch.no_grad():
        visual(data["pixel_values"], grid_thw=data["image_grid_thw"])
    monkeypatch.setattr(modeling, "eager_attention_forward", original)
    by_hand = torch.cat(recorded).view(-1, visual.spatial_merge_unit, recorded[0].shape[-1]).mean(dim=1)
    with torch.no_grad():
        read = qwen3_vl.read_tower(model, data["pixel_values"], data["image_grid_thw"], frozenset({Signal.KEYS}))
    torch.testing.assert_close(read.keys.double(), by_hand, rtol=1e-5, atol=1e-6)


@contextmanager
def applied(model, **options):
    apply_desap(model, **options)
    try:
        yield model
    finally:
        remove_desap(model)


def clip_hidden(model, pixels: torch.Tensor) -> torch.Tensor:
    """The candidate tokens of a CLIP-style tower read off the unpatched model: the feature layer's
    hidden states, without [CLS] under the "default" strategy."""
    with torch.no_grad():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[feature_layer(model.config)]
    return states[:, 1:] if drops_cls(model.config) else states


def check_kept(records, item: int, keep: int, tokens: int) -> list:
    indices = records[item].indices.tolist()
    assert len(indices) == keep and indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < tokens
    return indices


# --- LLaVA-1.5 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_llava_feeds_the_kept_tokens_merged_or_not(method, work):
    keep, pixels = 5, llava_pixels(seed=3)
    ids = torch.tensor([llava_prompt([5], 2, [7, 8, 9])])
    model = tiny_llava()
    hidden = clip_hidden(model, pixels)                                          # (2, 16, D)
    projector = model.model.multi_modal_projector
    content = content_rows(pixels, hidden.dtype)[:, None].expand(-1, N)          # a CLIP token's pixels: its image's

    @functools.cache
    def desap_run(task_ratio):
        with applied(model, keep=keep, task_ratio=task_ratio), torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
            return [r.indices.tolist() for r in last_prune(model)]

    for merge in (False, True):
        with applied(model, keep=keep, merge=merge, method=method), language_model_input(model) as seen, \
                torch.no_grad():
            work.clear()   # what this call alone does
            model(input_ids=ids, pixel_values=pixels)
            records = last_prune(model)
            check_work(work, method)
            fed = fed_rows(seen, IMG).view(2, keep, -1)
            for image in range(2):
                indices = check_kept(records, image, keep, N)
                if method == "visionzip":
                    saliency, keys, _ = clip_hand_signals(model, pixels)
                    want = visionzip_expected(hidden[image], saliency[image], keys[image], keep, merge)
                    assert indices == want.indices[0].tolist()
                    assert torch.equal(records[image].assignment, want.assignment[0])
                    torch.testing.assert_close(fed[image], projector(want.tokens)[0], **TOL)
                    continue
                assignment = reference.assign_tokens(torch.tensor([indices]), hidden[image:image + 1], merge)[0]
                assert torch.equal(records[image].assignment, assignment)
                expected = reference.merge_tokens(hidden[image:image + 1], torch.tensor([indices]), assignment[None],
                                                  merge)
                torch.testing.assert_close(fed[image], projector(expected)[0], **TOL)
        received = clip_hand_signals(model, pixels)[2]
        for image in range(2):
            with torch.no_grad():
                rows = projector(hidden[image])   # the rows the language model receives
            want = expected_indices(method, keep, hidden[image], content[image],
                                    lambda ratio: desap_run(ratio)[image], rows, received[image])
            if want is not None:
                assert records[image].indices.tolist() == list(want)
        if method != "desap":
            assert all(r.task_keep is None and r.task_scores is None for r in records)   # no task score


@pytest.mark.parametrize("method", METHODS)
def test_keep_means_at_most_and_a_small_image_passes_whole(method):
    model = tiny_llava()
    ids, pixels = torch.tensor([llava_prompt([5], 1, [7, 8])]), llava_pixels()[:1]
    expected = model(input_ids=ids, pixel_values=pixels).logits
    with applied(model, keep=N + 4, merge=False, method=method):
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)
        assert last_prune(model)[0].indices.tolist() == list(range(N))


def test_random_keeps_the_same_tokens_for_the_same_pixels_and_others_for_others():
    pixels = llava_pixels(seed=4)
    same = torch.stack([pixels[0], pixels[1], pixels[0]])
    ids = torch.tensor([llava_prompt([5], 3, [7])])
    with applied(tiny_llava(), keep=5, method="random") as model:
        model(input_ids=ids, pixel_values=same)
        first, second, again = (r.indices.tolist() for r in last_prune(model))
    assert first == again and first != second
    with applied(tiny_llava(seed=1), keep=5, method="random") as other:   # another model, the image alone
        other(input_ids=torch.tensor([llava_prompt([5], 1, [7])]), pixel_values=pixels[:1])
        assert last_prune(other)[0].indices.tolist() == first


# --- LLaVA-NeXT: newlines ----------------------------------------------------------------------------

NEXT_SIZES, NEXT_TOKENS = torch.tensor([[56, 112], [112, 112]]), [52, 88]   # 48 + 4 newlines, 80 + 8


@pytest.mark.parametrize("method", METHODS)
def test_llava_next_feeds_the_kept_visual_tokens_between_every_newline(method, work):
    keep = 30
    pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[BOS, 5] + [IMG] * sum(NEXT_TOKENS) + [7, 8, 9]])
    model = tiny_llava_next()
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=NEXT_SIZES).pooler_output
    newline = model.model.image_newline

    @functools.cache
    def desap_run(task_ratio):
        with applied(model, keep=keep, task_ratio=task_ratio, merge=False), torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, image_sizes=NEXT_SIZES)
            return [r.indices.tolist() for r in last_prune(model)]

    with applied(model, keep=keep, merge=False, method=method), language_model_input(model) as seen, \
            torch.no_grad():
        work.clear()   # what this call alone does
        model(input_ids=ids, pixel_values=pixels, image_sizes=NEXT_SIZES)
        records = last_prune(model)
        check_work(work, method)
    fed = fed_rows(seen, IMG).split([keep, keep])
    for image, whole in enumerate(packed):
        is_newline = (whole == newline).all(dim=1)
        visual = (~is_newline).nonzero()[:, 0]
        indices = check_kept(records, image, keep - int(is_newline.sum()), len(visual))   # newlines count toward keep
        kept = is_newline.clone()
        kept[visual[indices]] = True
        torch.testing.assert_close(fed[image], whole[kept], **TOL)   # packed order, every newline in place
        if method == "first":
            assert indices == list(range(len(indices)))
        elif method in ("saliency", "similarity"):
            assert indices == desap_run(0.0 if method == "saliency" else 1.0)[image]


def test_llava_next_divprune_selects_on_the_packed_rows_the_language_model_receives():
    """DivPrune by hand (float64) on each image's packed projected rows, newlines aside, keeps what
    apply_desap keeps: the first pixels whose choices hold no near-tie (a few tries at most)."""
    keep, model = 30, tiny_llava_next()
    ids = torch.tensor([[BOS, 5] + [IMG] * sum(NEXT_TOKENS) + [7, 8, 9]])
    for seed in range(20, 40):
        pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            packed = model.model.get_image_features(pixel_values=pixels, image_sizes=NEXT_SIZES).pooler_output
        visual = [whole[~(whole == model.model.image_newline).all(dim=1)] for whole in packed]
        expected = [naive_divprune(rows, keep - (len(whole) - len(rows))) for rows, whole in zip(visual, packed)]
        if None not in expected:
            break
    with applied(model, keep=keep, method="divprune"), torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, image_sizes=NEXT_SIZES)
        assert [r.indices.tolist() for r in last_prune(model)] == expected


# --- videos: one budget per clip ---------------------------------------------------------------------

VIDEO_MODELS = {"llava-next-video": (tiny_llava_next_video, 4), "video-llava": (tiny_video_llava, 17)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_a_video_clip_keeps_k_tokens_across_its_frames_in_frame_major_order(name, method, work):
    build, per_frame = VIDEO_MODELS[name]
    keep, frames = 6, 3
    video = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([[BOS, 5] + [VID] * (frames * per_frame) + [7, 8, 9]])
    model = build()
    with torch.no_grad():
        # positional: transformers 5.16 names the argument pixel_values, 5.25 pixel_values_videos
        clip = model.model.get_video_features(video).pooler_output
    clip = torch.cat(list(clip)).reshape(-1, clip[0].shape[-1])   # (frames x tokens, C), frame-major

    @functools.cache
    def desap_run(task_ratio):
        with applied(model, keep=keep, task_ratio=task_ratio, merge=False), torch.no_grad():
            model(input_ids=ids, pixel_values_videos=video)
            return last_prune(model)[0].indices.tolist()

    with applied(model, keep=keep, merge=False, method=method), language_model_input(model) as seen, \
            torch.no_grad():
        work.clear()   # what this call alone does
        model(input_ids=ids, pixel_values_videos=video)
        records = last_prune(model)
        check_work(work, method)
    assert len(records) == 1   # one budget for the whole clip
    indices = check_kept(records, 0, keep, frames * per_frame)
    torch.testing.assert_close(fed_rows(seen, VID), clip[indices], **TOL)
    if method == "first":
        assert indices == list(range(keep))
    elif method in ("saliency", "similarity"):
        assert indices == desap_run(0.0 if method == "saliency" else 1.0)
    elif method == "divprune":   # on the projected rows of the clip, after the video model's pooling
        assert indices == naive_divprune_without_near_ties(clip, keep)


# --- the Qwen families: positions, DeepStack levels, videos ---------------------------------------------

QWEN = {"qwen2.5-vl": (tiny_qwen2_5_vl, False), "qwen3-vl": (tiny_qwen3_vl, True), "qwen3.5": (tiny_qwen3_5, True)}
IMAGE, SMALL, VIDEO = ("image", 8, 12), ("image", 4, 4), ("video", 2, 8, 8)   # 24, 4 and 2 x 16 tokens


def qwen_content(pixels: torch.Tensor) -> torch.Tensor:
    """A Qwen token's pixel hash: the sum of its 2 x 2 patch rows' hashes (they lie together), each
    from the order of its values within each of its 3 channels."""
    return order_rows(pixels, 3).view(-1, 4).sum(dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", QWEN)
def test_qwen_feeds_the_kept_tokens_at_their_positions_with_their_deepstack_levels(family, method, work):
    build, timestamps = QWEN[family]
    keep = 7
    data = qwen_inputs([IMAGE, SMALL, VIDEO], seed=7, timestamps=timestamps, after=(7, 8, 9, 10))
    model = build()
    with torch.no_grad():
        images = model.model.get_image_features(data["pixel_values"], data["image_grid_thw"])
        videos = model.model.get_video_features(data["pixel_values_videos"], data["video_grid_thw"])
    items = [(images.pooler_output[0], QWEN_IMG), (images.pooler_output[1], QWEN_IMG),
             (videos.pooler_output[0], QWEN_VID)]
    levels = [list(image_level.split([24, 4]) if torch.is_tensor(image_level) else image_level) +   # one tensor
              list(video_level if not torch.is_tensor(video_level) else [video_level])           # or per item
              for image_level, video_level in zip(getattr(images, "deepstack_features", None) or [],
                                                  getattr(videos, "deepstack_features", None) or [])]
    contents = [qwen_content(p) for p in data["pixel_values"].split([96, 16])]
    contents.append(qwen_content(data["pixel_values_videos"]))
    ids = data["input_ids"]
    if method == "visionzip":   # the family's reader, which test_qwen_keys_are_the_blocks_keys checks by hand
        reads = get_method(method).reads
        with torch.no_grad():
            read = QWEN_READERS[family](model, data["pixel_values"], data["image_grid_thw"], reads).split([24, 4])
            read += QWEN_READERS[family](model, data["pixel_values_videos"], data["video_grid_thw"], reads).split([32])
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=data["mm_token_type_ids"],
                                              image_grid_thw=data["image_grid_thw"],
                                              video_grid_thw=data["video_grid_thw"])

    @functools.cache
    def desap_run(task_ratio):
        with applied(model, keep=keep, task_ratio=task_ratio), torch.no_grad():
            model(**data)
            return [r.indices.tolist() for r in last_prune(model)]

    for merge in (False, True):
        with applied(model, keep=keep, merge=merge, method=method), language_model_input(model) as seen, \
                torch.no_grad():
            work.clear()   # what this call alone does
            model(**data)
            records = last_prune(model)
            check_work(work, method)
        budgets = [keep, tokens(SMALL), keep]   # the small image passes whole; the clip keeps K across frames
        assert [len(r.indices) for r in records] == budgets
        columns = (ids[0] != QWEN_IMG).logical_and(ids[0] != QWEN_VID).nonzero()[:, 0].tolist()
        fed_ids, fed_embeds = seen.input_ids[0], seen.inputs_embeds[0]
        fed = {token: fed_embeds[fed_ids == token].split([b for b, (_, t) in zip(budgets, items) if t == token])
               for token in (QWEN_IMG, QWEN_VID)}
        placeholders = {token: (ids[0] == token).nonzero()[:, 0] for token in (QWEN_IMG, QWEN_VID)}
        offsets = [0, 24, 0]
        for item, ((features, token), budget, offset) in enumerate(zip(items, budgets, offsets)):
            indices = check_kept(records, item, budget, features.shape[0])
            expected = features[indices] if not merge else group_means(features, records[item].assignment, budget)
            if method == "visionzip":
                want = visionzip_expected(features, read[item].saliency, read[item].keys, budget, merge)
                assert indices == want.indices[0].tolist()
                assert torch.equal(records[item].assignment, want.assignment[0])
                expected = want.tokens[0]
            elif merge:
                assert torch.equal(records[item].assignment,
                                   reference.assign_tokens(torch.tensor([indices]), features[None], True)[0])
            position = 0 if item == 2 else item
            torch.testing.assert_close(fed[token][position], expected, **TOL)
            columns += placeholders[token][[offset + i for i in indices]].tolist()
            if item == 1:
                assert indices == list(range(budget))
                continue
            want = expected_indices(method, budget, features, contents[item], lambda r: desap_run(r)[item],
                                    features)   # the merged tokens are the language model's rows
            if want is not None:
                assert indices == list(want)
        # the kept tokens and all the text keep their original 3D positions (timestamps included)
        assert torch.equal(seen.position_ids[-3:, 0], positions[:, 0, sorted(columns)])
        # DeepStack (Qwen3-VL): every level cut with the same indices and merged with the same assignment
        fed_levels = seen.deepstack_visual_embeds or []
        assert len(fed_levels) == len(levels) == (2 if family == "qwen3-vl" else 0)
        for level, fed_level in zip(levels, fed_levels):   # rows of every visual position, in prompt order
            for item, part in enumerate(fed_level.split(budgets)):
                expected = level[item][records[item].indices] if not merge else \
                    group_means(level[item], records[item].assignment, budgets[item])
                torch.testing.assert_close(part, expected, **TOL)


def test_qwen_random_keeps_the_same_tokens_for_the_same_pixels_and_others_for_others():
    data = qwen_inputs([IMAGE, IMAGE, IMAGE], seed=8)
    patches = data["pixel_values"].split(96)
    data["pixel_values"] = torch.cat([patches[0], patches[1], patches[0]])
    with applied(tiny_qwen2_5_vl(), keep=7, method="random") as model, torch.no_grad():
        model(**data)
        first, second, again = (r.indices.tolist() for r in last_prune(model))
    assert first == again and first != second


# --- wrong methods ---------------------------------------------------------------------------------

def test_an_unknown_method_is_a_value_error_naming_it_and_the_registered_ones():
    registered = ", ".join(repr(name) for name in available_methods())
    assert {"test-broken-order", "test-largest-norm"} <= set(available_methods())
    with pytest.raises(ValueError, match=rf"method 'nope' is not a registered pruning method; registered: "
                                         rf"\[{registered}\]"):
        apply_desap(tiny_llava(), keep=5, method="nope")
    with pytest.raises(ValueError, match=r"ideal is the method 'first' unmerged; it cannot be combined with "
                                         r"method='random'"):
        apply_desap(tiny_llava(), keep=5, method="random", ideal=True)
    with pytest.raises(TypeError, match="method must be a method name"):
        apply_desap(tiny_llava(), keep=5, method=None)


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen3_vl])
def test_a_wrong_selection_raises_a_method_failure_naming_the_method_and_the_model_serves_on(build):
    model = apply_desap(build(), keep=5, method="test-broken-order")
    if build is tiny_llava:
        call = dict(input_ids=torch.tensor([llava_prompt([5], 1, [7])]), pixel_values=llava_pixels()[:1])
    else:
        call = qwen_inputs([IMAGE], seed=9)
    with pytest.raises(MethodFailure, match="pruning method 'test-broken-order' returned indices that are not "
                                            "strictly ascending"):
        model(**call)
    apply_desap(model, keep=5, method="test-largest-norm")
    model(**call)
    assert len(last_prune(model)[0].indices) == 5


def test_a_plugins_method_runs_through_its_entry_point_with_no_other_code(tmp_path):
    pixels = llava_pixels(seed=10)[:1]
    with entry_points_on_path(tmp_path):
        model = apply_desap(tiny_llava(), keep=4, method="largest-norm")
        with language_model_input(model) as seen, torch.no_grad():
            model(input_ids=torch.tensor([llava_prompt([5], 1, [7])]), pixel_values=pixels)
        hidden = clip_hidden(model, pixels)[0]
        assert last_prune(model)[0].indices.tolist() == sorted(hidden.norm(dim=-1).topk(4).indices.tolist())
        projector = model.model.multi_modal_projector
        indices = last_prune(model)[0].indices
        merged = reference.merge_tokens(hidden[None], indices[None],
                                        reference.assign_tokens(indices[None], hidden[None], True), True)
        torch.testing.assert_close(fed_rows(seen, IMG), projector(merged)[0], **TOL)
        with pytest.raises(MethodFailure, match="pruning method 'broken-order'"):
            apply_desap(model, keep=4, method="broken-order")(input_ids=torch.tensor([llava_prompt([5], 1, [7])]),
                                                               pixel_values=pixels)


def every_dropped_into_the_first(inputs: MethodInputs):
    """Keeps the largest-norm tokens and merges every dropped token into the first kept one."""
    indices = largest_norm(inputs)
    assignment = torch.zeros(inputs.hidden.shape[:2], dtype=torch.long)
    assignment.scatter_(1, indices, torch.arange(inputs.keep).expand_as(indices))
    return Selection(indices, assignment)


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen3_vl])
def test_a_methods_own_assignment_merges_the_tokens_and_the_deepstack_levels(build):
    register_method("test-own-assignment", every_dropped_into_the_first, reads=())
    try:
        keep, model = 4, build()
        if build is tiny_llava:
            pixels = llava_pixels(seed=11)[:1]
            call = dict(input_ids=torch.tensor([llava_prompt([5], 1, [7])]), pixel_values=pixels)
            hidden, project, levels = clip_hidden(model, pixels)[0], model.model.multi_modal_projector, []
        else:
            call = qwen_inputs([IMAGE], seed=11)
            with torch.no_grad():
                features = model.model.get_image_features(call["pixel_values"], call["image_grid_thw"])
            hidden, project = features.pooler_output[0], (lambda rows: rows)
            levels = [level[0] if isinstance(level, (list, tuple)) else level for level in features.deepstack_features]
        with applied(model, keep=keep, method="test-own-assignment"), language_model_input(model) as seen, \
                torch.no_grad():
            model(**call)
            records = last_prune(model)
        indices = records[0].indices
        assert indices.tolist() == largest_norm(MethodInputs(hidden=hidden[None], keep=keep))[0].tolist()
        assignment = records[0].assignment
        assert assignment.tolist() == [indices.tolist().index(j) if j in indices else 0 for j in range(len(hidden))]
        token = IMG if build is tiny_llava else QWEN_IMG
        fed = seen.inputs_embeds[0][seen.input_ids[0] == token]
        torch.testing.assert_close(fed, project(group_means(hidden, assignment, keep)), **TOL)
        for level, fed_level in zip(levels, seen.deepstack_visual_embeds or [], strict=True):
            torch.testing.assert_close(fed_level, group_means(level, assignment, keep), **TOL)
    finally:
        unregister_method("test-own-assignment")
