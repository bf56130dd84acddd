"""The plugin's start-up rules over a vLLM release's sources, without installing it.

No CPU build of vLLM 0.33 or newer exists, so CI cannot import those releases; it downloads each
supported release's wheel (``pip download --no-deps``), reads its Python files, and applies the
rules the plugin applies at start-up (``hooks``) through a lookup that reads the syntax tree instead
of importing:

- every required hook group (``hooks.required``, ``hooks.hook_problem``): names, parameters, the
  names a hooked source must use;
- each architecture's registry resolution: the class vLLM's own registry resolves
  (``registry.py``'s tables and its ``_resolve_module_name`` rule), that the hooks are checked on and
  the DeSAP class subclasses, and the processor it registers (``hooks.processor_problem``);
- the V2 runners' pruner interface (a hook group of its own).

How names resolve here: imports are followed to the defining module (``from x import *``
included); where a name is bound more than once at module level (``if current_platform.is_cuda():
from .nvidia ... else: from ...``) the first binding wins, which in vLLM's platform switches is the
CUDA branch: the code a GPU user runs. Class attributes follow the bases in C3 order, as Python does;
a base outside vLLM (torch's ``nn.Module``) ends the walk.

    python -m desap_ops.integrations.vllm.release_check 0.34.0 [0.33.0 ...] [--cache DIR]
    python -m desap_ops.integrations.vllm.release_check --sources DIR   # a folder that holds vllm/

Prints each release's problems and exits 1 if any release has one.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from .hooks import (BINDINGS, GROUPS, PROCESSORS, REGISTRY, SUPPORTED_VLLM, Found, HookGroup, SoleBinding,
                    binding_problems, package_modules, problems, processor_problem)
from .pins import pin_problems, read_under

CACHE = Path.home() / ".cache" / "desap-ops" / "vllm-sources"
_REGISTRY_MODULE = "vllm.model_executor.models.registry"
# the attribute MultiModalRegistry.register_processor sets on the class it decorates (hooked, with
# that name in its source, in hooks.GROUPS)
_SET_BY_DECORATOR = {"register_processor": "_processor_factory"}


@dataclass(frozen=True)
class Definition:
    """What a name is bound to in a release's sources."""
    kind: str        # "module", "class", "function" or "value"
    module: str      # the module that defines it
    node: Optional[ast.AST] = None


