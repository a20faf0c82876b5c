"""Config fuzzer: random configs drawn from the schema's options must be refused at composition, naming
a key, or train to the end; never crash after start-up.

Each draw (seeded: GIFT_FUZZ_SEED; GIFT_FUZZ_TRIALS draws) picks an algorithm (conf/algo), a layout on
one or two trainer processes (TP/PP/DP, sequence parallel, a virtual pipeline), algo.num_mini_batches,
fixed or token-budget micro-batches (packed or not), rollout.max_staleness {0,1,2}, algo.tis_cap, eval
on/off, rollout.verify_every, a few other options, and in some draws one numeric field set to a bad
value (0, -1, inf, nan, huge, a float in an int field). It is composed through the real Hydra path
(conf/ + gift_megatron.config.to_config, as gift-train does), and then either
- it is refused there with a ValueError (anywhere in the exception's chain) whose message names a key
  that was drawn, or one whose change alone lifts this refusal (a group's own setting), or
- it trains 2 steps: exit 0 (in a multirun: the job's `done:` line), metrics for steps 1 and 2.
Anything else (another exception, a non-zero exit, a hang) fails that trial, printing its overrides, a
repro command and the output. Draws that hit a bug listed in KNOWN (found here, reported, not fixed
yet) and fail that way are expected failures.

Cost: one shared vLLM server (tests/vllm_server.py) for the runs; accepted one-process draws run as ONE
Hydra multirun (an experiment file per draw, checked to compose to the same config as its overrides;
imports paid once, ~5 s a draw); two-process draws run one by one through gift_megatron.launch_local
(~20-40 s each). Draws with a huge value run last: one that syncs non-finite outputs leaves the server
failing later runs too. Every failed draw (up to GIFT_FUZZ_RERUNS) is rerun alone on a fresh server: its
traceback (a multirun prints only its first failure's), and an outcome that no earlier draw caused.
CI runs 10 seeded draws (~1 min); a larger sample, with some draws on the in-process engine
(GIFT_FUZZ_LOCAL: their share; ~35 s a run) and every outcome in a JSON file:
    GIFT_FUZZ_TRIALS=400 GIFT_FUZZ_SEED=7 GIFT_FUZZ_LOCAL=0.05 GIFT_FUZZ_REPORT=fuzz.json \
        .venv/bin/python -m pytest -s --timeout=0 tests/test_config_fuzz.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gift_megatron.config import Config, register_configs, to_config
from tests.vllm_server import shared_server

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRIALS = int(os.environ.get("GIFT_FUZZ_TRIALS", "10"))
SEED = int(os.environ.get("GIFT_FUZZ_SEED", "1"))  # 1: 2 one-process runs and a DP=2 one in 10 draws
REPORT = os.environ.get("GIFT_FUZZ_REPORT")
LOCAL = float(os.environ.get("GIFT_FUZZ_LOCAL", "0"))  # share of draws with the in-process engine (~35 s a run)
RERUNS = int(os.environ.get("GIFT_FUZZ_RERUNS", "10"))  # multirun failures rerun alone, at most this many
# Small and always valid: 4 prompts x 8 samples, 2 steps, 50 held-out prompts (one cached warm-up for all)
BASE = {"num_steps": 2, "data.num_prompts_per_step": 4, "parallel.micro_batch_size": 8, "data.num_eval_prompts": 50,
        "eval_every": 100, "save_every": 100}
LAYOUTS = {  # name: (weight, overrides); "2-on-1" and "vpp" are refused (1 process; 2 layers over 4 stages)
    "single": (14, {}),
    "tp2": (1, {"parallel.world_size": 2, "parallel.tensor_model_parallel_size": 2}),
    "tp2-sp": (1, {"parallel.world_size": 2, "parallel.tensor_model_parallel_size": 2,
                   "parallel.sequence_parallel": True}),
    "pp2": (1, {"parallel.world_size": 2, "parallel.pipeline_model_parallel_size": 2}),
    "dp2": (1, {"parallel.world_size": 2}),
    "pp2-vpp2": (1, {"parallel.world_size": 2, "parallel.pipeline_model_parallel_size": 2,
                     "parallel.virtual_pipeline_model_parallel_size": 2}),
    "tp2-on-1": (1, {"parallel.tensor_model_parallel_size": 2}),
}
ALWAYS = {  # drawn in every trial (first value listed most often where repeated)
    "algo": ["gift", "grpo", "dapo", "gspo", "gift_paper"],
    "algo.num_mini_batches": [1, 1, 2, 2, 4],
    "parallel.max_tokens_per_micro_batch": [0, 0, 22, 50, 200],
    "parallel.sequence_packing": [False, False, False, True],
    "rollout.max_staleness": [0, 0, 1, 2],
    "algo.tis_cap": [0.0, 0.0, 0.0, 1.0, 2.0],
    "data.num_eval_prompts": [50] * 7 + [0],  # 0: eval off (the addition task refuses it)
    "rollout.verify_every": [1, 0, 2],
}
SOMETIMES = {  # each drawn with probability 0.15 from its (valid) values
    "algo.group_size": [2, 4, 16], "data.num_prompts_per_step": [2, 8], "parallel.micro_batch_size": [4, 16, 32],
    "optim.lr_decay_style": ["linear", "cosine"], "optim.lr_warmup_steps": [1, 3], "optim.min_lr": [1e-5],
    "rollout.temperature": [0.7, 1.5], "rollout.top_p": [0.9], "rollout.max_new_tokens": [1, 12, 48],
    "algo.kl_coef": [0.05], "algo.loss_agg_mode": ["token-mean", "seq-mean-token-sum-norm"],
    "algo.advantage": ["drgrpo"], "algo.baseline": ["proximal"], "algo.detach_stats": [False],
    "algo.skip_uninformative_groups": [True], "algo.dynamic_sampling": [True], "algo.overlong_buffer_length": [2, 6],
    "algo.reference_refresh_every": [0, 1], "algo.length_norm_power": [1.0], "eval_num_samples": [2],
    "eval_every": [1], "save_every": [1], "log_entropy": [False], "data.warmup_max_steps": [0],
    "rollout.mismatch_patience": [1], "optim.clip_grad": [0.0], "data.max_prompt_length": [8],
    "parallel.use_distributed_optimizer": [False], "keep_last_checkpoints": [1], "rollout.checksum_after_sync": [True],
    "rollout.on_server_failure": ["failover"], "rollout.weight_sync_bucket_mb": [0.05], "log_all_ranks": [True],
    "parallel.offload_reference": [True], "reward.num_workers": [1], "algo.max_sampling_rounds": [1], "device": ["cpu"],
}
# Product bugs this fuzzer found and not fixed yet: (what, draws it covers, the failure's text). Such a
# draw that fails that way is an expected failure (xfail); once refused at composition it passes as any other.
# Fixed so far (refused at composition since e8cc4a6, ef73ec8): num_eval_prompts=0 on the addition task,
# sequence_parallel on CPU, rollout.top_p < 1 against the log-prob check, timeouts of 1e30 s, optim.lr and
# optim.weight_decay of 1e30 (outputs non-finite after a finite update; the server then answered HTTP 400).
KNOWN: list = []  # none open (the last, rollout.temperature > 2 with servers, is refused at composition too)
# One of these, in some draws, gets a bad value. Floats: also huge (1e30). Ints: also huge where that only
# makes a setting large (not the number of samples or prompts to generate).
FLOATS = ["optim.lr", "optim.min_lr", "optim.weight_decay", "optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps",
          "optim.clip_grad", "rollout.temperature", "rollout.top_p", "rollout.request_timeout_s",
          "rollout.max_logprob_mismatch", "rollout.weight_sync_bucket_mb", "algo.clip_ratio_low",
          "algo.clip_ratio_high", "algo.kl_coef", "algo.tis_cap", "algo.adv_eps", "algo.implicit_std_floor",
          "algo.z_scale", "algo.length_norm_power", "algo.overlong_penalty_factor"]
INTS_HUGE_OK = ["rollout.max_new_tokens", "parallel.max_tokens_per_micro_batch", "algo.overlong_buffer_length",
                "optim.lr_warmup_steps", "optim.max_nonfinite_steps", "rollout.verify_every", "rollout.max_staleness",
                "rollout.mismatch_patience", "eval_every", "save_every", "keep_last_checkpoints",
                "data.max_prompt_length", "algo.reference_refresh_every", "data.num_eval_prompts"]
INTS = ["algo.group_size", "algo.num_mini_batches", "data.num_prompts_per_step", "parallel.micro_batch_size",
        "eval_num_samples", "algo.max_sampling_rounds", "reward.num_workers", "data.warmup_max_steps"]


def draw(rng: random.Random) -> dict:
    """One random config as {key: value} ("algo": the conf/algo option; dotted keys: fields)."""
    layout = rng.choices(list(LAYOUTS), weights=[w for w, _ in LAYOUTS.values()])[0]
    engine = "vllm_local" if rng.random() < LOCAL else "vllm_servers"
    cfg = dict(BASE) | LAYOUTS[layout][1] | {"rollout": engine} | {k: rng.choice(v) for k, v in ALWAYS.items()}
    cfg |= {k: rng.choice(v) for k, v in SOMETIMES.items() if rng.random() < 0.15}
    if rng.random() < 0.4:
        key = rng.choice(FLOATS + INTS_HUGE_OK + INTS)
        bad = [0, -1, float("nan"), float("inf")] + ([-float("inf"), 1e30] if key in FLOATS else [2.5])
        cfg[key] = rng.choice(bad + ([10**12] if key in INTS_HUGE_OK else []))
    return cfg


def fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, float) or math.isfinite(value) else repr(value).replace("'", "")


def overrides(cfg: dict) -> list[str]:
    return [f"{k}={fmt(v)}" for k, v in cfg.items()]


def cli(cfg: dict, url: str) -> list[str]:
    """The draw's overrides, with the shared server's URL when it uses servers."""
    return overrides(cfg) + ([f"rollout.server_urls=[{url}]"] if cfg.get("rollout") == "vllm_servers" else [])


def experiment_yaml(cfg: dict) -> str:
    """The draw as a conf/experiment-style file (what the multirun selects with experiment=NAME)."""
    tree: dict = {"defaults": [{"override /algo": cfg["algo"]}, {"override /rollout": cfg["rollout"]}]}
    for key, value in cfg.items():
        if key not in ("algo", "rollout"):
            *parents, leaf = key.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return "# @package _global_\n" + yaml.safe_dump(tree, sort_keys=False)


SCHEMA_KEYS = []  # every field's dotted path (and its leaf name), to find the keys an error message names


def _collect(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _collect(value, f"{prefix}{f.name}.")
        else:
            SCHEMA_KEYS.append(f"{prefix}{f.name}")


_collect(Config())


def named_keys(message: str) -> set[str]:
    """Schema keys a message names: by dotted path, or by an identifier-like leaf name (with a "_",
    e.g. pipeline_model_parallel_size) as a word of its own."""
    leaf = lambda k: k.rsplit(".", 1)[-1]  # noqa: E731
    alone = r"(?<!\w)(?<!\w\.)"  # not inside a longer name (e.g. "lr" in "optim.lr", "optim.lr" in "x.optim.lr")
    return {k for k in SCHEMA_KEYS if re.search(rf"{alone}{re.escape(k)}\b", message)
            or ("_" in leaf(k) and re.search(rf"{alone}{re.escape(leaf(k))}\b", message))}


def compose_error(args: list[str]) -> tuple[Exception | None, object]:
    """(None, the composed config as YAML) or (the exception) through conf/ and to_config."""
    try:
        return None, OmegaConf.to_yaml(OmegaConf.structured(to_config(compose("config", overrides=args))))
    except Exception as e:  # noqa: BLE001 - every exception is classified by the caller
        return e, None


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


@dataclasses.dataclass
class Trial:
    index: int
    cfg: dict
    ranks: int
    outcome: str = ""  # refused | trained | failed
    detail: str = ""  # the refusal's message, or why it failed (output tail)
    rerun_trained: bool = False  # failed in the multirun, trained alone (after an earlier draw's failure)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """The draw's overrides other than BASE's."""
        return " ".join(o for (k, v), o in zip(self.cfg.items(), overrides(self.cfg)) if k not in BASE or BASE[k] != v)

    def repro(self, run_dir: str = "/tmp/fuzz_repro") -> str:
        launcher = "-m gift_megatron.launch_local --nproc=2 --" if self.ranks > 1 else "-m gift_megatron.train"
        args = " ".join(f"'{o}'" for o in overrides(self.cfg))
        servers = " rollout.num_servers=1" if self.cfg["rollout"] == "vllm_servers" else ""
        cache = "GIFT_WARMUP_CACHE=runs/.test_cache/warmup"
        return f"{cache} .venv/bin/python {launcher} run_dir={run_dir} {args}{servers}"


def _message(error: BaseException) -> str:
    return "\n".join(f"{type(e).__name__}: {e}" for e in _chain(error))


def _alternatives(key: str) -> list:
    default = Config()
    for part in key.split("."):
        default = getattr(default, part)
    kinds = {bool: [True, False], int: [0, 1, 2, 8, 64], float: [0.0, 1.0, 2.0], type(None): [None]}
    return kinds.get(type(default), [])


def refusal_problem(cfg: dict, error: Exception, url: str) -> str | None:
    """Why a refusal fails the check (None: it passes): no ValueError in its chain, or its message names
    no key that was drawn, or that alone lifts this refusal when changed (e.g. a group's own setting)."""
    if not any(isinstance(e, ValueError) for e in _chain(error)):
        return "refused without a ValueError"
    message, named = _message(error), named_keys(_message(error))
    if named & {"algo.name" if k == "algo" else k for k in cfg}:
        return None
    for key in sorted(named):
        for value in _alternatives(key):
            other, _ = compose_error(cli({**cfg, key: value}, url))
            if other is None or key not in named_keys(_message(other)) and _message(other) != message:
                return None
    culprits = [k for k in cfg if compose_error(cli({x: v for x, v in cfg.items() if x != k}, url))[0] is None]
    return f"refused naming {sorted(named) or 'no key'}: none drawn or involved (drawn keys that lift it: {culprits})"


def classify(trials: list[Trial], url: str) -> None:
    """Compose every draw: refused ones are checked here (cheap); accepted ones are left to run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for t in trials:
            error, _ = compose_error(cli(t.cfg, url))
            if error is not None:
                problem = refusal_problem(t.cfg, error, url)
                t.outcome, t.detail = ("failed", f"{problem}:\n{_message(error)}") if problem else \
                    ("refused", _message(error))


def trained(run_dir: Path | None) -> bool:
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return False
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [s for s in steps if s > 0] == [1, 2]


def run_alone(t: Trial, run_dir: Path, server) -> tuple[bool, str]:
    """The draw through the CLI in a process of its own (launch_local for two ranks)."""
    launcher = ["-m", "gift_megatron.train"]
    if t.ranks > 1:
        launcher = ["-m", "gift_megatron.launch_local", "--nproc=2", "--"]
    cmd = [sys.executable, *launcher, f"run_dir={run_dir}", *cli(t.cfg, server.url)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                              env=server.env(OMP_NUM_THREADS="1"))
        return proc.returncode == 0 and trained(run_dir), f"exit {proc.returncode}\n{proc.stdout[-6000:]}"
    except subprocess.TimeoutExpired as e:
        return False, f"hung (killed after 600 s)\n{(e.stdout or b'')[-6000:]}"


def run_multirun(todo: list[Trial], root: Path, server, url: str = "") -> None:
    """Accepted one-process draws as one Hydra multirun; each draw an experiment file in a search-path folder.
    A draw left unfinished (the process died or hung on it) fails; the ones after it run in a next multirun."""
    exp = root / "search" / "experiment"
    exp.mkdir(parents=True, exist_ok=True)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for t in todo:
            (exp / f"fuzz_{t.index}.yaml").write_text(experiment_yaml(t.cfg))
            direct = compose_error(cli(t.cfg, url))[1]
            via_file = compose_error([f"hydra.searchpath=[file://{root / 'search'}]", f"experiment=fuzz_{t.index}",
                                      *([f"rollout.server_urls=[{url}]"] if url else [])])[1]
            assert direct == via_file, f"the experiment file of trial {t.index} composes differently"
    while todo:
        sweep, log = root / f"sweep_{todo[0].index}", root / f"multirun_{todo[0].index}.log"
        urls = [f"rollout.server_urls=[{url}]"] if url else []
        cmd = [sys.executable, "-m", "gift_megatron.train", "-m", f"hydra.searchpath=[file://{root / 'search'}]",
               "experiment=" + ",".join(f"fuzz_{t.index}" for t in todo), *urls,
               f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
        start = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=server.env(OMP_NUM_THREADS="1"))
            try:
                proc.wait(timeout=120 + 120 * len(todo))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        text = log.read_text(errors="replace")
        sections = re.split(r"\[HYDRA\]\s+#\d+ : ", text)[1:]
        per_job = (time.monotonic() - start) / max(1, len(sections))
        for job, (t, section) in enumerate(zip(todo, sections)):
            done = "] - done: {" in section and trained(sweep / str(job))
            last = job == len(sections) - 1 and proc.returncode != 0 and not done
            t.outcome, t.seconds = ("trained" if done else "failed"), per_job
            t.detail = "" if done else f"multirun job #{job}{' (the process ended here)' if last else ''}:\n" \
                                       f"{section[-5000:]}\n--- the multirun's end ---\n{text[-3000:]}"
        todo = todo[len(sections):] if sections else []
        if todo and not sections:
            for t in todo:
                t.outcome, t.detail = "failed", f"the multirun did not start:\n{text[-5000:]}"
            todo = []


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(SEED)
    trials = []
    for i in range(TRIALS):
        cfg = draw(rng)
        trials.append(Trial(i, cfg, ranks=int(cfg.get("parallel.world_size", 1))))
    server = shared_server(root / "server")
    classify(trials, server.url)
    accepted = sorted((t for t in trials if not t.outcome), key=_risky)  # huge values last: they may poison the server
    for t in (t for t in accepted if t.ranks > 1):
        start = time.monotonic()
        ok, out = run_alone(t, root / f"ranks_{t.index}", server)
        t.outcome, t.detail = ("trained", "") if ok else ("failed", out)
        t.seconds = time.monotonic() - start
    if any(t.outcome == "failed" for t in accepted):
        server = shared_server(root / "server", fresh=True)
    one = [t for t in accepted if t.ranks == 1]
    run_multirun([t for t in one if t.cfg["rollout"] == "vllm_servers"], root, server, server.url)
    run_multirun([t for t in one if t.cfg["rollout"] == "vllm_local"], root, server)
    reruns = [t for t in accepted if t.outcome == "failed"][:RERUNS]
    if reruns:  # alone, on a fresh server: its traceback (a multirun shows the first failure's only), and whether
        server = shared_server(root / "server", fresh=True)  # it failed for an earlier draw's (a poisoned server)
    for t in reruns:
        ok, out = run_alone(t, root / f"alone_{t.index}", server)
        t.detail += f"\n--- rerun alone on a fresh server: {'trained' if ok else 'fails too'} ---\n{out}"
        t.outcome = "trained" if ok else "failed"
        t.rerun_trained = ok
    if REPORT:
        Path(REPORT).write_text(json.dumps([dataclasses.asdict(t) | {"repro": t.repro()} for t in trials], indent=1))
    return trials


@pytest.mark.parametrize("i", range(TRIALS))
def test_draw_is_refused_naming_a_key_or_trains(fuzz, i):
    t = fuzz[i]
    for what, covers, text in KNOWN:
        if covers(t.cfg) and t.outcome == "failed" and text in t.detail:
            pytest.xfail(f"known: {what}")
    assert t.outcome in ("refused", "trained"), (
        f"trial {i} ({t.ranks} process{'es' if t.ranks > 1 else ''}): {t.label}\nrepro: {t.repro()}\n{t.detail}")


def _first_key(t: Trial) -> str:
    """The drawn key a refusal names first (what it is about), for the summary."""
    keys = named_keys(t.detail) & {"algo.name" if k == "algo" else k for k in t.cfg}
    return min(keys, key=lambda k: t.detail.find(k)) if keys else "(a key set by a group)"


def _risky(t: Trial) -> bool:
    return any(isinstance(v, int | float) and not isinstance(v, bool) and abs(v) >= 1e9 for v in t.cfg.values())


def test_summary(fuzz):
    """Counts for the log (pytest -s): trained, refused (by the keys the refusals name), failed."""
    outcomes = Counter("known" if t.outcome == "failed" and any(c(t.cfg) and x in t.detail for _, c, x in KNOWN)
                       else t.outcome for t in fuzz)
    refusals = Counter(_first_key(t) for t in fuzz if t.outcome == "refused")
    ranks = Counter(t.ranks for t in fuzz if t.outcome == "trained")
    rerun = sum(t.rerun_trained for t in fuzz)
    print(f"\nfuzz seed {SEED}: {len(fuzz)} trials, {dict(outcomes)} ({rerun} trained only when rerun alone); "
          f"trained by processes {dict(ranks)}; "
          f"refusals by key {dict(refusals.most_common())}")
    assert sum(outcomes.values()) == len(fuzz)
