"""Worker functions for the megatron-core tests (each runs in a spawned gloo process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from gift_megatron.algo import build_loss, group_advantages  # noqa: F401  (build_loss: used by tests)
from gift_megatron.algo.layout import dp_sample_indices
from gift_megatron.config import (
    AlgoConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
)

P, G, S, V = 4, 4, 12, 64
PROMPT_LEN = 4


def test_model(**overrides) -> ModelConfig:
    """4 layers so that PP=2 with 2 virtual stages has a layer per chunk; 2 heads of 32 (TP=2 divides)."""
    fields = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=2,
                  kv_channels=32, vocab_size=V, make_vocab_size_divisible_by=1, max_position_embeddings=32,
                  init_method_std=0.1)
    fields.update(overrides)
    return ModelConfig(**fields)


# The trainer's losses with settings that exercise their branches (GRPO: k3 KL to the reference).
ALGOS = {
    "gift": dict(name="gift"),
    "gift_attached": dict(name="gift", detach_stats=False, implicit_std_floor=1e-3),  # gradient through mean/std
    "grpo": dict(name="grpo", kl_coef=0.05),
    "dapo": dict(name="dapo", clip_ratio_high=0.28, loss_agg_mode="token-mean", reference_refresh_every=0),
    "gspo": dict(name="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4, reference_refresh_every=0),
}
MAX_TOKENS = 20  # token-budget micro-batches of 1 to 3 samples (sequences of 6 to 12): every group is cut


def make_config(world, tp=1, pp=1, vpp=None, num_micro_batches=1, algo="gift", model=None, lr=1e-3,
                max_tokens=0, pack=False, adam_eps=1e-8) -> Config:
    dp = world // (tp * pp)
    return Config(
        model=model or test_model(),
        parallel=ParallelConfig(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp,
                                micro_batch_size=P * G // dp // num_micro_batches,
                                max_tokens_per_micro_batch=max_tokens, sequence_packing=pack),
        algo=AlgoConfig(group_size=G, **ALGOS[algo]),
        data=DataConfig(num_prompts_per_step=P, max_prompt_length=PROMPT_LEN),
        optim=OptimConfig(lr=lr, adam_eps=adam_eps, clip_grad=1.0), device="cpu",
        rollout=RolloutConfig(engine="vllm_server", max_new_tokens=S - PROMPT_LEN),  # (several ranks need servers)
    )


def step_batch(seed=0):
    """A prompt-major step batch: tokens, response mask, rewards, advantages, old and ref log-probs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (P * G, S), generator=g)
    lengths = torch.randint(2, S - PROMPT_LEN + 1, (P * G,), generator=g)
    pos = torch.arange(S)[None]
    resp = ((pos >= PROMPT_LEN) & (pos < PROMPT_LEN + lengths[:, None])).float()
    rewards = torch.randint(0, 2, (P * G,), generator=g).float()
    adv = group_advantages(rewards, torch.arange(P).repeat_interleave(G), P)
    old = torch.randn(P * G, S - 1, generator=g) * 0.1 - 4.0
    ref = torch.randn(P * G, S - 1, generator=g) * 0.1 - 4.0
    return tokens, resp, rewards, adv, old, ref


def local_batch(cfg: Config, seed=0):
    from megatron.core import parallel_state as ps

    from gift_megatron.batch import RolloutBatch

    tokens, resp, rewards, adv, old, ref = step_batch(seed)
    dp = cfg.parallel.data_parallel_size
    idx = dp_sample_indices(P, G, ps.get_data_parallel_rank(), dp)
    return RolloutBatch(tokens[idx], resp[idx], rewards[idx], adv[idx], G // dp, proximal_logp_BT=old[idx],
                        ref_logp_BT=ref[idx])


def setup(cfg: Config, seed: int = 1):
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy

    init_model_parallel(cfg.parallel, seed, on_gpu=False)
    return build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=100)


def batching(cfg: Config):
    from gift_megatron.megatron.train_step import MicroBatching

    p = cfg.parallel
    return MicroBatching(p.micro_batch_size, p.max_tokens_per_micro_batch, pack=p.sequence_packing)


def train(policy, cfg: Config, batch, steps: int = 1) -> list[dict]:
    """Steps on `batch`; with a token budget, GIFT's group statistics by its own forward pass."""
    from gift_megatron.algo import build_group_statistics
    from gift_megatron.megatron.train_step import train_mini_batch

    loss_fn, stats = build_loss(cfg.algo), build_group_statistics(cfg.algo)
    return [train_mini_batch(policy, loss_fn, batch, batching=batching(cfg), temperature=1.0, vocab_size=V,
                             group_statistics=stats) for _ in range(steps)]


def logprobs_everywhere(policy_chunks, cfg: Config, batch) -> torch.Tensor:
    """All positions' log-probs of this DP rank's batch, gathered over DP, known on every rank."""
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.train_step import compute_logprobs

    logp = compute_logprobs(policy_chunks, batch, batching(cfg), 1.0, V)
    box = [logp]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, box[0], group=ps.get_data_parallel_group())
    dp = len(parts)
    # Back to prompt-major order of the whole step batch.
    full = torch.empty(P * G, S - 1)
    for r, part in enumerate(parts):
        full[dp_sample_indices(P, G, r, dp)] = part
    return full


def full_logits(chunks) -> torch.Tensor | None:
    """Full-vocabulary logits of a fixed input through megatron's schedule, gathered over TP, on the
    last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = step_batch(3)[0][:2]
    captured = []

    def keep(logits):
        captured.append(logits.detach())
        return logits.sum() * 0, torch.zeros((), dtype=torch.int), {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(S)[None].expand(2, -1)
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
        return model(batch, pos, mask), keep

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks[0],
                                num_microbatches=1, seq_length=S, micro_batch_size=2, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = captured[0]
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)
