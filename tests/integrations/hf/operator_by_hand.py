"""``desap_ops.prune`` called by hand on signals read off a tiny model, to compare with the record
``apply_desap`` leaves (task_ratio="auto" and text_budget)."""
import math

import torch

import desap_ops

# every option of the operator beyond the paper, alone and together
OPTIONS = [dict(task_ratio="auto"), dict(task_ratio="auto", text_budget=2), dict(task_ratio=0.5, text_budget=2)]
PLANTED = 9   # the text token whose embedding copies one visual token's attention branch


def plant(model, hidden, branch, saliency, keep):
    """Make token ``PLANTED`` of ``model`` copy the attention branch of the visual token it singles
    out best (the largest "auto" split as the only text) among (hidden, branch, saliency) (1, N, .)."""
    def split(n):
        return int(desap_ops.prune(hidden, branch, branch[:, n:n + 1], saliency, keep, task_ratio="auto").task_keep)

    with torch.no_grad():
        model.get_input_embeddings().weight[PLANTED] = branch[0, max(range(branch.shape[1]), key=split)]


def plant_and_prune(model, hidden, branch, saliency, text, keep, options):
    """:func:`plant`, then prune (hidden, branch, saliency) for the embedded ``text``: (result
    under ``options``, result without the budget)."""
    plant(model, hidden, branch, saliency, keep)
    with torch.no_grad():
        embedded = model.get_input_embeddings()(torch.tensor([list(text)]))
        return (desap_ops.prune(hidden, branch, embedded, saliency, keep, **options),
                desap_ops.prune(hidden, branch, embedded, saliency, keep, task_ratio=options["task_ratio"]))


def check_record(records, by_hand, everything, options):
    """The records of one image equal the operator by hand, and the options made a difference."""
    (record,) = records
    assert record.task_keep == int(by_hand.task_keep[0])
    assert record.indices.tolist() == by_hand.indices[0].tolist()
    torch.testing.assert_close(record.task_scores, by_hand.task_scores[0], rtol=1e-5, atol=1e-5)
    if options["task_ratio"] == "auto":
        assert int(by_hand.task_keep) > 0      # the split did read the prompt
    if "text_budget" in options:               # and the budget did drop text
        assert not torch.equal(everything.task_scores, by_hand.task_scores)


def contract_split(scores: torch.Tensor, keep: int) -> int:
    """K_task under task_ratio="auto" by the contract's formula (docs/contract.md, step 2), from one
    image's (N,) task scores: round(0.75 K clamp((g - 4) / 4, 0, 1)) with g = (max - median) /
    (1.4826 MAD), median and MAD the ceil(N / 2)-th largest, rounded half up."""
    half = (scores.numel() + 1) // 2
    median = scores.sort(descending=True).values[half - 1]
    spread = (scores - median).abs().sort(descending=True).values[half - 1] * 1.4826
    share = float(((scores.max() - median) / spread - 4.0) / 4.0)
    return math.floor(min(max(share, 0.0), 1.0) * 0.75 * keep + 0.5)
