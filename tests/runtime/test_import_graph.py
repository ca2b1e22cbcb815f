"""runtime/ has no import cycle, counting imports inside functions too (a lazy import is still a loop)."""

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
PREFIX = "tilecore.runtime"


def module_name(path: Path) -> str:
    parts = path.relative_to(RUNTIME).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PREFIX, *parts))


def walk_runtime_code(tree: ast.AST):
    """ast.walk, less `if TYPE_CHECKING:` blocks (imports for type checkers only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """The tilecore.runtime modules a module imports anywhere in its body; `from P import m` counts P.m when
    that is a module, else P."""
    found = set()
    for node in walk_runtime_code(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(RUNTIME.rglob("*.py"))
    known = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        graph[name] = imported_modules(ast.parse(path.read_text(), str(path)), known) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_planted_cycles_and_passes_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": set(), "a": {"x", "b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_lazy_imports_are_edges_too() -> None:
    known = {"tilecore.runtime.a", "tilecore.runtime.pkg", "tilecore.runtime.pkg.b"}
    tree = ast.parse("def f():\n    from tilecore.runtime.pkg import b\n    import tilecore.runtime.a\n")
    assert imported_modules(tree, known) == {"tilecore.runtime.pkg.b", "tilecore.runtime.a"}
    typing_only = ast.parse(
        "if TYPE_CHECKING:\n    import tilecore.runtime.a\nelse:\n    import tilecore.runtime.pkg\n"
    )
    assert imported_modules(typing_only, known) == {"tilecore.runtime.pkg"}


def test_runtime_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "tilecore.runtime.engines.opener" in graph and "tilecore.runtime.predictor" in graph
    assert "tilecore.runtime.engines.base" in graph["tilecore.runtime.engines.openvino"]  # the graph sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
