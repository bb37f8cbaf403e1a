"""The project installed as a container build installs it: not editable, from a copy of the
source, with the source nowhere on the import path.

An editable install (the README's, and the tests' own) imports `bot` from the source tree,
so a subpackage missing from pyproject.toml's list, or the migrations left out of the
package, goes unseen until a container starts. Here pip builds and installs the project
into a folder of its own; every module of the installed `bot` package must be there and
import, and the numbered .sql files must ship inside it as `bot.migrations`."""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CHECK = """
import importlib, json, pkgutil, sys
from importlib.resources import files
from pathlib import Path
import bot
modules = sorted(m.name for m in pkgutil.walk_packages(bot.__path__, "bot.") if m.name != "bot.__main__")  # __main__ runs the CLI
for name in modules:
    importlib.import_module(name)
from bot.conversations.store import load_migrations
print(json.dumps({
    "bot": str(Path(bot.__file__).resolve().parent),
    "modules": modules,
    "sql": sorted(f.name for f in files("bot.migrations").iterdir() if f.name.endswith(".sql")),
    "sql_folders": sorted({str(Path(str(f)).resolve().parent) for f in files("bot.migrations").iterdir()}),
    "migrations": [m.version for m in load_migrations()],
    "source_on_path": any(Path(p or ".").resolve() == Path(sys.argv[1]) for p in sys.path),
}))
"""


def test_a_non_editable_install_holds_every_module_and_the_migrations(tmp_path: Path) -> None:
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache", "build", "dist", "*.egg-info"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (site / "bin" / "llamabot").exists()  # the console script too

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", CHECK, str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)

    assert found["bot"] == str((site / "bot").resolve()) and not found["source_on_path"]  # the installed copy, not the source
    expected = sorted(m.name for m in pkgutil.walk_packages([str(ROOT / "bot")], "bot.") if m.name != "bot.__main__")
    assert found["modules"] == expected  # every module of the source tree was installed (and imported)
    assert len(expected) > 30
    shipped = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert found["sql"] == shipped and found["sql_folders"] == [str((site / "bot" / "migrations").resolve())]
    assert found["migrations"] == [int(name.split("_")[0]) for name in shipped]
