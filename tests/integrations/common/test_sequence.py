"""Sequence surgery: shrinking placeholder runs, and each image's prompt text."""
import torch

from desap_ops.testing.tiny import IMAGE_TOKEN_ID as IMG
from desap_ops.integrations.common.sequence import first_placeholders, image_text_tokens, shrink_placeholders


def test_shrink_keeps_the_first_placeholders_and_repads():
    ids = torch.tensor([[0, 0, 1, IMG, IMG, IMG, 5], [1, IMG, IMG, IMG, IMG, IMG, IMG]])
    mask = (ids != 0).long()
    labels = torch.arange(14).view(2, 7)
    shrunk = shrink_placeholders(first_placeholders([3, 3, 3], 2), IMG, 0, ids, mask, labels)
    new_ids, new_mask, new_labels = shrunk.input_ids, shrunk.attention_mask, shrunk.labels
    assert new_ids.tolist() == [[0, 1, IMG, IMG, 5], [1, IMG, IMG, IMG, IMG]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, 2, 3, 4, 6], [7, 8, 9, 11, 12]]


def test_without_chat_markers_an_image_reads_the_text_after_it_or_else_the_text_before_it():
    # "q q <img>": nothing follows, so the question before counts; "<img> a <img> b": the first
    # image reads what follows it (a, b), the second b; a system prompt before the image does not
    # count while a question follows
    ids = torch.tensor([[1, 5, 6, IMG, IMG, 2, 0, 0],
                        [1, IMG, IMG, 7, IMG, IMG, 8, 2],
                        [1, 9, 9, IMG, IMG, 3, 2, 0]])
    mask = (ids != 0).long()
    text, text_mask = image_text_tokens(ids, mask, IMG, [2, 2, 2, 2], ignored_ids={0, 1, 2, IMG})
    assert [t[m].tolist() for t, m in zip(text, text_mask)] == [[5, 6], [7, 8], [8], [3]]
    # with turns but no user turn opened before the image (a raw prompt), the same rule
    turns = torch.where(ids == 0, -1, torch.zeros_like(ids))
    text, text_mask = image_text_tokens(ids, mask, IMG, [2, 2, 2, 2], ignored_ids={0, 1, 2, IMG}, turns=turns)
    assert [t[m].tolist() for t, m in zip(text, text_mask)] == [[5, 6], [7, 8], [8], [3]]
    # an image alone in its row reads nothing: saliency alone decides
    text, text_mask = image_text_tokens(torch.tensor([[1, IMG, IMG, 2]]), None, IMG, [2], ignored_ids={1, 2})
    assert not text_mask.any()


def test_each_image_reads_the_text_after_it():
    ids = torch.tensor([[1, 5, IMG, IMG, 6, 7, IMG, IMG, 8, 2], [0, 1, IMG, IMG, 9, 2, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    text, text_mask = image_text_tokens(ids, mask, IMG, [2, 2, 2], ignored_ids={0, 1, 2, IMG})
    got = [t[m].tolist() for t, m in zip(text, text_mask)]
    assert got == [[6, 7, 8], [8], [9]]
