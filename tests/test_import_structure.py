"""The import structure: no import circles (function-level imports included), `jaxinfer`
never imports `serve`, `pallas_kernels` imports nothing of ours, and the modules that must run
without JAX (the scheduler, the server's front) do not load it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxinfer", "pallas_kernels", "sharding", "checkpoints", "serve")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            if "protos" in path.parts:  # generated stubs
                continue
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (`from pkg import sub` names the
    submodule, not the package's __init__)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found.update(subs or [base])
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_package_boundaries():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "serve")
           for m, deps in graph.items() if m.split(".")[0] == "jaxinfer"}
    assert not {m: d for m, d in bad.items() if d}, "jaxinfer imports serve"
    kernels = {m: sorted(d for d in deps if d.split(".")[0] != "pallas_kernels")
               for m, deps in graph.items() if m.split(".")[0] == "pallas_kernels"}
    assert not {m: d for m, d in kernels.items() if d}, "pallas_kernels imports our other packages"


def _loads_jax(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print('jax' in sys.modules or 'jaxlib' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


def test_scheduler_and_front_load_no_jax():
    assert not _loads_jax("import jaxinfer.engine.scheduler, jaxinfer.engine.kv_pages, "
                          "jaxinfer.engine.output, jaxinfer.engine.packing")
    # The server's front: everything `python -m serve` imports before it starts its cores.
    assert not _loads_jax("import serve.__main__, serve.server, serve.engine_client, "
                          "serve.metrics, serve.http_server, jaxinfer.chat_template\n"
                          "from jaxinfer.tokenizer import tokenizer_for_model\n"
                          "from sharding.mesh import parse_mesh\n"
                          "tokenizer_for_model('dummy'); parse_mesh('dp=2,tp=2')")
    assert _loads_jax("import jaxinfer.runner")  # the check itself can fail
