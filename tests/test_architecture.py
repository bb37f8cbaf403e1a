"""The layers stay layers: each part of bot/ imports only parts below it, nothing imports in a
circle, and only the conversation layer touches the store. Read from the code's own imports
(all of them: module level, inside functions, and type-only ones), so a new shortcut fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = [
    ("formats", ("bot.formats",)),
    ("config", ("bot.config",)),
    ("engine", ("bot.engine",)),
    ("conversations", ("bot.conversations", "bot.health")),
    ("front ends", ("bot.discord_adapter", "bot.terminal")),
    ("command line", ("bot.cli", "bot.__main__", "bot")),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "bot").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The bot modules `path` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "bot":
                found.add(target)
    return found


def layer_of(module: str) -> int:
    best = (-1, -1)
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), i))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py"
    return best[1]


GRAPH = {name: imports_of(path, name, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module: str) -> None:
    upward = [m for m in GRAPH[module] if layer_of(m) > layer_of(module)]
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from a higher layer: {upward}"


def test_no_import_circles() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [module, target]) if target in path else f"{module} -> {target}")
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_only_the_conversation_layer_touches_the_store() -> None:
    touching = sorted(m for m, targets in GRAPH.items() if "bot.conversations.store" in targets and not m.startswith("bot.conversations."))
    assert touching == []
    for module, path in modules().items():
        if not module.startswith("bot.conversations."):
            assert ".store." not in path.read_text(), f"{module} reaches into ChatService's store"


def test_the_engine_knows_nothing_of_conversations_or_discord() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("bot.engine"):
            assert not [t for t in targets if t.startswith(("bot.conversations", "bot.discord_adapter", "bot.terminal"))], module
