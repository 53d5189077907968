"""No circles among the library's imports (at the top or inside functions): each module reads, and loads, after the ones it uses."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sdcourse"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdcourse"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sdcourse.")}
    return (found & modules) - {path.stem}


def test_no_module_imports_itself_through_others():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: imports_of(PACKAGE / f"{m}.py", modules) for m in modules}
    circles = []

    def walk(module, path):
        for other in graph[module]:
            if other == path[0]:
                circles.append(path + [other])
            elif other not in path and other > path[0]:  # each circle once, from its smallest module
                walk(other, path + [other])
    for module in sorted(modules):
        walk(module, [module])
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)

