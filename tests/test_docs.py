"""The documentation kept in step with the code.

docs/configuration.md has one table row per variable the code reads. The variables are
found by reading the code, not a list kept here: every `put(target, "field", take("ENV",
parser))` in `bot.config.load_settings` (parsed with `ast`), and every `os.environ` /
`os.getenv` read elsewhere in `bot/`. A variable added without a row, a row for a variable
nothing reads, a default that is not the `Settings` default, or an allowed range that is not
the parser's, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import bot.config as config
from bot.config import BUNDLED_MODEL_FILE, Sampling, Settings
from tests.conftest import ROOT

CONFIG_DOC = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Variable:
    """One variable as `load_settings` reads it."""

    env: str
    target: str  # "kwargs" (a Settings field) or "sampling" (a Sampling field)
    field: str
    parser: ast.expr  # the parser passed to take()


def _load_settings() -> ast.FunctionDef:
    tree = ast.parse((ROOT / "bot" / "config.py").read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "load_settings")


def settings_variables() -> list[Variable]:
    """Every `put(target, "field", take("ENV", parser))` in load_settings."""
    found = []
    for node in ast.walk(_load_settings()):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "put":
            target, field, value = node.args
            assert isinstance(target, ast.Name) and isinstance(field, ast.Constant), ast.unparse(node)
            assert isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "take", ast.unparse(node)
            env = value.args[0]
            assert isinstance(env, ast.Constant) and isinstance(env.value, str), ast.unparse(node)
            found.append(Variable(env.value, target.id, field.value, value.args[1]))
    return found


def other_reads() -> set[str]:
    """Variables read from the environment anywhere in bot/ outside load_settings:
    os.environ.get("X"), os.environ["X"], os.getenv("X"), values.get("X")."""
    names: set[str] = set()
    for path in (ROOT / "bot").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            key: ast.expr | None = None
            if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if (node.func.attr == "get" and owner.endswith("environ")) or (node.func.attr == "getenv" and owner == "os"):
                    key = node.args[0]
                if node.func.attr == "get" and owner == "values":  # load_settings' mapping, read around take()
                    key = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add(key.value)
    return names


def documented_rows() -> dict[str, list[str]]:
    """The configuration table: variable -> [default, allowed values, meaning]."""
    rows: dict[str, list[str]] = {}
    for line in CONFIG_DOC.read_text().splitlines():
        match = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \|(.*)\|\s*$", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} has two rows"
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


def true_default(var: Variable) -> object:
    owner = Settings if var.target == "kwargs" else Sampling
    field = next(f for f in dataclasses.fields(owner) if f.name == var.field)
    if field.default_factory is not dataclasses.MISSING:  # computed at start (N_THREADS): documented as unset
        return None
    return field.default


def as_written(value: object) -> str | None:
    """A default as one would write it in .env; None for "unset" (None, or an empty set)."""
    if value is None or value == frozenset() or value == ():
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def test_every_variable_the_code_reads_has_one_row_and_no_row_is_unread() -> None:
    variables = settings_variables()
    assert len(variables) > 40  # the parse found the settings, not an empty function
    taken = {v.env for v in variables}
    every_take = {n.args[0].value for n in ast.walk(_load_settings()) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "take"}
    assert every_take == taken, "a take() outside put(): the documentation test cannot see its field"
    read = taken | other_reads()
    rows = documented_rows()
    assert sorted(read - set(rows)) == [], "variables the code reads with no row in docs/configuration.md"
    assert sorted(set(rows) - read) == [], "rows in docs/configuration.md for variables nothing reads"


def test_each_row_gives_the_true_default() -> None:
    rows = documented_rows()
    for var in settings_variables():
        default = rows[var.env][0]
        written = as_written(true_default(var))
        if written is None:
            assert default.startswith("unset"), f"{var.env}: the default is unset, the row says {default!r}"
        else:
            assert default.startswith(f"`{written}`"), f"{var.env}: the default is {written!r}, the row says {default!r}"
    # Computed defaults: the row names what the code computes.
    assert BUNDLED_MODEL_FILE in rows["MODEL_PATH"][0]
    assert Settings().resolved_kv_disk_dir().name in rows["KV_DISK_DIR"][0]
    assert Settings().resolved_flash_attn_cache().name in rows["FLASH_ATTN"][2]


def _bounds(parser: ast.expr) -> list[object]:
    """The constants a parser checks against: _int/_float ranges, _choice words (evaluated in
    bot.config's namespace, so `1 << 20` and TEMPERATURE_RANGE count as what they are)."""
    body = parser.body if isinstance(parser, ast.Lambda) else parser
    if isinstance(body, ast.Compare):  # ENABLE_THINKING: _choice(...) == "on"
        body = body.left
    if not isinstance(body, ast.Call) or not isinstance(body.func, ast.Name):
        return []
    values: list[object] = []
    for arg in body.args[2:]:
        if isinstance(arg, ast.Starred):  # *TEMPERATURE_RANGE
            arg = arg.value
        value = eval(compile(ast.Expression(arg), "config.py", "eval"), vars(config))  # noqa: S307 (our own source)
        values.extend(value if isinstance(value, tuple) else [value])
    return values


def test_each_row_gives_the_allowed_values_the_parser_checks() -> None:
    rows = documented_rows()
    checked = 0
    for var in settings_variables():
        allowed = rows[var.env][1].replace(",", "")
        for bound in _bounds(var.parser):
            if isinstance(bound, str):  # a word (`on`), or a URL scheme (`https://`)
                pattern = rf"`{re.escape(bound)}(://)?`"
            else:  # a number, not part of a longer one
                pattern = rf"(?<![\d.]){re.escape(as_written(float(bound)) if isinstance(bound, float) else str(bound))}(?![\d.])"
            assert re.search(pattern, allowed), f"{var.env}: {bound!r} is not in {rows[var.env][1]!r}"
            checked += 1
    assert checked > 50


def test_readme_invite_asks_for_exactly_the_permissions_the_bot_needs() -> None:
    from bot.discord_adapter.client import PERMISSIONS

    text = README.read_text()
    asked = set(re.findall(r"permissions=(\d+)", text))
    assert asked == {str(PERMISSIONS.value)}
    assert "Add Reactions" not in text


def test_readme_is_the_front_door_and_its_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 260
    assert text.index("git clone") < text.index("<!-- run-command -->")
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in text, f"README does not link docs/{doc.name}"
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(linked), f"{page.name} links to {target}#{anchor}, which has no such heading"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


def test_the_performance_page_shows_its_chart_and_results_hold_a_run_to_draw() -> None:
    from bench.chart import chosen, parse

    page = (ROOT / "docs" / "performance.md").read_text()
    assert "](performance.png)" in page and (ROOT / "docs" / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "python -m bench.chart" in page
    run = chosen(parse((ROOT / "bench" / "RESULTS.md").read_text()))
    assert "family" in run.cpu and "stepping" in run.cpu  # the chart's title names the CPU in full
    assert run.with_reuse_ms and run.without_reuse_ms and run.only_new_ms and run.per_channel and sorted(run.per_channel) == [1, 2, 4, 8]


def test_chart_reads_each_run_of_a_results_file_apart() -> None:
    from bench.chart import parse

    text = "\n".join([
        "# Benchmark results",
        "Measured 2026-01-01 00:00 UTC on CPU A (family 6, model 1, stepping 2), 2 threads, model a.gguf, Python 3.11.",
        "| Follow-up latency: 4 channels ...; median time to first token with KV reuse vs without | 100 ms vs 900 ms = **9.0x faster** | >= 10x | no |",
        "## Later rows, no header of their own",
        "| Channels per box: tokens/s each channel sees when N channels generate at once (PARALLEL=8) | 1: 9; 2: 8 tok/s |  |  |",
        "Measured 2026-01-02 00:00 UTC on CPU B, x, 4 threads, model b.gguf, Python 3.11.",
        "| Channels per box: tokens/s each channel sees when N channels generate at once (PARALLEL=8) | 1: 30; 2: 20; 4: 12 tok/s |  |  |",
    ])
    a, b = parse(text)
    assert (a.cpu, a.threads, a.model, a.with_reuse_ms, a.without_reuse_ms, a.per_channel) == ("CPU A (family 6, model 1, stepping 2)", 2, "a.gguf", 100.0, 900.0, None)
    assert (b.cpu, b.threads, b.model, b.per_channel) == ("CPU B, x", 4, "b.gguf", {1: 30.0, 2: 20.0, 4: 12.0})
