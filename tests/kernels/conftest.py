"""The kernel modules, imported once per session (importing them imports triton)."""
import pytest


@pytest.fixture(scope="session")
def kernels():
    from desap_ops.kernels import merge, selection, similarity

    return similarity, selection, merge
