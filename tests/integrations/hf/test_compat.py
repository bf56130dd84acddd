"""The tested transformers range, enforced by apply_desap; the operator needs no transformers."""
import subprocess
import sys
import warnings

import pytest

from desap_ops.testing.tiny import tiny_llava, tiny_qwen2_5_vl
from desap_ops.integrations import apply_desap
from desap_ops.integrations.hf import compat


def test_an_older_transformers_is_refused_with_the_range(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "4.50.0")
    model = tiny_llava()
    with pytest.raises(RuntimeError, match=rf"transformers >= {compat.OLDEST_TESTED}: found 4.50.0.*"
                                           rf"{compat.OLDEST_TESTED} to {compat.NEWEST_TESTED}"):
        apply_desap(model, keep=4)
    assert not hasattr(model, "_desap")


def test_a_newer_transformers_warns_once_and_still_patches(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "99.1.0")
    monkeypatch.setattr(compat, "_warned", set())
    with pytest.warns(UserWarning, match=rf"99.1.0 is newer.*{compat.NEWEST_TESTED}"):
        model = apply_desap(tiny_llava(), keep=4)
    assert hasattr(model, "_desap")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_desap(model, keep=4)   # once per release and process


def test_the_tested_bounds_pass_silently():
    for release in (compat.OLDEST_TESTED, compat.NEWEST_TESTED):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compat.check_version(release)


def test_a_moved_internal_is_named_before_anything_is_patched(monkeypatch):
    model = tiny_qwen2_5_vl()
    monkeypatch.delattr(type(model.model), "get_rope_index")
    with pytest.raises(RuntimeError, match=r"model\.model\.get_rope_index is missing.*tested with transformers"):
        apply_desap(model, keep=4)
    assert not hasattr(model, "_desap") and "forward" not in model.__dict__


def test_a_renamed_parameter_is_named(monkeypatch):
    from transformers.models.llava_next import modeling_llava_next

    monkeypatch.setattr(modeling_llava_next, "image_size_to_num_patches", lambda size, pinpoints, patch: 1)
    from desap_ops.testing.tiny import tiny_llava_next

    with pytest.raises(RuntimeError, match="image_size_to_num_patches takes no image_size, grid_pinpoints, patch_size"):
        apply_desap(tiny_llava_next(), keep=20)


def test_the_operator_runs_where_transformers_cannot_be_imported():
    # transformers blocked: importing desap_ops and pruning must not touch it
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, desap_ops\n"
            "g = torch.Generator().manual_seed(0)\n"
            "r = desap_ops.prune(torch.randn(1, 12, 8, generator=g), torch.randn(1, 12, 6, generator=g),"
            " torch.randn(1, 3, 6, generator=g), torch.rand(1, 12, generator=g), keep=4, backend='reference')\n"
            "assert r.tokens.shape == (1, 4, 8)\n"
            "try:\n    desap_ops.apply_desap\nexcept ImportError as e:\n    print('apply_desap needs transformers')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "apply_desap needs transformers" in run.stdout
