"""The layout holds: imports run down the packages (README, "Where the code
lives"), no module imports itself back through others, none is over 600
lines, and the warm ``ensure`` path imports no more than it did."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT, check

PACKAGE = ROOT / "src" / "envcrate"
# What each part may import (besides itself); everything may import the ground floor.
GROUND = {"errors", "ids", "fsutil", "procs", "progress", "network"}
MAY_IMPORT = {
    "ground": set(),
    "crate": set(),
    "envs": {"crate"},
    "stores": {"crate"},
    "node": {"crate"},
    "packing": {"crate", "envs"},
    "fetching": {"crate", "node", "stores"},
    "shipping": {"crate", "envs", "stores", "packing"},
    "bootstrap": {"crate", "node", "stores"},
    "integrations": set(),  # plain values for the systems they serve, importable alone
    "build": {"crate", "stores", "shipping"},  # recipes, locks, builds: over shipping
    "cli": {
        "crate",
        "envs",
        "stores",
        "node",
        "packing",
        "fetching",
        "shipping",
        "bootstrap",
        "build",
        "api",
    },
    "api": {"crate", "envs", "stores", "node", "packing", "fetching", "shipping"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"  # envcrate/__init__.py
    top = parts[1]
    if top in GROUND:
        return "ground"
    return "cli" if top == "__main__" else top


def _imports() -> dict[str, set[str]]:
    """module -> the envcrate modules it imports (at the top or inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        module = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if _exists(sub) else target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                found.update(n for n in names if n.split(".")[0] == "envcrate")
        graph[module] = {m for m in found if m != module and _exists(m)}
    return graph


def _exists(module: str) -> bool:
    p = PACKAGE.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def test_imports_run_down_the_packages():
    wrong = [
        f"{m} -> {t}"
        for m, targets in _imports().items()
        for t in targets
        if t != "envcrate"  # the package itself: its __version__
        and _part(t) not in {_part(m), "ground", *MAY_IMPORT[_part(m)]}
    ]
    assert wrong == []


def test_no_import_cycle():
    graph = _imports()
    # A package's __init__ that only re-exports its modules is not a cycle
    # with them; every other edge counts, lazy imports included.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_a_bootstrap_script_carries_everything_its_modules_import():
    """The compute side a bootstrap script embeds (envcrate.bootstrap.PAYLOAD)
    is closed under imports, lazy ones included (the package's own lazy API
    aside), and never reaches the client's side."""
    from envcrate.bootstrap import PAYLOAD

    graph = _imports()
    missing = sorted(
        f"{m} -> {t}"
        for m in PAYLOAD
        if m != "envcrate"
        for t in graph[m]
        if t not in PAYLOAD and not m.startswith(t + ".")
    )
    assert missing == []


def test_a_bootstrap_script_s_modules_need_only_python_3_6():
    """What vermin (PyPI) finds in them needs at most Python 3.6 (the real
    runs are tests/node/test_boot.py's, under every Python here)."""
    from envcrate.bootstrap import PAYLOAD, module_file

    files = [str(module_file(m)) for m in PAYLOAD]
    vermin = Path(sys.executable).with_name("vermin")
    out = check([vermin, "-t=3.6-", "--no-tips", "--violations", *files])
    assert "Minimum required versions: 3.6" in out.stdout or out.stdout.strip().endswith("3.6"), (
        out.stdout
    )


def test_a_warm_ensure_imports_only_the_warm_path(small_crate, tmp_path):
    """The modules of envcrate a warm ``envcrate ensure ID`` imports: the
    command line's core and the node's warm path, nothing of the format,
    the stores or the writer (and no dataclasses, json or pathlib)."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "scripts" / "envcrate"), "ensure", small_crate.archive]
    check([*cmd, "--cache", cache])
    warm = [sys.executable, "-X", "importtime", str(ROOT / "scripts" / "envcrate")]
    loaded = _imported([*warm, "ensure", small_crate.id, "--cache", cache])
    loaded -= _imported([sys.executable, "-X", "importtime", "-c", "pass"])  # start-up's own
    ours = {m for m in loaded if m.split(".")[0] == "envcrate"}
    assert ours <= {
        "envcrate",
        "envcrate.errors",
        "envcrate.ids",
        "envcrate.cli",
        "envcrate.cli.caches",
        "envcrate.node",
        "envcrate.node.ensure",
        "envcrate.node.cache",
        "envcrate.node.events",
    }, ours
    assert not loaded & {"dataclasses", "json", "pathlib", "argparse", "zstandard"}


def _imported(cmd) -> set[str]:
    """The modules ``cmd`` (run with ``-X importtime``) imports."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in check(cmd).stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
