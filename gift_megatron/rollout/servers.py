"""OpenAI-compatible vLLM servers: start them, spread prompt groups over them, sync their weights.

Each server is `python -m vllm.entrypoints.openai.api_server` with our worker extension, token ids
in and out (`--skip-tokenizer-init`), log-probs of the sampled distribution, and vLLM's dev
endpoints (`VLLM_SERVER_DEV_MODE=1`: /collective_rpc, /reset_prefix_cache). Servers bind 127.0.0.1
unless `rollout.host` says otherwise, and refuse (401) every request but /health that lacks the job's
secret (gift_megatron.rollout.auth: a bearer token, passed to servers by environment only). Every
request has a timeout; a dead or hung server is named in the error, or
(`rollout.on_server_failure=failover`) its prompts are retried on the others.

Weight sync: `files` writes safetensors buckets to a folder every server can read (the trainer's
machine, or a shared filesystem on a cluster), loaded by `gift_load_file` in each worker; only file
paths cross HTTP, never pickles. `nccl`/`gloo` use vLLM's weight-transfer API instead
(gift_megatron.rollout.weight_transfer): one process group of trainer rank 0 and every worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
import torch
from safetensors.torch import save_file

from gift_megatron.config import RolloutConfig
from gift_megatron.faults import started_server
from gift_megatron.rollout.auth import SECRET_ENV, bearer, new_secret, secret_from_env
from gift_megatron.rollout.engine import EXTENSION, Completion, SyncStats, chunked_prefill, sync_in_buckets

log = logging.getLogger(__name__)
SERVED_NAME = "policy"


class ServerError(RuntimeError):
    """A vLLM server failed; the message names it."""


def server_command(model_dir: str | Path, host: str, port: int, rollout: RolloutConfig, *, seed: int,
                   max_model_len: int, secret: str, dtype: str = "float32", transfer_backend: str | None = None,
                   load_format: str = "auto") -> tuple[list[str], dict[str, str]]:
    """The vLLM OpenAI server command line and environment, for the trainer's servers and Slurm's.
    The secret goes in the environment only (a command line is visible to every user in `ps`)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--seed", str(seed), "--worker-extension-cls", EXTENSION,
           "--skip-tokenizer-init", "--logprobs-mode", "processed_logprobs", "--load-format", load_format,
           "--tensor-parallel-size", str(rollout.tensor_parallel_size),
           "--gpu-memory-utilization", str(rollout.gpu_memory_utilization),
           "--middleware", "gift_megatron.rollout.auth.RequireSecret"]
    if transfer_backend:  # vLLM's weight-transfer endpoints (gift_gloo: registered by our vLLM plugin)
        cmd += ["--weight-transfer-config", json.dumps({"backend": transfer_backend})]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **{SECRET_ENV: secret})
    if not chunked_prefill():  # CPU: seeded requests must not be chunked (engine.chunked_prefill)
        cmd.append("--no-enable-chunked-prefill")
    if not torch.cuda.is_available():
        cmd.append("--enforce-eager")
        env.update(VLLM_CPU_KVCACHE_SPACE=str(rollout.cpu_kvcache_space_gib), VLLM_HOST_IP=host)
    return cmd, env


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet
        return False


def _wait_for_health(urls: list[str], timeout_s: float, between: Callable[[], None] = lambda: None) -> list[str]:
    """Poll each URL's /health (needs no secret) once a second until all answer 200 or timeout_s
    passes; returns those that never did. `between()` runs before each round: it may raise to stop
    early (a server process that exited)."""
    deadline, waiting = time.monotonic() + timeout_s, list(urls)
    while waiting and time.monotonic() < deadline:
        between()
        waiting = [url for url in waiting if not _healthy(url)]
        if waiting:
            time.sleep(1.0)
    return waiting


