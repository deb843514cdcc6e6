"""The project's modules import one another one way (STYLE.md point 13): no cycle, counting the imports
inside functions, which run later but still tie the two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

from trainer_runs import ROOT

PACKAGES = ("gpt2_scratch", "data_prep", "eval", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project (its top-level files and packages; not the tests), by dotted name."""
    files = [p for p in ROOT.glob("*.py")]
    for package in PACKAGES:
        files += (ROOT / package).rglob("*.py")
    return {module_name(p): p for p in files if ".venv" not in p.parts}


def imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool) -> list[str]:
    """The dotted names an import statement in module `name` may load: `from a import b` names `a.b`
    too, since `b` may be a submodule; a relative import is resolved against `name`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, at any depth, but those under `if TYPE_CHECKING:` (for type
    checkers only: they never run)."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                found += imports(ast.Module(body=[child], type_ignores=[]))
        else:
            found += imports(node)
    return found


def deepest_module(target: str, modules: dict[str, Path]) -> str | None:
    """The deepest project module that the dotted name `target` names (`a.b.c` may be module `a.b`'s `c`)."""
    parts = target.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it (top level, functions, `if` blocks). An
    import of `a.b.c` is an edge to the deepest project module it names: a package's own submodules
    loading through its `__init__` is not a dependency of that `__init__` on them."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in imports(tree):
            for target in imported(node, name, path.name == "__init__.py"):
                # benchmarks/ is on the path of its scripts (they put it there): `import bench_ladder` in one
                # of them loads benchmarks/bench_ladder.py
                places = [target, f"benchmarks.{target}"] if name.startswith("benchmarks.") else [target]
                found = next((module for place in places if (module := deepest_module(place, modules))), None)
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_names_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # write_scratch_export imports the tokenizer inside the function; the trainer imports training.* at the top.
    assert "data_prep.tokenizer" in graph["gpt2_scratch.training.export"]
    assert {"gpt2_scratch.training.config", "gpt2_scratch.training.checkpoints"} <= graph["train_accelerate"]
    assert "gpt2_scratch.user_errors" in graph["gpt2_scratch.training"]
    # gpu_check.py's package, imported from benchmarks/ on the path and relatively inside it, and bench_ladder,
    # imported inside a function of one of its modules
    assert {"benchmarks.gpu_checks", "benchmarks.gpu_checks.fsdp"} <= graph["benchmarks.gpu_check"]
    assert "benchmarks.gpu_checks.evaluation" in graph["benchmarks.gpu_checks.fsdp"]
    assert "benchmarks.bench_ladder" in graph["benchmarks.gpu_checks.ladder"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_store_and_hub_modules_take_values_not_the_training_config():
    """`gpt2_scratch.training.config` validates a checkpoint_remote URL by calling
    `gpt2_scratch.training.remote`: remote (and the hub module it uses) take the values they need, and
    import the config not even for type hints."""
    for module in ("gpt2_scratch.training.remote", "gpt2_scratch.training.hub"):
        path = project_modules()[module]
        named = {
            target
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in imported(node, module, False)
        }
        assert not {name for name in named if name.startswith("gpt2_scratch.training.config")}, module
