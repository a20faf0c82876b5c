"""The rollout stage (global rank 0): a source of scored batches, one per RL step.

`next()` samples P prompts, generates G completions of each (the engine: in-process vLLM or a
server pool), scores each group as it arrives, and returns a `RolloutBatch` with the explicit
rewards r and the group-relative advantages A = (r - mean_g r) / (std_g r + eps)
(algo/advantages.py `group_advantages`). The trainer only consumes batches, so a stage that runs
ahead of training stands in for this one (rollout/ahead.py, `rollout.max_staleness` > 0).
`evaluate()` runs the held-out prompts; `load_weights` syncs the engine to a new policy version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gift_megatron.algo import GroupFilter, group_advantages, overlong_penalty
from gift_megatron.batch import RolloutBatch
from gift_megatron.config import AlgoConfig, RolloutConfig
from gift_megatron.rollout.batch import finished, pad_groups, response_lengths
from gift_megatron.rollout.data import PromptSampler
from gift_megatron.rollout.engine import Completion, Engine, SyncStats
from gift_megatron.rollout.rewards import GroupScorer
from gift_megatron.rollout.tasks import Sample, TaskData

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    batch: RolloutBatch  # P x G samples with rewards and advantages (engine log-probs included)
    metrics: dict[str, float]  # reward, lengths, generation throughput, DAPO's sampling stats
    prompts: list[int] = field(default_factory=list)  # the task's train indices, one per group
    sampler_state: tuple[int, int] = (0, 0)  # the prompt sampler's (epoch, position) after drawing them
    version: int = 0  # the policy version the engine generated with: the weights after that many steps


@dataclass
class _Groups:
    """One generation round's results: prompts (sample indices), completions, rewards and reward terms."""

    idx: list[int]
    completions: list[list[Completion]]
    rewards_B: torch.Tensor
    parts: dict[str, torch.Tensor]


class Rollouts(Protocol):
    """What the trainer uses of its rollout side: `RolloutStage` (generates when asked, max_staleness 0)
    and `RolloutsAhead` (rollout/ahead.py: generates ahead on a thread) both are one. Rank 0 holds it."""

    sampler: PromptSampler
    waited_s: float | None
    """The trainer's wait for the engine in the last load_weights (None: it never waits)."""

    def next(self) -> Rollout:
        """The next step's scored groups."""
        ...

    def generated_with(self, version: int) -> Rollout:
        """A batch generated ahead with weights `version`, not yet taken (verification of stale steps)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """The policy after `version` steps into the engine."""
        ...

    def evaluate(self, num_samples: int = 1) -> dict[str, float]:
        ...

    def pending(self) -> tuple[list[Rollout], dict[str, int]]:
        """Batches generated but not yet trained, and the prompt sampler's state after them (checkpoints)."""
        ...

    def restore(self, trained: int, pending: Iterable[Rollout], sampler_state: dict[str, int] | None) -> None:
        """After a resume: a checkpoint's batches generated ahead, kept if this run's bound allows them."""
        ...

    def close(self) -> None:
        ...