class VLLMServer:
    """A server process started by the trainer (local runs and tests); Slurm starts its own."""

    def __init__(self, model_dir: str | Path, port: int, rollout: RolloutConfig, *, seed: int, max_model_len: int,
                 log_dir: str | Path, dtype: str = "float32", transfer_backend: str | None = None,
                 secret: str | None = None) -> None:
        self.url = f"http://{rollout.host}:{port}"
        self.log_path = Path(log_dir) / f"vllm_server_{port}.log"
        self.secret = secret or os.environ.get(SECRET_ENV) or new_secret()  # the job's, or one of its own
        cmd, env = server_command(model_dir, rollout.host, port, rollout, seed=seed, max_model_len=max_model_len,
                                  secret=self.secret, dtype=dtype, transfer_backend=transfer_backend)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        started_server(self.proc.pid)

    def _log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise ServerError(f"vLLM server {self.url} exited with code {self.proc.returncode} while starting; "
                              f"log {self.log_path}:\n{self._log_tail()}")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if _wait_for_health([self.url], timeout_s, between=self._check_running):
            raise ServerError(f"vLLM server {self.url} not healthy after {timeout_s:.0f} s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its engine process too (own session)
                self.proc.wait()


def wait_all_ready(servers: list[VLLMServer], timeout_s: float = 300.0) -> None:
    for server in servers:
        server.wait_ready(timeout_s)


class ServerPool:
    """Client for N servers: prompt groups spread round-robin, requests concurrent, failures named.

    Every request carries its server's secret: that of a server we started, else `secret`, else the
    job's GIFT_SERVER_SECRET (servers given by URL without one: a ValueError naming it)."""

    def __init__(self, urls: list[str], rollout: RolloutConfig, *, stop_token_ids: list[int] | None = None,
                 sync_dir: str | Path | None = None, owned_servers: list[VLLMServer] | None = None,
                 transfer=None, secret: str | None = None) -> None:
        if not urls:
            raise ValueError("rollout.server_urls is empty and no server was started: give the servers' URLs")
        owned = {s.url: s.secret for s in owned_servers or []}
        if any(url not in owned for url in urls) and not secret:
            secret = secret_from_env()
        self.headers = {url: bearer(owned.get(url, secret)) for url in urls}
        if transfer is not None:  # the weight-transfer calls go to the same servers
            transfer.client.headers = [self.headers[url] for url in transfer.urls]
        self.urls, self.alive = list(urls), list(urls)
        self.rollout, self.stop_token_ids = rollout, stop_token_ids or []
        self.sync_dir = Path(sync_dir or tempfile.mkdtemp(prefix="gift_weight_sync_"))
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.owned_servers = owned_servers or []  # stopped by close()
        self.transfer = transfer  # a gift_megatron.rollout.weight_transfer.WeightTransfer, or files

    def wait_healthy(self, timeout_s: float) -> None:
        """Servers started elsewhere (Slurm): wait until each answers /health, naming the ones that never do."""
        waiting = _wait_for_health(self.urls, timeout_s)
        if waiting:
            raise ServerError(f"vLLM servers {', '.join(waiting)} not healthy after {timeout_s:.0f} s "
                              f"(rollout.server_start_timeout_s): check their logs and rollout.server_urls")

    def _post(self, url: str, path: str, payload: dict, timeout: float | None = None) -> dict:
        try:
            r = requests.post(f"{url}{path}", json=payload, headers=self.headers[url],
                              timeout=timeout or self.rollout.request_timeout_s)
        except requests.Timeout:
            limit = timeout or self.rollout.request_timeout_s
            raise ServerError(f"vLLM server {url} did not answer {path} within {limit:.0f} s "
                              f"(rollout.request_timeout_s)") from None
        except requests.RequestException as e:  # refused, reset, or the connection dropped mid-answer
            raise ServerError(f"vLLM server {url} is unreachable ({type(e).__name__}): is it running?") from None
        if r.status_code == 401:
            raise ServerError(f"vLLM server {url} refused {path} (HTTP 401): it was started with another "
                              f"{SECRET_ENV} than this trainer's")
        if r.status_code != 200:
            raise ServerError(f"vLLM server {url} answered {path} with HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json() if r.content else {}
        except ValueError:
            raise ServerError(f"vLLM server {url} sent a malformed answer to {path}: {r.text[:300]!r}") from None

    def _complete(self, url: str, prompt: list[int], n: int, max_tokens: int, temperature: float,
                  seed: int | None) -> list[Completion]:
        body = {"model": SERVED_NAME, "prompt": prompt, "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": self.rollout.top_p, "logprobs": 0, "return_token_ids": True,
                "return_tokens_as_token_ids": True, "stop_token_ids": self.stop_token_ids, "seed": seed}
        choices = sorted(self._post(url, "/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [Completion(token_ids=c["token_ids"], logprobs=c["logprobs"]["token_logprobs"],
                           finish_reason=c["finish_reason"] or "length") for c in choices]

    def _complete_with_failover(self, i: int, prompt, n, max_tokens, temperature, seed) -> list[Completion]:
        while True:
            alive = list(self.alive)
            if not alive:
                raise ServerError(f"every vLLM server failed ({', '.join(self.urls)})")
            url = alive[i % len(alive)]
            try:
                return self._complete(url, prompt, n, max_tokens, temperature, seed)
            except ServerError as e:
                if self.rollout.on_server_failure != "failover":
                    raise
                log.warning("%s; retrying its prompts on the other servers", e)
                if url in self.alive:
                    self.alive.remove(url)

    def generate_iter(self, prompts: list[list[int]], n: int, *, max_new_tokens: int | None = None,
                      temperature: float | None = None, seed: int | None = None):
        """(prompt index, its n samples) as each group finishes (each prompt's group goes to one server)."""
        max_tokens = max_new_tokens or self.rollout.max_new_tokens
        temp = self.rollout.temperature if temperature is None else temperature
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(prompts)))) as pool:
            futures = {pool.submit(self._complete_with_failover, i, p, n, max_tokens, temp,
                                   None if seed is None else seed + i): i for i, p in enumerate(prompts)}
            try:
                for f in as_completed(futures):
                    yield futures[f], f.result()
            finally:
                for f in futures:
                    f.cancel()

    def generate(self, prompts: list[list[int]], n: int, **kwargs) -> list[list[Completion]]:
        """n samples for each prompt, in prompt order."""
        out = dict(self.generate_iter(prompts, n, **kwargs))
        return [out[i] for i in range(len(prompts))]

    def _rpc(self, url: str, method: str, *args: str) -> list:
        """A worker-extension method on every worker of one server (strings in, JSON out)."""
        return self._post(url, "/collective_rpc", {"method": method, "args": list(args)})["results"]

    def _rpc_all(self, method: str, *args: str) -> list:
        return [self._rpc(url, method, *args) for url in self.alive]

    def _on_every_server(self, call) -> None:
        """call(url) on each live server. A failure is named, or under failover the server is dropped
        for good (it may hold half-synced weights) and the others carry on."""
        for url in list(self.alive):
            try:
                call(url)
            except ServerError as e:
                if self.rollout.on_server_failure != "failover":
                    raise
                log.warning("%s; dropping it (its weights may be half-synced)", e)
                self.alive.remove(url)
        if not self.alive:
            raise ServerError(f"every vLLM server failed ({', '.join(self.urls)})")

    def load_weights(self, named_tensors) -> SyncStats:
        """Every server loads every bucket in place inside one reload session (checked: every parameter
        loaded whole, tied heads refreshed); then their prefix caches are dropped."""
        start = time.perf_counter()
        if self.transfer is not None:
            stats = SyncStats(buckets=1)
            stats.num_tensors, stats.num_bytes = self.transfer.send(named_tensors)
            if self.transfer.backend == "nccl":  # vLLM's own engine: rebuild tied heads' kernels (GPU: a no-op)
                self._on_every_server(lambda url: self._rpc(url, "gift_refresh_tied"))
        else:
            self._on_every_server(lambda url: self._rpc(url, "gift_begin_sync"))
            stats = sync_in_buckets(named_tensors, self.rollout.weight_sync_bucket_mb * 2**20, self._push)
            self._on_every_server(lambda url: self._rpc(url, "gift_finish_sync"))
        self._on_every_server(lambda url: self._post(url, "/reset_prefix_cache", {}))
        if self.rollout.checksum_after_sync:
            sums = dict(zip(self.alive, self.checksums()))
            if len(set(sums.values())) > 1:
                raise ServerError(f"vLLM servers serve different weights after a sync (sha256 per server: {sums}): "
                                  f"a sync was partial; restart the servers")
        stats.seconds = time.perf_counter() - start
        log.debug("weight sync to %d servers: %d tensors, %.1f MB in %.3f s (%.2f GB/s)", len(self.alive),
                  stats.num_tensors, stats.num_bytes / 1e6, stats.seconds, stats.gb_per_s)
        return stats

    def _push(self, bucket: list) -> None:
        path = self.sync_dir / "bucket.safetensors"
        save_file(dict(bucket), str(path))
        try:
            self._on_every_server(lambda url: self._rpc(url, "gift_load_file", str(path)))
        finally:
            path.unlink(missing_ok=True)

    def checksums(self) -> list[str]:
        from gift_megatron.rollout.worker_ext import combine

        return [combine(r) for r in self._rpc_all("gift_checksum")]

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        for server in self.owned_servers:
            server.stop()
        shutil.rmtree(self.sync_dir, ignore_errors=True)
