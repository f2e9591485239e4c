"""Check the package's layering rules by reading every module's imports with ``ast``.

    python scripts/check_layers.py        # prints each broken rule; exit 1 if any, 0 if none

The rules (DESIGN.md's rooms, STYLE.md's "imports point one way"):
- protocol/ imports no trio, libp2p or torch (sans-IO);
- model/ imports nothing of swarm_node.node, dht or protocol (pure torch);
- compression/ imports nothing of swarm_node.node or model;
- dht/ imports nothing of model;
- node/server/ and node/client/ never import each other;
- no module outside node/net/ and dht/ imports libp2p (imports under ``if TYPE_CHECKING:`` aside);
- no module uses another module's private name: ``from x import _name``, or ``obj._name`` where
  ``_name`` is not defined in the module itself (``self._x``, ``def _x``, ``_X = ...``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "swarm_node"

# (room, a module prefix it must not import, why)
FORBIDDEN: list[tuple[str, str, str]] = [
    ("swarm_node.protocol", "trio", "protocol/ is sans-IO"),
    ("swarm_node.protocol", "libp2p", "protocol/ is sans-IO"),
    ("swarm_node.protocol", "torch", "protocol/ carries tensors as compression payloads"),
    ("swarm_node.model", "swarm_node.node", "model/ knows nothing of peers"),
    ("swarm_node.model", "swarm_node.dht", "model/ knows nothing of peers"),
    ("swarm_node.model", "swarm_node.protocol", "model/ knows nothing of the wire"),
    ("swarm_node.compression", "swarm_node.node", "compression/ is pure codecs"),
    ("swarm_node.compression", "swarm_node.model", "compression/ is pure codecs"),
    ("swarm_node.dht", "swarm_node.model", "dht/ knows nothing of models' weights"),
    (
        "swarm_node.node.server",
        "swarm_node.node.client",
        "server/ and client/ never import each other",
    ),
    (
        "swarm_node.node.client",
        "swarm_node.node.server",
        "server/ and client/ never import each other",
    ),
]
LIBP2P_ROOMS = ("swarm_node.node.net", "swarm_node.dht")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import not under ``if TYPE_CHECKING:``."""

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for other in child.orelse:
                    yield from walk_one(other)
                continue
            yield from walk_one(child)

    def walk_one(node: ast.AST) -> Iterator[ast.AST]:
        yield node
        yield from walk(node)

    package = module if is_package else module.rsplit(".", 1)[0]
    for node in walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base, [a.name for a in node.names]


def defined_private_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_")}


# the standard library's public names that start with an underscore
STDLIB_PUBLIC = {"os._exit", "sys._getframe"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check_file(path: Path) -> list[str]:
    rel = str(path.relative_to(ROOT))
    return check_source(
        path.read_text(), module_name(path), rel, is_package=path.name == "__init__.py"
    )


def check_source(source: str, module: str, rel: str, *, is_package: bool = False) -> list[str]:
    """The broken rules of one module's ``source`` (``module``: its dotted name; ``rel``: its path;
    ``is_package``: it is a package's __init__, which anchors relative imports at itself)."""
    tree = ast.parse(source, filename=rel)
    problems = []
    for line, target, names in imports(tree, module, is_package):
        for room, banned, why in FORBIDDEN:
            if under(module, room) and under(target, banned):
                problems.append(f"{rel}:{line}: imports {target} ({why})")
        if under(target, "libp2p") and not any(under(module, r) for r in LIBP2P_ROOMS):
            problems.append(
                f"{rel}:{line}: imports {target} (only node/net/ and dht/ import libp2p)"
            )
        if under(target, "swarm_node"):
            for name in names:
                if is_private(name):
                    problems.append(f"{rel}:{line}: imports the private name {name} from {target}")
    own = defined_private_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            owner = ast.unparse(node.value)
            if f"{owner}.{node.attr}" in STDLIB_PUBLIC:
                continue
            problems.append(
                f"{rel}:{node.lineno}: uses {owner}.{node.attr}, a private name of another module"
            )
    return problems


def main() -> int:
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in check_file(path)]
    for problem in problems:
        print(problem)
    files = len(list(PACKAGE.rglob("*.py")))
    print(f"check_layers: {len(problems)} broken rule(s) in {files} modules", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
