"""The package's layers, read from its source (every import statement, module level or inside a function):

- algo/ is pure torch: no megatron-core, vLLM, Hydra, nor any other layer of ours but itself and the
  pure-Python names and options it shares with the config (algo_options.py);
- the config, the run folder's lock and the stop flag import no torch (a refused launch answers in seconds);
- batch.py and mismatch.py (the types both sides share) import torch and algo/ only;
- megatron/ never imports rollout/, and rollout/ never imports megatron/ or megatron-core;
- vLLM is imported in rollout/ only, megatron-core in megatron/ only;
- nothing imports the Hydra entry point (gift_megatron.train);
- no import cycles between our modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gift_megatron"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a.b when that is a module)."""
    tree, me = ast.parse(path.read_text()), _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *filter(None, [base])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


GRAPH = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
EXTERNAL = {m: {i.split(".")[0] for i in imports(p)} for m, p in MODULES.items()}


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_the_walk_sees_known_edges():
    """The walker itself: edges that exist must be found (a walker that finds nothing passes every rule)."""
    assert "gift_megatron.algo.grouping" in GRAPH["gift_megatron.algo.losses"]
    assert "gift_megatron.batch" in GRAPH["gift_megatron.megatron.train_step"]
    assert "megatron" in EXTERNAL["gift_megatron.megatron.train_step"]
    assert "vllm" in EXTERNAL["gift_megatron.rollout.engine"]  # inside a function
    assert "gift_megatron.rollout.tasks" in GRAPH["gift_megatron.warmup_job"]
    assert len(MODULES) > 50


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("gift_megatron.megatron", "gift_megatron.rollout"),
    ("gift_megatron.rollout", "gift_megatron.megatron"),
    ("gift_megatron.algo", "gift_megatron.megatron"),
    ("gift_megatron.algo", "gift_megatron.rollout"),
    ("gift_megatron.algo", "gift_megatron.config"),
    ("gift_megatron.batch", "gift_megatron.rollout"),
    ("gift_megatron.batch", "gift_megatron.megatron"),
    ("gift_megatron.mismatch", "gift_megatron.rollout"),
    ("gift_megatron.mismatch", "gift_megatron.megatron"),
])
def test_layer_never_imports(layer, forbidden):
    bad = {m: sorted(i for i in GRAPH[m] if _in(i, forbidden)) for m in GRAPH if _in(m, layer)}
    assert not {m: b for m, b in bad.items() if b}


@pytest.mark.parametrize(("library", "allowed"), [
    ("vllm", ("gift_megatron.rollout",)),
    ("megatron", ("gift_megatron.megatron", "gift_megatron.convert")),
    ("transformer_engine", ("gift_megatron.megatron",)),
    ("hydra", ("gift_megatron.train", "gift_megatron.config", "gift_megatron.rollout.serve")),
])
def test_third_party_stays_in_its_subpackage(library, allowed):
    users = sorted(m for m in EXTERNAL if library in EXTERNAL[m] and not any(_in(m, a) for a in allowed))
    assert users == []
    if library != "transformer_engine":  # TE is GPU-only; its detection lives in megatron/
        assert any(library in EXTERNAL[m] for m in EXTERNAL), f"no module imports {library}: the rule checks nothing"


def test_algo_is_pure_torch():
    allowed = {"torch", "math", "dataclasses", "collections", "functools", "typing", "__future__", "gift_megatron"}
    pure = {"gift_megatron.algo_options"}  # names and option types, pure Python
    for m in (m for m in EXTERNAL if _in(m, "gift_megatron.algo")):
        assert EXTERNAL[m] <= allowed, (m, EXTERNAL[m] - allowed)
        assert all(_in(i, "gift_megatron.algo") or i in pure for i in GRAPH[m]), (m, GRAPH[m])


def test_what_a_launch_needs_before_the_lock_imports_no_torch():
    """train.py takes the run folder's lock after composing the config: torch (1.5 s of imports here, far
    more on a busy node) must not come with it."""
    code = ("import sys, gift_megatron.config, gift_megatron.run_dir, gift_megatron.stop, gift_megatron.trackers; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_nothing_imports_the_entry_point():
    assert sorted(m for m in GRAPH if "gift_megatron.train" in GRAPH[m]) == []


def test_no_import_cycles():
    """Depth-first search over every import edge; a cycle is reported as its modules in order."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)
