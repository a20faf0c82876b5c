"""The server client under load: generated tokens/s of `ServerPool.generate` over two real vLLM
OpenAI servers (CPU) as the number of prompt groups in flight grows, each against the pool's
throughput at the smallest load, and a count of what came back (every prompt must get exactly G).

Run: python bench/server_load.py [--groups 8 32 128 400 --group-size 4 --max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_paths import _hf_model  # noqa: E402  (bench/ helper: a random HF Llama of a named size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", type=int, default=[8, 32, 128, 400])
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--servers", type=int, default=2)
    a = ap.parse_args()

    import torch

    from gift_megatron.config import RolloutConfig
    from gift_megatron.launch import free_port
    from gift_megatron.rollout.servers import ServerPool, VLLMServer, wait_all_ready

    folder = Path(tempfile.mkdtemp(prefix="bench_load_"))
    _hf_model("tiny", folder)
    rollout = RolloutConfig(max_new_tokens=a.max_new_tokens, request_timeout_s=600, temperature=1.0)
    servers, ports = [], []
    try:
        for i in range(a.servers):
            ports.append(free_port(8500, exclude=tuple(ports)))
            servers.append(VLLMServer(folder, ports[-1], rollout, seed=i, max_model_len=64, log_dir=folder))
        wait_all_ready(servers, timeout_s=300)
        pool = ServerPool([s.url for s in servers], rollout, stop_token_ids=[2])
        g = torch.Generator().manual_seed(0)
        pool.generate([[5, 6, 7]] * 4, a.group_size)  # warm the servers up
        rows = []
        for n in a.groups:
            prompts = [torch.randint(3, 64, (12,), generator=g).tolist() for _ in range(n)]
            t0 = time.perf_counter()
            groups = pool.generate(prompts, a.group_size)
            seconds = time.perf_counter() - t0
            complete = sum(len(grp) == a.group_size for grp in groups)
            tokens = sum(len(c.token_ids) for grp in groups for c in grp)
            rows.append((n, n * a.group_size, complete, tokens / seconds, seconds))
        pool.close()
    finally:
        for s in servers:
            s.stop()
    base = rows[0][3]
    print(f"{a.servers} servers, G={a.group_size}, up to {a.max_new_tokens} new tokens")
    print("groups per call (the client keeps up to 64 requests in flight) | completions | groups with exactly G | "
          "generated tokens/s | vs the smallest load")
    for n, completions, complete, tok_s, _ in rows:
        print(f"{n} | {completions} | {complete}/{n} | {tok_s:.0f} | {tok_s / base:.2f}")


if __name__ == "__main__":
    main()
