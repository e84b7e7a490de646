"""The layout: the top-level files import one another without a cycle (lazy imports inside functions included), so
each can be read, and imported, after the files it uses."""
import ast

from conftest import ROOT


def imports(path) -> set:
    """The top-level modules of this repository that a file imports, anywhere in it."""
    ours = {p.stem for p in ROOT.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return (names & ours) - {path.stem}


def test_no_import_cycles():
    graph = {p.stem: imports(p) for p in ROOT.glob("*.py")}
    done, path = set(), []

    def visit(m):  # depth-first; a module met again on the current path closes a cycle
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
