"""The method snippets of README.md ("Pruning methods"), docs/api.md ("Pruning methods") and
docs/methods.md ("Registering a method") run as written, on a tiny LLaVA with 100 tokens an image (so their ``keep=64`` prunes),
and the model then feeds its language model what each snippet's method says: the kept tokens, and
for docs/methods.md's ``Selection`` the groups its assignment merges. Expected values come from
the unpatched tower's own features. Every method a snippet registers is unregistered afterwards."""
import re
from pathlib import Path

import pytest
import torch

from desap_ops.integrations import last_prune
from desap_ops.methods import available_methods, get_method, unregister_method
from desap_ops.testing.tiny import BOS, IMAGE_TOKEN_ID, tiny_llava
from integrations.hf.fed import fed_rows, language_model_input

ROOT = Path(__file__).resolve().parents[1]
SIDE = 140                 # pixels: a 10 x 10 grid of 14-pixel patches
TOKENS = (SIDE // 14) ** 2
KEEP = 64                  # the snippets' keep


def snippet(document: str) -> str:
    """The document's one Python block that registers a method and applies it."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), re.S)
    (block,) = [b for b in blocks if "register_method(" in b and "apply_desap(model" in b]
    return block


@pytest.fixture
def run_snippet():
    """Run a document's snippet with ``model`` a fresh tiny LLaVA; give back the model, the names it
    registered and the snippet's namespace; unregister those names at the end."""
    added = []

    def run(document: str):
        before = set(available_methods())
        namespace = {"model": tiny_llava(image_size=SIDE)}
        try:
            exec(compile(snippet(document), document, "exec"), namespace)
        finally:
            added.extend(sorted(set(available_methods()) - before))
        return namespace["model"], added, namespace

    yield run
    for name in added:
        unregister_method(name)


def fed(model, pixels: torch.Tensor):
    """The image rows the language model received (hooks on the model's and the language model's
    input), and the unpatched model's tower features (feature layer -2, [CLS] dropped) with its projector."""
    ids = torch.tensor([[BOS, 5] + [IMAGE_TOKEN_ID] * TOKENS + [7, 9]])
    with language_model_input(model) as seen, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
    plain = tiny_llava(image_size=SIDE)
    with torch.no_grad():
        features = plain.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    return fed_rows(seen, IMAGE_TOKEN_ID), features[0], plain.model.multi_modal_projector


def pixels() -> torch.Tensor:
    return torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(11))


def test_readme_method_keeps_the_largest_norm_tokens(run_snippet):
    model, added, namespace = run_snippet("README.md")
    assert added == ["largest-norm"]
    method = get_method("largest-norm")
    assert method.select is namespace["largest_norm"] and method.reads == frozenset()
    image = pixels()
    rows, features, _ = fed(model, image)
    norms = features.norm(dim=-1)
    expected = norms.topk(KEEP).indices.sort().values
    sorted_norms = norms.sort(descending=True).values
    assert sorted_norms[KEEP - 1] - sorted_norms[KEEP] > 1e-4 * sorted_norms[KEEP]   # no near-tie at the cut
    (record,) = last_prune(model)
    assert record.indices.tolist() == expected.tolist()
    assert rows.shape[0] == KEEP
    assert record.task_keep is None and record.task_scores is None   # not DeSAP: no task score


def test_methods_doc_selection_keeps_a_grid_and_merges_by_its_assignment(run_snippet):
    model, added, _ = run_snippet("docs/methods.md")
    assert added == ["grid"] and get_method("grid").reads == frozenset()
    image = pixels()
    rows, features, projector = fed(model, image)
    kept = [i * TOKENS // KEEP for i in range(KEEP)]
    owner = [max(k for k, start in enumerate(kept) if start <= token) for token in range(TOKENS)]
    (record,) = last_prune(model)
    assert record.indices.tolist() == kept
    assert record.assignment.tolist() == owner
    groups = torch.stack([features[[t for t in range(TOKENS) if owner[t] == k]].mean(dim=0) for k in range(KEEP)])
    with torch.no_grad():
        torch.testing.assert_close(rows, projector(groups), rtol=1e-5, atol=1e-5)


def test_api_doc_method_keeps_the_tokens_closest_to_the_mean_token(run_snippet):
    model, added, namespace = run_snippet("docs/api.md")
    assert added == ["typical"] and get_method("typical").reads == frozenset()
    assert get_method("typical").select is namespace["typical"]
    image = pixels()
    rows, features, _ = fed(model, image)
    closeness = torch.nn.functional.cosine_similarity(features, features.mean(dim=0, keepdim=True), dim=-1)
    ranked = closeness.sort(descending=True).values
    assert ranked[KEEP - 1] - ranked[KEEP] > 1e-5   # no near-tie at the cut
    assert last_prune(model)[0].indices.tolist() == closeness.topk(KEEP).indices.sort().values.tolist()
    assert rows.shape[0] == KEEP


def builtin_table() -> list[dict]:
    """The rows of docs/methods.md's table of the built-in methods (between its markers), by column."""
    text = (ROOT / "docs/methods.md").read_text()
    table = re.search(r"<!-- builtin-methods-table: start -->\n(.*?)<!-- builtin-methods-table: end -->", text, re.S)
    assert table, "docs/methods.md has no delimited table of the built-in methods"
    head, rule, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
                         for line in table.group(1).strip().splitlines()]
    assert set("".join(rule)) <= {"-", " "} and all(len(row) == len(head) for row in rows)
    return [dict(zip(head, row)) for row in rows]


def test_the_methods_table_has_one_row_per_builtin_with_its_merge_default():
    from desap_ops.methods import BUILTIN

    rows = builtin_table()
    names = [re.fullmatch(r"`([a-z0-9][a-z0-9_.-]*)`", row["method"]).group(1) for row in rows]
    assert sorted(names) == sorted(method.name for method in BUILTIN) and len(set(names)) == len(names)
    merges = {method.name: method.merges for method in BUILTIN}
    assert {name: row["by default"] for name, row in zip(names, rows)} == \
        {name: "merges" if merges[name] else "drops" for name in names}
    for name, row in zip(names, rows):   # what it reads: exactly the signals the method declares
        reads = {signal.value for signal in get_method(name).reads}
        assert set(re.split(r",\s*", row["reads"])) - {"nothing"} == reads, name
