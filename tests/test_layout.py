"""The library's layout keeps its promises: one package per stage, no import cycle, no module past
~400 lines, nothing private imported across modules, the method never imports the tiny world, and the
config layer loads without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "realign_lib"
MAX_LINES = 410


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(LIB.rglob("*.py")):
        rel = p.relative_to(LIB.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``realign_lib`` import in a file, lazy ones included."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.startswith("realign_lib"):
                names = [a.name for a in node.names]
                subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
                out += [(s, []) for s in subs] or [(mod, names)]
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("realign_lib")]
    return out


MODULES = _modules()
GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    edges = {m: {d for d, _ in GRAPH[m] if d in MODULES and d != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_nothing_private_is_imported_across_modules():
    private = [(m, d, n) for m, deps in GRAPH.items() for d, names in deps for n in names
               if n.startswith("_") and not n.startswith("__") and d != m]
    assert not private, private


def test_the_method_and_the_evaluation_never_import_the_tiny_world():
    method = [m for m in MODULES if not m.startswith(("realign_lib.tinyworld", "realign_lib.run"))]
    bad = [(m, d) for m in method for d, _ in GRAPH[m] if d.startswith("realign_lib.tinyworld")]
    assert not bad, bad


def test_the_run_layer_imports_only_the_tiny_worlds_settings():
    bad = [(m, d) for m in MODULES if m.startswith("realign_lib.run") for d, _ in GRAPH[m]
           if d.startswith("realign_lib.tinyworld") and d != "realign_lib.tinyworld.settings"
           and m != "realign_lib.run.cli"]
    assert not bad, bad


@pytest.mark.parametrize("code", [
    "import realign_lib",
    "from realign_lib.run.config import load_config; load_config('configs/tiny_world.yaml')",
    "from realign_lib.run.config import load_config; load_config('configs/tiny_world_comparison.yaml')",
    "from realign_lib.run import cli\ntry:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n    pass",
])
def test_the_config_layer_loads_without_torch_or_the_tiny_world(code):
    probe = (code + "\nimport sys\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers',"
             " 'peft') or (m.startswith('realign_lib.tinyworld') and m != 'realign_lib.tinyworld.settings'"
             " and m != 'realign_lib.tinyworld'))\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=LIB.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
