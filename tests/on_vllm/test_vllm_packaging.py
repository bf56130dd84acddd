"""The vLLM plugin in a serving image without desap-ops' ``demo`` extra. vLLM brings pillow itself;
the rest of the extra (scikit-image, onnx, matplotlib) must not be needed to register the plugin or
to import any of its modules (tests/test_packaging.py checks the same without vLLM)."""
import importlib.metadata
import json
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from desap_ops.cli.demo import DEMO_PACKAGES
from desap_ops.integrations.vllm import PREFIX, SUPPORTED

# in a fresh interpreter where the given modules are not importable (None in sys.modules: import
# fails, find_spec answers None): register the plugin, import its modules, print what vLLM resolves
PLUGIN = """
import importlib, json, pkgutil, sys

sys.modules.update(dict.fromkeys(json.loads(sys.argv[1])))
import desap_ops.integrations.vllm as plugin

plugin.register()
for info in pkgutil.iter_modules(plugin.__path__, plugin.__name__ + "."):
    importlib.import_module(info.name)
from vllm import ModelRegistry

print(json.dumps(sorted(arch for arch in ModelRegistry.get_supported_archs() if arch.startswith(plugin.PREFIX))))
"""


def test_the_plugin_registers_without_the_demo_packages_vllm_does_not_bring():
    (vllm,) = importlib.metadata.packages_distributions()["vllm"]
    brought = {canonicalize_name(requirement.name) for requirement in map(Requirement, importlib.metadata.requires(vllm))
               if requirement.marker is None or "extra" not in str(requirement.marker)}
    blocked = sorted(module for module, distribution in DEMO_PACKAGES.items()
                     if canonicalize_name(distribution) not in brought)
    assert {"skimage", "onnx", "matplotlib"} <= set(blocked)
    run = subprocess.run([sys.executable, "-c", PLUGIN, json.dumps(blocked)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == sorted(PREFIX + arch for arch in SUPPORTED)