class ReleaseSources:
    """One release's Python sources (a folder that holds ``vllm/``), looked up as the plugin's
    start-up check looks up the installed vLLM."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not (self.root / "vllm" / "__init__.py").is_file():
            raise ValueError(f"{root} holds no vllm/ package")

    # modules ------------------------------------------------------------------------------------
    def _file(self, module: str) -> Optional[Path]:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    def has_module(self, module: str) -> bool:
        return self._file(module) is not None

    @lru_cache(maxsize=None)
    def _parsed(self, module: str) -> tuple[ast.Module, str, bool]:
        path = self._file(module)
        if path is None:
            raise LookupError(module)
        source = path.read_text(encoding="utf-8")
        return ast.parse(source), source, path.name == "__init__.py"

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        _, _, is_package = self._parsed(module)
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        base = base[:len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    # names ---------------------------------------------------------------------------------------
    @staticmethod
    def _statements(body):
        """Module-level statements in order, into if/else and try blocks (first binding wins)."""
        for statement in body:
            yield statement
            if isinstance(statement, ast.If):
                yield from ReleaseSources._statements(statement.body)
                yield from ReleaseSources._statements(statement.orelse)
            elif isinstance(statement, ast.Try):
                for block in (statement.body, *(h.body for h in statement.handlers), statement.orelse,
                              statement.finalbody):
                    yield from ReleaseSources._statements(block)

    @lru_cache(maxsize=None)
    def resolve(self, module: str, name: str) -> Definition:
        """``name`` as ``module`` binds it, followed through imports to where it is defined."""
        tree, _, _ = self._parsed(module)
        stars = []
        for statement in self._statements(tree.body):
            if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name == name:
                return Definition("class" if isinstance(statement, ast.ClassDef) else "function", module, statement)
            if isinstance(statement, (ast.Assign, ast.AnnAssign)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return Definition("value", module, statement)
            if isinstance(statement, ast.ImportFrom):
                source = self._absolute(module, statement)
                for alias in statement.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        if self.has_module(f"{source}.{alias.name}"):
                            try:
                                return self.resolve(source, alias.name)
                            except LookupError:
                                return Definition("module", f"{source}.{alias.name}")
                        return self.resolve(source, alias.name)
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if alias.asname == name:
                        return Definition("module", alias.name)
        for source in stars:
            try:
                return self.resolve(source, name)
            except LookupError:
                continue
        if self.has_module(f"{module}.{name}"):
            return Definition("module", f"{module}.{name}")
        raise LookupError(f"{module}:{name}")

    def _base(self, definition: Definition, expression: ast.AST) -> Optional[Definition]:
        """A class's base, where it is a class in these sources (None for torch's and Python's)."""
        if isinstance(expression, ast.Subscript):   # Generic[_I]
            expression = expression.value
        path = []
        while isinstance(expression, ast.Attribute):
            path.insert(0, expression.attr)
            expression = expression.value
        if not isinstance(expression, ast.Name):
            return None
        try:
            found = self.resolve(definition.module, expression.id)
            for name in path:
                found = self.resolve(found.module, name) if found.kind == "module" else None
        except LookupError:
            return None
        return found if found is not None and found.kind == "class" else None

    def mro(self, definition: Definition) -> list[Definition]:
        """The class and its bases in these sources, in C3 order."""
        bases = [b for b in (self._base(definition, e) for e in definition.node.bases) if b is not None]
        sequences = [self.mro(b) for b in bases] + [bases]
        order = [definition]
        while any(sequences):
            for sequence in sequences:
                head = sequence[0] if sequence else None
                if head is not None and not any(head in s[1:] for s in sequences):
                    break
            else:
                raise LookupError(f"no C3 order for {definition.node.name}")
            order.append(head)
            sequences = [s[1:] if s and s[0] == head else s for s in sequences]
        return order

    def attribute(self, definition: Definition, name: str) -> Definition:
        if definition.kind == "module":
            return self.resolve(definition.module, name)
        if definition.kind != "class":
            raise LookupError(name)
        for cls in self.mro(definition):
            for statement in cls.node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and statement.name == name:
                    return Definition("class" if isinstance(statement, ast.ClassDef) else "function", cls.module,
                                      statement)
                targets = (statement.targets if isinstance(statement, ast.Assign)
                           else [statement.target] if isinstance(statement, ast.AnnAssign) else [])
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return Definition("value", cls.module, statement)
            if any(_decorator_name(d) in _SET_BY_DECORATOR and _SET_BY_DECORATOR[_decorator_name(d)] == name
                   for d in cls.node.decorator_list):
                return Definition("value", cls.module, cls.node.decorator_list[0])
        raise LookupError(name)

    # the registry --------------------------------------------------------------------------------
    @lru_cache(maxsize=None)
    def registry_table(self) -> dict[str, tuple[str, str]]:
        """Every architecture in ``registry.py``'s tables: (module, class), with the release's rule
        for module names (relative to ``vllm.model_executor.models`` unless they start with ``vllm.``)."""
        tree, _, _ = self._parsed(_REGISTRY_MODULE)
        table = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Tuple)
                            and len(value.elts) == 2 and all(isinstance(e, ast.Constant) for e in value.elts)):
                        module, cls = (e.value for e in value.elts)
                        table.setdefault(key.value, (module if module.startswith("vllm.")
                                                     else f"vllm.model_executor.models.{module}", cls))
        return table

    def registered_class(self, architecture: str) -> Definition:
        try:
            module, name = self.registry_table()[architecture]
        except KeyError:
            raise LookupError(f"{architecture} is not in vLLM's model registry") from None
        found = self.resolve(module, name)
        if found.kind != "class":
            raise LookupError(f"{module}:{name} is not a class")
        return found

    # what hooks.hook_problem asks ----------------------------------------------------------------
    def find(self, target: str) -> Definition:
        if target.startswith(REGISTRY):
            architecture, _, path = target[len(REGISTRY):].partition(".")
            found = self.registered_class(architecture)
        else:
            module, _, path = target.partition(":")
            if not self.has_module(module):
                raise LookupError(module)
            found = Definition("module", module)
        for name in filter(None, path.split(".")):
            found = self.attribute(found, name)
        return found

    def lookup(self, target: str) -> Found:
        found = self.find(target)
        _, source, _ = self._parsed(found.module)
        # padded: a method's first line keeps its indentation, so the text dedents and parses alone
        text = source if found.node is None else ast.get_source_segment(source, found.node, padded=True)
        if found.kind == "function":
            params = _parameters(found.node)
        elif found.kind == "class":
            params = self._constructor(found)
        else:
            params = None
        return Found(params, lambda: text, found.module)

    def _constructor(self, definition: Definition) -> Optional[tuple[str, ...]]:
        """A class's call parameters: its ``__init__``'s, or a dataclass's fields."""
        order = self.mro(definition)
        for cls in order:
            for statement in cls.node.body:
                if isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
                    return _parameters(statement)
        if any("dataclass" in map(_decorator_name, cls.node.decorator_list) for cls in order):
            fields = []
            for cls in reversed(order):
                for statement in cls.node.body:
                    if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                            and "ClassVar" not in ast.unparse(statement.annotation)
                            and "init=False" not in (ast.unparse(statement.value) if statement.value else "")
                            and statement.target.id not in fields):
                        fields.append(statement.target.id)
            return tuple(fields)
        return None

    def processor_problem(self, architecture: str) -> Optional[str]:
        """The processor the registry's class registers (the first ``register_processor`` in its
        bases' order), by the rule the plugin applies at import (``hooks.processor_problem``)."""
        for cls in self.mro(self.registered_class(architecture)):
            for decorator in cls.node.decorator_list:
                if _decorator_name(decorator) == "register_processor" and decorator.args:
                    argument = decorator.args[0]
                    if not isinstance(argument, ast.Name):
                        return f"vLLM's {architecture} registers a processor this check cannot read"
                    found = self.resolve(cls.module, argument.id)
                    _, source, _ = self._parsed(found.module)
                    qualified = f"{found.module}:{found.node.name}" if found.kind == "class" else None
                    return processor_problem(architecture, qualified, ast.get_source_segment(source, found.node))
        return f"vLLM's {architecture} registers no multimodal processor"


