"""The import rule of engram's layers, and one of each shared piece, checked on the source.

Layers, bottom up (README, Development):
    ground floor  errors, registry, schema, config, stats, results,  imports nothing above it
                  frames, optimizers, plugins
    libraries     data, models, metrics, importance, methods, training,
                  batched_training
    experiments   engram.experiments.*                               the harness and the experiments
    reports       engram.reports.*                                   tables, figures, summaries
    cli           engram.cli, engram.__main__, engram.api        the entry points
A module imports only its own layer or lower ones (reports may read the experiments' record
types), and never another module's private `_name`. Imports anywhere in a file count, lazy
ones inside functions too. One exception: the package root re-exports a few names of higher
layers on first use (engram.__getattr__), a facade that nothing below it imports through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "engram"
GROUND = {"engram", "engram.errors", "engram.registry", "engram.schema", "engram.config",
          "engram.stats", "engram.results", "engram.frames", "engram.optimizers",
          "engram.plugins", "engram.version"}
LIBRARIES = ("engram.data", "engram.models", "engram.metrics", "engram.importance",
             "engram.methods", "engram.training", "engram.batched_training")
RANK = {"ground": 0, "library": 1, "experiments": 2, "reports": 3, "cli": 4}
ROOT_REEXPORTS = {"engram.data.user", "engram.api"}  # engram.stream_from, engram.fit: imported
# in engram.__getattr__


def module_name(path: Path) -> str:
    parts = ("engram",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    if module in GROUND:
        return "ground"
    if module.startswith(LIBRARIES):
        return "library"
    for top in ("experiments", "reports"):
        if module.startswith(f"engram.{top}"):
            return top
    if module in ("engram.cli", "engram.__main__", "engram.api"):
        return "cli"
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py and "
                         "the README's Development section")


def imports(path: Path) -> list[tuple[str, str]]:
    """(imported engram module, name imported from it or '') for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "engram":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:  # `from engram.data import problems`
                    found.append((submodule, ""))
                else:
                    found.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names
                      if alias.name.split(".")[0] == "engram"]
    return found


GRAPH = {name: {imported for imported, _ in imports(path) if imported in MODULES} - {name}
         for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None: depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_engrams_modules():
    # The root's lazy re-exports run on first attribute access, after `import engram` is
    # done (modules below read engram.__version__): not an import cycle.
    graph = {**GRAPH, "engram": GRAPH["engram"] - ROOT_REEXPORTS}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_layer_or_lower_ones(module):
    mine = layer(module)
    for imported in sorted(GRAPH[module]):
        if module == "engram" and imported in ROOT_REEXPORTS:
            continue
        theirs = layer(imported)
        allowed = RANK[theirs] <= RANK[mine] and not (mine == "experiments" and theirs == "reports")
        assert allowed, f"{module} ({mine}) imports {imported} ({theirs})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(module):
    for imported, name in imports(MODULES[module]):
        assert not (name.startswith("_") and name != "__version__"), \
            f"{module} imports the private {imported}.{name}: make it public where it lives"


def defining(pattern: str) -> list[str]:
    """The modules whose source contains `pattern`."""
    return sorted(name for name, path in MODULES.items() if pattern in path.read_text())


def test_one_run_id_function_one_worker_pool_one_writer_one_t_interval():
    assert defining("hashlib.sha256(") == ["engram.experiments.harness"]
    assert defining("import multiprocessing") == ["engram.experiments.harness"]
    assert defining("def exit_with_parent(") == ["engram.experiments.harness"]
    assert defining("csv.DictWriter(") == ["engram.results"]
    assert defining("def t_interval(") == ["engram.stats"]
    assert defining("def auc(") == ["engram.stats"]
    assert defining("torch.set_num_threads(") == ["engram.experiments.jobs"]


def test_a_registry_is_filled_by_its_home_module_on_first_lookup():
    """The ground floor names registries without importing the libraries that fill them; the
    first lookup imports the home module (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; import engram.config; from engram.registry import METHODS, PROBLEMS; "
            "assert 'engram.methods' not in sys.modules; assert 'ewc' in METHODS; "
            "assert 'engram.methods' in sys.modules; assert 'bit_flipping' in PROBLEMS.names()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
