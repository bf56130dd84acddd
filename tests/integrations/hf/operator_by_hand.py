"""``desap_ops.prune`` called by hand on signals read off a tiny model, to compare with the record
``apply_desap`` leaves (task_ratio="auto" and text_budget)."""
import torch

import desap_ops

# every option of the operator beyond the paper, alone and together
OPTIONS = [dict(task_ratio="auto"), dict(task_ratio="auto", text_budget=2), dict(task_ratio=0.5, text_budget=2)]
PLANTED = 9   # the text token whose embedding copies one visual token's attention branch


def plant_and_prune(model, hidden, branch, saliency, text, keep, options):
    """Make token ``PLANTED`` copy the attention branch of the visual token it singles out best
    (the largest "auto" split as the only text), then prune (hidden, branch, saliency) (1, N, .)
    for the embedded ``text``: (result under ``options``, result without the budget)."""
    def split(n):
        return int(desap_ops.prune(hidden, branch, branch[:, n:n + 1], saliency, keep, task_ratio="auto").task_keep)

    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[PLANTED] = branch[0, max(range(branch.shape[1]), key=split)]
        embedded = embedding(torch.tensor([list(text)]))
        return (desap_ops.prune(hidden, branch, embedded, saliency, keep, **options),
                desap_ops.prune(hidden, branch, embedded, saliency, keep, task_ratio=options["task_ratio"]))


def check_record(record, by_hand, everything, options):
    """The record of one image equals the operator by hand, and the options made a difference."""
    assert torch.equal(torch.stack(record.task_keep), by_hand.task_keep)
    assert record.indices[0].tolist() == by_hand.indices[0].tolist()
    torch.testing.assert_close(record.task_scores[0], by_hand.task_scores[0], rtol=1e-5, atol=1e-5)
    if options["task_ratio"] == "auto":
        assert int(by_hand.task_keep) > 0      # the split did read the prompt
    if "text_budget" in options:               # and the budget did drop text
        assert not torch.equal(everything.task_scores, by_hand.task_scores)