def _decorator_name(decorator: ast.AST) -> str:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _parameters(function: ast.FunctionDef) -> tuple[str, ...]:
    """Parameter names as ``inspect.signature`` gives them for the function looked up on its class."""
    arguments = function.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args)]
    names += [f"*{arguments.vararg.arg}"] if arguments.vararg else []
    names += [a.arg for a in arguments.kwonlyargs]
    names += [f"**{arguments.kwarg.arg}"] if arguments.kwarg else []
    if "classmethod" in map(_decorator_name, function.decorator_list) or names[:1] == ["self"]:
        names = names[1:]
    return tuple(names)


def release_version(root: Path) -> Optional[str]:
    """The version a release's ``vllm/_version.py`` names (None where it has none: a made-up tree)."""
    path = Path(root) / "vllm" / "_version.py"
    if not path.is_file():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)):
            return node.value.value
    return None


def check_release(root: Path, groups: Iterable[HookGroup] = GROUPS, bindings: Iterable[SoleBinding] = BINDINGS,
                  architectures: Iterable[str] = PROCESSORS) -> list[str]:
    """Every problem the plugin would refuse this release's sources for (empty: it would run): the
    hook ``groups``' names and wiring, every module of the release binding a name the plugin
    replaces (``bindings``: here the whole release, at start-up only its runners), each
    architecture's registered processor, and, where the release names its version, the pinned V2
    modules (``pins``: a change forces a review). The defaults are the plugin's whole table."""
    sources = ReleaseSources(root)
    found = problems(groups, sources.lookup, sources.has_module)
    found += binding_problems(bindings, package_modules(sources.root, "vllm"))
    version = release_version(sources.root)
    if version is not None:
        found += pin_problems(version, read_under(sources.root))
    for architecture in architectures:
        try:
            problem = sources.processor_problem(architecture)
        except LookupError as error:
            problem = f"{architecture}: {error}"
        if problem:
            found.append(problem)
    return found


def release_sources(version: str, cache: Path = CACHE) -> Path:
    """vLLM ``version``'s Python sources, from its wheel (downloaded once, never installed)."""
    folder = cache / version
    if (folder / "vllm" / "__init__.py").is_file():
        return folder
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    f"vllm=={version}", "-d", str(wheels)], check=True)
    wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
    partial = cache / f"{version}.partial"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(partial, [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    partial.rename(folder)
    wheel.unlink()   # hundreds of MB, and only its Python files are read
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m desap_ops.integrations.vllm.release_check",
                                     description="The vLLM plugin's start-up rules over releases' sources.")
    parser.add_argument("versions", nargs="*", help=f"vLLM releases (default: {', '.join(SUPPORTED_VLLM)})")
    parser.add_argument("--sources", type=Path, help="a folder that holds a release's vllm/ package")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where downloaded sources are kept")
    args = parser.parse_args(argv)
    releases = ({str(args.sources): args.sources} if args.sources
                else {v: release_sources(v, args.cache) for v in args.versions or SUPPORTED_VLLM})
    failed = False
    for name, root in releases.items():
        found = check_release(root)
        failed |= bool(found)
        print(f"vLLM {name}: " + ("every hook holds" if not found else f"{len(found)} problems"))
        for problem in found:
            print(f"  {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
