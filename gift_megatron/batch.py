"""The one batch type between rollout and training (both sides import it; torch only).

Legend: B = samples, S = longest prompt + completion, T = S - 1 predicted positions.
Prompt-major: sample j of prompt i is row i * n + j, n = `samples_per_prompt`. Token t of a sequence
is predicted at position t - 1, so a completion of c tokens after a prompt of p tokens occupies
tokens_BS[:, p : p + c], response_mask_BS there, and the log-prob tensors' [:, p - 1 : p - 1 + c].
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from gift_megatron.algo.layout import sequence_lengths


@dataclass
class RolloutBatch:
    """One step's samples: built by the rollout stage (rollout/stage.py) with rewards and advantages,
    sharded over DP ranks, completed with proximal/reference log-probs, consumed by megatron/train_step.py."""

    tokens_BS: torch.Tensor  # prompt + response token ids, right-padded
    response_mask_BS: torch.Tensor  # 1.0 where tokens_BS holds a response token
    rewards_B: torch.Tensor | None
    advantages_B: torch.Tensor | None  # A: group-relative advantages (algo/advantages.py)
    samples_per_prompt: int  # rows per prompt in THIS batch: G as generated, G / DP in a DP rank's shard
    proximal_logp_BT: torch.Tensor | None = None  # log-probs of tokens_BS[:, 1:]: the trainer at the step's start
    ref_logp_BT: torch.Tensor | None = None  # log-probs of tokens_BS[:, 1:] (reference)
    behaviour_logp_BT: torch.Tensor | None = None  # the engine's (the weights that generated), 0 off the response
    prompt_index_B: torch.Tensor | None = None  # each row's prompt, when rows are not prompt-major (token budgets)

    def __post_init__(self) -> None:
        """Every tensor field is declared in POSITIONS (how many sequence positions it has), so `resize`
        and `select` can never skip one silently (a new field must say what it is)."""
        tensors = {f.name for f in fields(self) if f.name != "samples_per_prompt"}
        assert tensors == set(POSITIONS), f"RolloutBatch fields {sorted(tensors ^ set(POSITIONS))}: update POSITIONS"

    def select(self, idx: torch.Tensor | slice) -> RolloutBatch:
        """Rows `idx` of every per-sample tensor."""
        picked = {f.name: getattr(self, f.name)[idx] for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **picked)

    def resize(self, S: int) -> RolloutBatch:
        """The first S positions of every sequence tensor (zero-padded when S is longer): a micro-batch
        padded only to its own longest sample. Positions past a sequence's end never affect it (causal)."""
        def fit(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[:, :n] if t.shape[1] >= n else torch.nn.functional.pad(t, (0, n - t.shape[1]))
        sized = {name: fit(getattr(self, name), S - shorter) for name, shorter in POSITIONS.items()
                 if shorter is not None and getattr(self, name) is not None}
        return replace(self, **sized)  # type: ignore[arg-type]  # (only the tensor fields, by name)

    def mini_batches(self, n: int) -> list[RolloutBatch]:
        """n contiguous prompt ranges of equal size (one optimizer step each)."""
        B = self.tokens_BS.shape[0]
        if B % n or (B // n) % self.samples_per_prompt:
            raise ValueError(f"{B} samples ({self.num_prompts} prompts) do not split into {n} mini-batches of whole "
                             f"prompts: algo.num_mini_batches must divide the prompts per step")
        size = B // n
        return [self.select(slice(i, i + size)) for i in range(0, B, size)]

    def __len__(self) -> int:
        """Samples (rows)."""
        return self.tokens_BS.shape[0]

    def sequence_lengths(self) -> torch.Tensor:
        """Positions each row needs: through its last response token (2 at least: one predicted position)."""
        return sequence_lengths(self.response_mask_BS)

    @property
    def mask_BT(self) -> torch.Tensor:
        return self.response_mask_BS[:, 1:]

    @property
    def num_prompts(self) -> int:
        return self.tokens_BS.shape[0] // self.samples_per_prompt

    @property
    def group_index_B(self) -> torch.Tensor:
        """The prompt of each row, 0 .. num_prompts - 1."""
        if self.prompt_index_B is not None:
            return self.prompt_index_B
        return torch.arange(self.tokens_BS.shape[0], device=self.tokens_BS.device) // self.samples_per_prompt


POSITIONS: dict[str, int | None] = {
    "tokens_BS": 0, "response_mask_BS": 0,  # S positions
    "proximal_logp_BT": 1, "ref_logp_BT": 1, "behaviour_logp_BT": 1,  # T = S - 1 predicted positions
    "rewards_B": None, "advantages_B": None, "prompt_index_B": None,  # one value per sample
}
"""RolloutBatch's tensor fields: by how many positions each is shorter than S (None: per sample only)."""
