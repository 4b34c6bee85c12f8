"""The package's shape: every module sits in a layer (bottom, core, adapters), the import graph has no cycle and
points down only, the core imports no kvpress, gates/ is imported for gates only, the decision and the cache surgery
each live in one place, and the public names import."""

import ast
import subprocess
import sys
from pathlib import Path

import fastkvzip_press

PACKAGE = Path(fastkvzip_press.__file__).parent
# Every top-level module or package of fastkvzip_press, by layer; a module imports only its own layer or the ones
# below (adapters may use one another as listed in ADAPTER_USES).
BOTTOM = ("layout", "atomic", "checks")
CORE = ("gates", "eviction", "cache", "triton", "paged")
ADAPTERS = ("presses", "saved_cache", "vllm", "training", "evaluation", "models", "cli")
ADAPTER_USES = {
    "presses": set(),
    "saved_cache": {"presses"},  # masked contexts put kvpress's masked positions back
    "vllm": {"models"},  # runs where kvpress cannot be installed (vLLM needs transformers >= 5.16, kvpress < 5.3)
    "training": {"models"},
    "evaluation": {"presses", "models"},
    "models": set(),
    "cli": {"presses", "saved_cache", "training", "evaluation", "models"},
}
ABOVE_CORE = ADAPTERS


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules ``path`` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def package_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package import counts as its ``__init__``)."""
    return {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    """The top-level part of a package module's name (``None`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_sits_in_a_layer_and_imports_only_down():
    layers = {**dict.fromkeys(BOTTOM, 0), **dict.fromkeys(CORE, 1), **dict.fromkeys(ADAPTERS, 2)}
    unplaced = {layer_of(name) for name in MODULES} - set(layers) - {None}
    assert not unplaced, f"modules in no layer of tests/test_package.py: {sorted(unplaced)}"
    for name, edges in package_graph().items():
        here = layer_of(name)
        for imported in edges:
            there = layer_of(imported)
            if here is None or there is None or there == here:
                continue
            allowed = (
                layers[there] < layers[here]
                or layers[there] == layers[here] == 1  # core packages build on one another (no cycle: see below)
                or there in ADAPTER_USES.get(here, set())
            )
            assert allowed, f"{name} imports {imported}: {there} is not below {here}"


def test_gates_are_imported_for_gates_only():
    """Model geometry and file writing live in their own modules at the bottom; what imports gates/ uses gates."""
    gate_names = set(__import__("fastkvzip_press.gates", fromlist=["__all__"]).__all__)
    for name, path in MODULES.items():
        if layer_of(name) == "gates":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastkvzip_press.gates"):
                names = {alias.name for alias in node.names}
                if node.module == "fastkvzip_press.gates":
                    assert names <= gate_names, f"{name} imports {names - gate_names} from gates"
                else:
                    assert node.module in ("fastkvzip_press.gates.gate", "fastkvzip_press.gates.formats"), name


def test_the_core_imports_neither_kvpress_nor_what_sits_above_it():
    for name, path in MODULES.items():
        if name.split(".")[1:2] and name.split(".")[1] in CORE:
            for imported in imports_of(path):
                top = imported.split(".")
                assert top[0] != "kvpress", f"{name} imports {imported}"
                assert not (top[0] == "fastkvzip_press" and len(top) > 1 and top[1] in ABOVE_CORE), (
                    f"{name} imports {imported}"
                )


def test_no_import_cycle_between_modules():
    graph = package_graph()
    # The top-level package imports its public names lazily, so it is not an edge of the graph.
    graph = {name: {m for m in edges if m != "fastkvzip_press"} for name, edges in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_vllm_integration_builds_on_the_core_alone():
    """It runs where kvpress cannot be installed (vLLM needs transformers >= 5.16, kvpress pins < 5.3)."""
    for name, path in MODULES.items():
        if name.startswith("fastkvzip_press.vllm"):
            for imported in imports_of(path):
                top = imported.split(".")
                assert top[0] != "kvpress", f"{name} imports {imported}"
                assert not (
                    top[0] == "fastkvzip_press" and top[1:2] and top[1] in ("presses", "training", "evaluation", "cli")
                ), f"{name} imports {imported}"


def test_importing_the_core_loads_no_kvpress():
    code = (
        "import sys; import fastkvzip_press.gates, fastkvzip_press.eviction, fastkvzip_press.cache, "
        "fastkvzip_press.triton, fastkvzip_press.paged; sys.exit(int('kvpress' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def calls_in(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_one_decision_function_and_one_writer_of_cache_layers_and_masked_indices():
    selectors = {name for name, path in MODULES.items() if calls_in(path) & {"select_smallest", "select_smallest_rows"}}
    assert selectors <= {"fastkvzip_press.eviction.decision", "fastkvzip_press.triton.select_smallest"}
    deciders = {name for name, path in MODULES.items() if "decide" in calls_in(path)}
    assert deciders == {
        "fastkvzip_press.eviction.chunk_plan",  # a chunk span
        "fastkvzip_press.vllm.compaction",  # a request's prompt inside vLLM, at its schedule's points
        "fastkvzip_press.presses.prefill",  # one-pass prefill
        "fastkvzip_press.presses.decoding",  # decoding
    }
    layer_writers, tensor_writers, mask_writers = set(), set(), set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AugAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                        text = ast.unparse(element)
                        if isinstance(element, ast.Subscript) and text.endswith("]") and ".layers[" in text:
                            layer_writers.add(name)  # a cache's layer replaced
                        if cache_layer_tensor(element):
                            tensor_writers.add(name)  # a cache layer's tensors replaced or written in place
                        if text.endswith(".masked_key_indices"):
                            mask_writers.add(name)
    assert layer_writers == {"fastkvzip_press.cache.compaction"}
    assert tensor_writers <= {f"fastkvzip_press.cache.{module}" for module in ("compaction", "stored", "ragged_layer")}
    assert mask_writers == {"fastkvzip_press.presses.compaction"}


def cache_layer_tensor(target: ast.expr) -> bool:
    """Whether an assignment target is a cache layer's key or value tensor (``layer.keys``, ``cache.layers[i].values``,
    ``layer.key_buffer[...]``): the object written is named like a layer."""
    while isinstance(target, ast.Subscript):
        target = target.value
    if not isinstance(target, ast.Attribute) or target.attr not in ("keys", "values", "key_buffer", "value_buffer"):
        return False
    owner = ast.unparse(target.value)
    return owner.endswith("layer") or ".layers[" in owner


def test_public_names_import_lazily_and_all_of_them_resolve():
    for name in fastkvzip_press.__all__:
        assert getattr(fastkvzip_press, name) is not None
    assert set(fastkvzip_press.__all__) <= set(dir(fastkvzip_press))


def test_the_package_reports_the_version_it_was_installed_as():
    from importlib.metadata import version

    assert fastkvzip_press.__version__ == version("fastkvzip-press")


def test_modules_and_functions_stay_small():
    """A module past 400 lines or a function past 80 is split along its jobs."""
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "split these along their jobs:\n" + "\n".join(too_long)
