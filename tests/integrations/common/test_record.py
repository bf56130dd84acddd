"""The per-image records of both engines (``integrations/common/record.py``): built from a prune's
result and the signals it read, each image's own copy, and the text-blind warning, told once."""
import dataclasses
import logging
import pickle

import pytest
import torch

from desap_ops.integrations.common.pruning import PruneOptions, prune_images
from desap_ops.integrations.common.record import TEXT_BLIND, PruneRecord, records_of, warn_if_text_blind
from desap_ops.integrations.common.signals import TowerSignals
from desap_ops.methods import Signal

READS_TEXT = frozenset({Signal.SALIENCY, Signal.ATTN, Signal.TEXT})


def _pruned(method="desap", ideal=False):
    """Two images of 9 tokens pruned to 4, the second with no prompt text to read."""
    gen = torch.Generator().manual_seed(0)
    signals = TowerSignals(torch.randn(2, 9, 6, generator=gen), torch.randn(2, 9, 4, generator=gen),
                           torch.rand(2, 9, generator=gen))
    text = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    options = PruneOptions.checked(4, 0.5, True, "max", "reference", None, method, ideal=ideal)
    return signals, mask, prune_images(signals, lambda branch: branch, text, mask, 4, options), options


def test_each_image_gets_its_row_of_the_result_as_a_copy_of_its_own():
    signals, mask, result, options = _pruned()
    records = records_of(result, signals.saliency, mask.sum(dim=1), options.method)
    assert [r.text_tokens for r in records] == [2, 0] and all(r.method == "desap" for r in records)
    for i, record in enumerate(records):
        assert record.indices.dtype == record.assignment.dtype == torch.int64
        assert record.task_scores.dtype == record.saliency.dtype == torch.float32
        assert torch.equal(record.indices, result.indices[i]) and torch.equal(record.assignment, result.assignment[i])
        assert torch.equal(record.task_scores, result.task_scores[i]) and record.task_keep == int(result.task_keep[i])
        assert torch.equal(record.saliency, signals.saliency[i])
    kept = records[0].indices.clone()
    result.indices.zero_()   # the engine's tensors may be reused: the record holds its own
    assert torch.equal(records[0].indices, kept)
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].task_keep = 0


def test_a_method_that_reads_no_saliency_or_scores_no_task_records_none_for_them():
    signals, mask, result, options = _pruned(ideal=True)
    (record, _) = records_of(result, signals.saliency, mask.sum(dim=1), options.method)
    assert record.method == "first" and record.saliency is None   # the tower's saliency was not what it read
    assert record.indices.tolist() == [0, 1, 2, 3]
    unscored = result._replace(task_scores=None, task_keep=None)
    (record, _) = records_of(unscored, None, mask.sum(dim=1), options.method)
    assert record.task_scores is None and record.task_keep is None


def test_a_record_crosses_a_process_boundary_whole():
    signals, mask, result, options = _pruned()
    (record, _) = records_of(result, signals.saliency, mask.sum(dim=1), options.method)
    again = pickle.loads(pickle.dumps(record))
    assert isinstance(again, PruneRecord) and again == record
    # equality reads every field, tensors by value
    changed = {"indices": record.indices + 1, "assignment": record.assignment + 1, "task_scores": record.task_scores * 2,
               "saliency": record.saliency + 1, "task_keep": record.task_keep + 1, "text_tokens": 0, "method": "first"}
    assert changed.keys() == {field.name for field in dataclasses.fields(PruneRecord)}
    assert all(dataclasses.replace(record, **{name: value}) != record for name, value in changed.items())


def test_the_counts_must_match_the_images():
    signals, mask, result, options = _pruned()
    with pytest.raises(ValueError, match="text_tokens must count one entry per image"):
        records_of(result, signals.saliency, mask.sum(dim=1)[:1], options.method)
    with pytest.raises(ValueError, match="saliency must hold one row per image"):
        records_of(result, signals.saliency[:1], mask.sum(dim=1), options.method)


def test_a_text_blind_image_is_told_once_and_only_where_the_method_reads_text(caplog):
    signals, mask, result, options = _pruned()
    read, blind = records_of(result, signals.saliency, mask.sum(dim=1), options.method)
    with caplog.at_level(logging.WARNING):
        assert warn_if_text_blind([read], READS_TEXT, False) is False          # every image read text
        assert warn_if_text_blind([read, blind], frozenset(), False) is False  # a method that reads none
        assert not caplog.records
        told = warn_if_text_blind([read, blind], READS_TEXT, False)
        assert told is True and warn_if_text_blind([blind], READS_TEXT, told) is True
    assert [r.message for r in caplog.records] == [TEXT_BLIND]
