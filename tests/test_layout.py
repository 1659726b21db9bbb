"""The layout rules of docs/architecture.md, checked on the source: imports point one way
(across packages and between the rooms of serving/), no two modules share a name, serving's
modules stay short, only registry/ touches the database, and all SQL lives in
registry/storage/."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("registry", "tuning", "serving")
# The rooms of serving/ and the rooms each may import; "root" is serving/'s own modules
# (errors, serve_config, metrics), which every room may use.
SERVING_ROOMS = {
    "root": {"root"},
    "engines": {"root", "engines"},
    "watch": {"root", "watch"},
    "runtime": {"root", "engines", "watch", "runtime"},
    "http": {"root", "engines", "watch", "runtime", "http"},
    "cli": {"root", "engines", "watch", "runtime", "http", "cli"},
}
# Each package keeps its typed errors in <package>/errors.py (the house style).
SHARED_NAMES = {"__init__.py", "__main__.py", "errors.py"}
MAX_SERVING_LINES = 400
SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", re.I)
STORAGE = "registry.storage"
# The packages that are not registry/ but import it: none of them may import its storage.
OUTSIDE_REGISTRY = ("tuning", "serving", "loadtests", "examples")


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def name_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def is_storage(module: str) -> bool:
    """registry.storage or a module inside it."""
    return module == STORAGE or module.startswith(STORAGE + ".")


def sql_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string constant of `path` that holds SQL."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value)
    ]


def room(module: str) -> str | None:
    """The room of a serving module: serving.http.app -> http; serving.metrics -> root."""
    parts = module.split(".")
    if parts[0] != "serving":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SERVING_ROOMS else "root"


def existing(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_packages_import_one_way() -> None:
    """tuning -> registry <- serving: registry imports neither, tuning and serving not each
    other."""
    forbidden = {"registry": ("tuning", "serving"), "tuning": ("serving",), "serving": ("tuning",)}
    wrong = [
        f"{name_of(path)} imports {target}"
        for package, banned in forbidden.items()
        for path in modules(package)
        for target in imported(path)
        if target.split(".")[0] in banned
    ]
    assert not wrong, "\n".join(wrong)


def test_serving_rooms_import_one_way() -> None:
    """cli -> http -> runtime -> engines; watch is used by runtime and http and uses none of
    them; the root modules use no room."""
    wrong = []
    for path in modules("serving"):
        source = room(name_of(path))
        assert source is not None
        for target in imported(path):
            into = room(target)
            if into is not None and existing(target) and into not in SERVING_ROOMS[source]:
                wrong.append(f"{name_of(path)} ({source}) imports {target} ({into})")
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_share_a_name() -> None:
    names = Counter(p.name for p in modules(*PACKAGES) if p.name not in SHARED_NAMES)
    twice = {name: n for name, n in names.items() if n > 1}
    assert not twice, twice


def test_serving_modules_stay_short() -> None:
    long = {
        name_of(p): n
        for p in modules("serving")
        if (n := len(p.read_text().splitlines())) > MAX_SERVING_LINES
    }
    assert not long, f"split these modules (over {MAX_SERVING_LINES} lines): {long}"


def test_only_registry_touches_the_database() -> None:
    """serving/ and tuning/ go through Registry: no sqlite3, no registry.storage (so no
    Database or Transaction), no `.db` of a registry, no SQL text."""
    wrong = []
    for path in modules("serving", "tuning"):
        tree = ast.parse(path.read_text(), str(path))
        for target in imported(path):
            if target.split(".")[0] == "sqlite3" or is_storage(target):
                wrong.append(f"{name_of(path)} imports {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "db":
                wrong.append(f"{name_of(path)}:{node.lineno} uses .db")
        wrong += [f"{name_of(path)}:{line} has SQL: {sql[:60]!r}" for line, sql in sql_texts(path)]
    assert not wrong, "\n".join(wrong)


def test_only_registry_imports_its_storage() -> None:
    """registry.storage is imported by modules of registry/ only: tuning/, serving/,
    loadtests/ and examples/ use Registry and the records of registry/'s root."""
    wrong = [
        f"{name_of(path)} imports {target}"
        for path in modules(*OUTSIDE_REGISTRY)
        for target in imported(path)
        if is_storage(target)
    ]
    assert not wrong, "\n".join(wrong)


def test_all_sql_lives_in_registry_storage() -> None:
    """No module of registry/ outside registry/storage/ has SQL text or imports sqlite3: the
    storage seam is the only code a second backend replaces."""
    storage = ROOT.joinpath(*STORAGE.split("."))
    wrong = []
    for path in modules("registry"):
        if path.is_relative_to(storage):
            continue
        wrong += [
            f"{name_of(path)} imports {target}"
            for target in imported(path)
            if target.split(".")[0] == "sqlite3"
        ]
        wrong += [f"{name_of(path)}:{line} has SQL: {sql[:60]!r}" for line, sql in sql_texts(path)]
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_what_they_forbid(tmp_path: Path) -> None:
    """The checks above find a wrong import, a `.db`, a storage import and SQL text when they
    are there."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import sqlite3\nfrom serving.http.app import app\nfrom registry import storage\n"
        "from registry.storage.jobs import queue_job\n"
        "def f(registry):\n    return registry.db.query('SELECT a FROM versions')\n"
    )
    found = imported(sample)
    assert "sqlite3" in found and room("serving.http.app") == "http"
    assert "http" not in SERVING_ROOMS["runtime"]
    assert {"registry.storage", "registry.storage.jobs"} <= {m for m in found if is_storage(m)}
    assert not is_storage("registry.storage_notes") and not is_storage("registry")
    tree = ast.parse(sample.read_text())
    assert any(isinstance(n, ast.Attribute) and n.attr == "db" for n in ast.walk(tree))
    assert SQL.search("SELECT a FROM versions") and not SQL.search("select the adapter")
    assert sql_texts(sample) == [(6, "SELECT a FROM versions")]


def test_docs_name_every_room_and_no_missing_module() -> None:
    """docs/architecture.md names every subpackage of serving/, and each module path it
    mentions exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    for sub in sorted(p.parent.name for p in (ROOT / "serving").glob("*/__init__.py")):
        assert f"serving/{sub}/" in text, f"docs/architecture.md does not describe {sub}/"
    missing = [
        path
        for path in re.findall(r"\b((?:registry|tuning|serving)/[\w/]+\.py)\b", text)
        if not (ROOT / path).is_file()
    ]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
