"""Security audit of the code itself (AST, not grep): tensors are loaded only with safetensors or
`torch.load(weights_only=True)`, no pickle crosses a socket (no pickle imports, no object
collectives), no code from strings; servers bind loopback unless configured and get their secret by
environment only; a Slurm server without the job's secret never starts."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("gift_megatron", "tools", "bench") for p in (ROOT / d).rglob("*.py"))
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list"}
BANNED_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve"}


def _findings(path: Path) -> list[str]:
    tree, out = ast.parse(path.read_text(), str(path)), []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            out += [f"{where} imports {n}" for n in names if n and n.split(".")[0] in BANNED_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        if name == "load" and owner == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                out.append(f"{where} torch.load without weights_only=True")
        if name in OBJECT_COLLECTIVES:
            out.append(f"{where} {name} pickles Python objects over the process group")
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            out.append(f"{where} {func.id}() runs code from a string")
        if name == "load" and owner == "yaml":
            out.append(f"{where} yaml.load (use yaml.safe_load / OmegaConf)")
    return out


def test_the_audit_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nimport torch.distributed as dist\n"
                   "torch.load('x')\ntorch.load('y', weights_only=False)\ndist.broadcast_object_list([1])\n"
                   "eval('1')\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _findings(bad)
    finally:
        ROOT = saved
    assert len(found) == 5, found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_unsafe_deserialisation_or_object_pickling(path):
    assert _findings(path) == []


def test_servers_bind_loopback_unless_configured():
    from gift_megatron.config import RolloutConfig
    from gift_megatron.rollout.servers import server_command

    rollout = RolloutConfig()
    assert rollout.host == "127.0.0.1"
    cmd, _ = server_command("/m", rollout.host, 8100, rollout, seed=0, max_model_len=32, secret="s3cr3t" * 8)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_the_server_secret_goes_by_environment_and_guards_every_path():
    """On the command line it would be visible to every user in `ps`; vLLM's --api-key guards only /v1."""
    from gift_megatron.config import RolloutConfig
    from gift_megatron.rollout.auth import SECRET_ENV
    from gift_megatron.rollout.servers import server_command

    secret = "s3cr3t" * 8
    cmd, env = server_command("/m", "127.0.0.1", 8100, RolloutConfig(), seed=0, max_model_len=32, secret=secret)
    assert env[SECRET_ENV] == secret and not any(secret in arg for arg in cmd)
    assert cmd[cmd.index("--middleware") + 1] == "gift_megatron.rollout.auth.RequireSecret"
    assert "--api-key" not in cmd


def test_a_slurm_server_never_starts_without_the_job_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GIFT_SERVER_SECRET"}
    proc = subprocess.run([sys.executable, "-m", "gift_megatron.rollout.serve", "--port", "8999", "--",
                           f"run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "GIFT_SERVER_SECRET is not set" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "server_model").exists()  # stopped before composing the config
