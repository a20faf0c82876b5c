"""Two real vLLM OpenAI servers on 127.0.0.1: generate, sync weights from a TP=2 policy, lose a server."""

import pytest
import torch

from gift_megatron.config import RolloutConfig
from gift_megatron.launch import free_port, run_distributed
from gift_megatron.rollout.servers import ServerError, ServerPool, VLLMServer, wait_all_ready
from tests.test_rollout_engine import MAX_NEW, PROMPTS, G, _flatten, _gather_worker, _score_worker, _write_random_hf


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    _write_random_hf(root / "hf", seed=3)
    rollout = RolloutConfig(max_new_tokens=MAX_NEW, weight_sync_bucket_mb=1, request_timeout_s=60)
    started = [VLLMServer(root / "hf", free_port(), rollout, seed=0, max_model_len=32, log_dir=root)
               for _ in range(2)]
    try:
        wait_all_ready(started, timeout_s=240)
        yield started, rollout
    finally:
        for s in started:
            s.stop()


def test_generate_sync_and_verify_on_two_servers(servers):
    started, rollout = servers
    pool = ServerPool([s.url for s in started], rollout)
    before = pool.checksums()
    weights = run_distributed(_gather_worker, 2, 2, 1)[0]  # a TP = 2 megatron policy
    stats = pool.load_weights(iter(weights.items()))
    after = pool.checksums()
    assert before[0] == before[1] and after[0] == after[1] and after != before  # both serve the new weights
    assert stats.num_tensors == len(weights) and stats.buckets > 1
    groups = pool.generate(PROMPTS, G)
    assert [len(g) for g in groups] == [G] * len(PROMPTS)
    seqs, lens, logp, mask = _flatten(groups)
    trainer = run_distributed(_score_worker, 2, 2, 1, seqs, lens)[0]
    assert ((logp - trainer).abs() * mask).max() <= 1e-4
    pool.close()


def test_a_dead_server_is_named_or_failed_over(servers):
    started, rollout = servers
    dead = started[1]
    dead.stop()
    strict = ServerPool([s.url for s in started], rollout)
    with pytest.raises(ServerError, match=f"vLLM server {dead.url} is unreachable"):
        strict.generate(PROMPTS, G)
    failover = ServerPool([s.url for s in started], RolloutConfig(
        max_new_tokens=MAX_NEW, request_timeout_s=60, on_server_failure="failover"))
    groups = failover.generate(PROMPTS, G)
    assert [len(g) for g in groups] == [G] * len(PROMPTS)  # every prompt still gets G samples
    assert failover.alive == [started[0].url]
    with pytest.raises(ServerError, match="is unreachable"):
        ServerPool([dead.url], rollout).load_weights(iter([("model.norm.weight", torch.ones(128))]))


def test_a_server_that_cannot_start_is_named(tmp_path):
    (tmp_path / "hf").mkdir()  # no config.json: vLLM exits at once
    server = VLLMServer(tmp_path / "hf", free_port(), RolloutConfig(), seed=0, max_model_len=32, log_dir=tmp_path)
    try:
        with pytest.raises(ServerError, match="exited with code .* while starting; log"):
            server.wait_ready(timeout_s=120)
    finally:
        server.stop()


def test_weight_transfer_layout_and_metadata_contract():
    """One group: trainer rank 0, then each server's workers at their offsets; a round whose tensors
    differ from the recorded metadata (what vLLM sized its buffers from) is refused, naming the tensor."""
    from vllm.distributed.weight_transfer.base import ParamMeta

    from gift_megatron.rollout.weight_transfer import WeightTransfer, _RoundSource

    wt = WeightTransfer("nccl", ["http://a:1", "http://b:2", "http://c:3"], [4, 4, 2], [], master_address="10.0.0.1",
                        master_port=29600, timeout_s=5)
    assert wt.client.offsets == [1, 5, 9] and wt.world_size == 11
    source = _RoundSource([ParamMeta("w", torch.float32, (2, 3)), ParamMeta("b", torch.float32, (3,))])
    source.stream = iter([("w", torch.zeros(2, 3)), ("b", torch.zeros(3))])
    assert [n for n, _ in source] == ["w", "b"]
    source.stream = iter([("w", torch.zeros(2, 3)), ("b", torch.zeros(4))])
    with pytest.raises(RuntimeError, match=r"tensor 1 is b \(4,\) torch.float32, the servers expect b \(3,\)"):
        list(source)
    with pytest.raises(RuntimeError, match="no weights were handed over"):
        list(source)
