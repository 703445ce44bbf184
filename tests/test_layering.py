"""The daemon's import graph: one way only, no cycles, and AES-GCM behind one door.

Every import counts, wherever it is written: at module level, inside a function (a "lazy" import still
ties the two modules together), under `if TYPE_CHECKING:`. A module may import only modules of a LOWER
layer than its own; modules of one layer are peers that do not know each other. A new module must be
given a layer here (docs/architecture.md says what each layer is for).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "pipellm_daemon"
SDK = ROOT / "client" / "pipellm_client"

# Bottom first. Names are relative to `pipellm_daemon`; "" is the package itself (`__init__.py`).
LAYERS: list[set[str]] = [
    # Foundations: no daemon imports at all. `errors` holds the typed errors the layers above raise.
    {"", "errors", "config", "logs", "latency", "auth", "systemd", "jobwire", "predictors.base", "counters"},
    # Refusals (status codes for those errors), the event bus, the individual predictors.
    {"refusal", "events", "predictors.cycle", "predictors.intents", "predictors.lora", "predictors.swap"},
    # What a pipeline drives: crypto workers (and the worker process), bounce arenas, regions, predictors,
    # CUDA staging.
    {"predictors", "workers", "worker", "pool", "regions", "cuda_staging"},
    # A copy engine's keys, sender or receiver and queue; a commit's reply.
    {"streams", "commit_reply"},
    # The pipeline's mechanisms: the ring's published records, the relinquish cost model, D2H landing, and
    # the learned sources' throttle.
    {"published", "relinquish", "landing", "throttle"},
    # Copy engine 0's speculation: its queue, what fills it and when its ciphertext is made.
    {"speculation"},
    {"pipeline"},
    {"sessions"},
    # The data plane (connections: each is a `sessions.Link`) and the status it does not need.
    {"dataplane", "status"},
    {"servicer", "metrics"},
    {"server"},
    {"cli", "launcher"},
    {"__main__"},
]


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        if "_gen" in rel:
            continue
        if rel[-1] == "__init__":
            rel = rel[:-1]
        out[".".join((package, *rel))] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file that names a module in `known`."""
    tree = ast.parse(path.read_text(), str(path))
    here = module if _is_package(path) else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def add(name: str, line: int) -> None:
        # `import a.b.c` / `from a.b import c`: the deepest known module named
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and (name, line) not in found:
            found.append((name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target, node.lineno)
    return found


def graph(root: Path = DAEMON, package: str = "pipellm_daemon") -> dict[str, list[tuple[str, int]]]:
    mods = _modules(root, package)
    known = set(mods)
    return {m: [(d, line) for d, line in imports_of(p, m, known) if d != m] for m, p in mods.items()}


def _short(module: str) -> str:
    return module.partition(".")[2]


def layer_of() -> dict[str, int]:
    out: dict[str, int] = {}
    for i, layer in enumerate(LAYERS):
        for name in layer:
            assert name not in out, f"{name!r} is in two layers"
            out[name] = i
    return out


def upward_imports(g: dict[str, list[tuple[str, int]]]) -> list[str]:
    layers = layer_of()
    bad = []
    for mod, deps in g.items():
        mine = layers[_short(mod)]
        for dep, line in deps:
            theirs = layers[_short(dep)]
            if theirs >= mine:
                way = "a peer in its own layer" if theirs == mine else f"layer {theirs}, above it"
                bad.append(f"{_short(mod) or '__init__'} (layer {mine}) line {line} imports {_short(dep)} ({way})")
    return bad


def cycles(g: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _line in g.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_daemon_module_has_a_layer() -> None:
    have = {_short(m) for m in _modules(DAEMON, "pipellm_daemon")}
    placed = set(layer_of())
    assert have - placed == set(), "give these modules a layer in LAYERS (and docs/architecture.md)"
    assert placed - have == set(), "LAYERS names modules that do not exist"


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_only_go_down() -> None:
    assert upward_imports(graph()) == []


def test_the_checks_see_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    """The graph builder itself: lazy, relative, TYPE_CHECKING and absolute imports all count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n")
    (pkg / "high.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import low\nif TYPE_CHECKING:\n    from .sub.leaf import X\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from .leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("import pkg.util.x\nX = 1\n")
    (pkg / "util.py").write_text("import os\n")
    g = graph(pkg, "pkg")
    deps = {m: sorted({d for d, _ in ds}) for m, ds in g.items()}
    assert deps == {
        "pkg": [],
        "pkg.high": ["pkg.low", "pkg.sub.leaf"],
        "pkg.low": ["pkg.high"],
        "pkg.sub": ["pkg.sub.leaf"],
        "pkg.sub.leaf": ["pkg.util"],
        "pkg.util": [],
    }
    assert cycles(g) == [["pkg.high", "pkg.low"]]


def test_the_sdk_never_imports_the_daemon() -> None:
    bad = []
    for mod, path in _modules(SDK, "pipellm_client").items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [f"{mod} line {node.lineno}: {n}" for n in names if n.split(".")[0] == "pipellm_daemon"]
    assert bad == []


def test_the_worker_process_imports_only_what_it_needs() -> None:
    """A crypto worker holds keys: the standard library, `cryptography` (through the SDK's crypto module),
    the SDK's key memory and errors, its wire facts (descriptor packing), and the ring format. Nothing that
    would pull in grpc, numpy or protobuf."""
    allowed = {
        "pipellm_client.crypto",
        "pipellm_client.keymem",
        "pipellm_client.errors",
        "pipellm_client.wire",
        "pipellm_daemon.jobwire",
    }
    tree = ast.parse((DAEMON / "worker.py").read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "worker.py runs as __main__: absolute imports only"
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in allowed else base for a in node.names]
        else:
            continue
        bad += [n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n not in allowed]
    assert bad == []


def _door_calls(path: Path) -> list[str]:
    """Uses of OpenSSL's AEAD buffer calls (`encrypt_into`, `decrypt_into`) or of an `Aead`'s private
    ciphers (`_gcm`, `_aes`) in a file. (`keys.py` wraps the IV masks with `AESGCM.encrypt`, once per
    session under a key of their own: not channel data, and not audited.)"""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"encrypt_into", "decrypt_into", "_gcm", "_aes"}:
            out.append(f"{path} line {node.lineno}: .{node.attr}")
    return out


@pytest.mark.parametrize("root", [DAEMON, SDK], ids=["daemon", "sdk"])
def test_aes_gcm_on_the_cpu_has_one_door(root: Path) -> None:
    """Only `crypto.py` touches OpenSSL's AES-GCM on the CPU (`seal_into`, `seal_job`, `open_into`), so
    its auditor sees every encryption. `gpu/` is another device: its kernels and their numpy reference."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(SDK).parts if root == SDK else ()
        if path == SDK / "crypto.py" or rel[:1] in {("gpu",), ("_gen",)}:
            continue
        bad += _door_calls(path)
    assert bad == []