class RolloutStage:
    """Generates each step's batch when the trainer asks (max_staleness 0): nothing is ever pending."""

    waited_s = None

    def __init__(self, algo: AlgoConfig, rollout: RolloutConfig, engine: Engine, task: TaskData, scorer: GroupScorer,
                 sampler: PromptSampler, *, num_prompts: int, seed: int) -> None:
        self.algo, self.rollout, self.engine, self.task = algo, rollout, engine, task
        self.scorer, self.sampler, self.num_prompts, self.seed = scorer, sampler, num_prompts, seed
        self.version = 0  # of the weights the engine holds

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """The policy after `version` steps into the engine (Engine.load_weights)."""
        stats = self.engine.load_weights(named_tensors)
        self.version = version
        return stats

    def generated_with(self, version: int) -> Rollout:
        """Generating on demand, the stage holds no batch made ahead: a trainer that asks is broken."""
        raise RuntimeError(f"a batch generated ahead with version {version} was asked of the stage, which generates "
                           f"on demand (rollout.max_staleness=0): every batch is generated with the current weights")

    def pending(self) -> tuple[list[Rollout], dict[str, int]]:
        return [], self.sampler.state_dict()

    def restore(self, trained: int, pending: Iterable[Rollout], sampler_state: dict[str, int] | None) -> None:
        """Batches a run with max_staleness > 0 generated ahead are dropped (this run generates on demand):
        the sampler stays where the trained ones left it, as RolloutsAhead does when its bound is smaller."""
        dropped = list(pending)
        if dropped:
            log.info("dropped %d batches generated ahead by the checkpoint's run (rollout.max_staleness=0 now): "
                     "their prompts are drawn again", len(dropped))

    def next(self) -> Rollout:
        """P prompts x G samples, scored, with advantages; DAPO's dynamic sampling when configured."""
        start, metrics = time.perf_counter(), dict[str, float]()
        if self.algo.dynamic_sampling:
            groups, metrics = self._informative_groups()
        else:
            groups = self._generate()
        seconds = time.perf_counter() - start
        prompts = [self.task.train[i].prompt_ids for i in groups.idx]
        batch = pad_groups(prompts, groups.completions, self.task.pad_id)
        lengths_B = response_lengths(groups.completions)
        shaped_B = groups.rewards_B.clone()
        if self.algo.overlong_buffer_length:
            shaped_B += overlong_penalty(lengths_B, self.rollout.max_new_tokens, self.algo.overlong_buffer_length,
                                         self.algo.overlong_penalty_factor)
        batch.rewards_B = shaped_B
        batch.advantages_B = group_advantages(shaped_B, batch.group_index_B, batch.num_prompts,
                                              estimator=self.algo.advantage)
        if len(groups.parts) > 1:
            metrics.update({f"reward_{k}": float(v.mean()) for k, v in groups.parts.items()})
        tokens = float(lengths_B.sum())
        metrics.update(reward=float(groups.rewards_B.mean()), response_length=float(lengths_B.float().mean()),
                       frac_finished=float(finished(groups.completions).float().mean()), time_generate=seconds,
                       tokens_generated=tokens, tokens_per_second=tokens / max(seconds, 1e-9))
        return Rollout(batch, metrics, groups.idx, (self.sampler.epoch, self.sampler.position), self.version)

    def _generate(self) -> _Groups:
        """One round: the sampler's next P prompts, G completions each, scored as groups arrive."""
        idx = self.sampler.next(self.num_prompts)
        # reproducible on resume: the seed follows the sampler's position, which checkpoints hold
        seed = self.seed * 1_000_003 + self.sampler.epoch * 10_007 + self.sampler.position
        samples = [self.task.train[i] for i in idx]
        arrivals = self.engine.generate_iter([s.prompt_ids for s in samples], self.algo.group_size, seed=seed)
        completions, rewards_B, parts = self.scorer.score_all(arrivals, samples)
        return _Groups(idx, completions, rewards_B, parts)

    def _informative_groups(self) -> tuple[_Groups, dict[str, float]]:
        """DAPO: rounds until P informative groups (rewards not all equal) or max_sampling_rounds,
        then topped up with uninformative ones (GroupFilter)."""
        G, wanted = self.algo.group_size, GroupFilter(self.num_prompts)
        while not wanted.full and wanted.rounds < self.algo.max_sampling_rounds:
            g = self._generate()
            wanted.add([(i, c, g.rewards_B[j * G:(j + 1) * G], {k: v[j * G:(j + 1) * G] for k, v in g.parts.items()})
                        for j, (i, c) in enumerate(zip(g.idx, g.completions))], g.rewards_B)
        chosen = wanted.take()
        groups = _Groups([x[0] for x in chosen], [x[1] for x in chosen], torch.cat([x[2] for x in chosen]),
                         {k: torch.cat([x[3][k] for x in chosen]) for k in chosen[0][3]})
        return groups, {"sampling_rounds": wanted.rounds, "frac_groups_informative": wanted.frac_informative}

    def evaluate(self, num_samples: int = 1) -> dict[str, float]:
        """Held-out accuracy (the task's check) and reward with greedy decoding; with `num_samples` =
        k > 1 also avg@k (mean accuracy of k sampled answers, at the rollout temperature) and pass@k
        (a prompt counts if any of its k answers is right)."""
        samples, k = self.task.eval, num_samples
        prompts = [s.prompt_ids for s in samples]
        hits, totals = self._hits(self.engine.generate(prompts, 1, temperature=0.0), samples)
        out = {"eval_accuracy": float(hits.mean()), "eval_reward": float(totals.mean())}
        if k > 1:
            hits_k, _ = self._hits(self.engine.generate(prompts, k, seed=self.seed), samples)
            hits_k = hits_k.view(len(samples), k)
            out.update({f"eval_avg@{k}": float(hits_k.mean()), f"eval_pass@{k}": float(hits_k.amax(dim=1).mean())})
        return out

    def _hits(self, groups: list, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy per completion, reward per completion), flattened over groups."""
        _, totals, parts = self.scorer.score_all(enumerate(groups), samples)
        reward = self.scorer.reward
        hits = parts.get(reward.accuracy_kind)  # already scored when the check is one of the terms
        if hits is None:
            hits = torch.cat([reward.accuracy(g, s) for g, s in zip(groups, samples)])
        return hits.float(), totals

    def close(self) -> None:
        """Stop the scorer and the engine (the in-process engine ends torch.distributed: call last)."""
        self.scorer.close()
        self.engine.close()
