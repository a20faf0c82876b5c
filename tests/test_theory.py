"""The paper's theorem on a tabular bandit, with the real GIFT loss (bench/tabular_theory.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "tabular_theory", Path(__file__).resolve().parents[1] / "bench" / "tabular_theory.py")
tabular_theory = sys.modules["tabular_theory"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tabular_theory)


@pytest.mark.parametrize("seed", [0, 1])
def test_gift_minimiser_is_reference_tilted_by_reward_over_beta(seed):
    res = tabular_theory.run_bandit(num_prompts=6, num_actions=5, group_size=32, steps=3000, seed=seed)
    # Training moved the policy well away from pi_ref ...
    assert res.tv_from_ref.mean() > 0.03
    # ... onto the theorem's family pi_ref exp(r / beta(x)) / Z, with beta(x) = std_r / std_s.
    # The minimisers form a one-parameter family per prompt (any beta); sampling noise drifts along it
    # and actions that become rare are sampled rarely, so a prompt whose beta is still falling lags
    # (measured: max 3.4e-3 while most prompts are at 1e-7). Training moved pi ~0.1 TV.
    assert res.tv_to_theory.max() < 1e-2, res.tv_to_theory
    assert res.tv_to_theory.median() < 1e-5, res.tv_to_theory
    assert res.reward_final > res.reward_ref + 0.02
    assert (res.beta > 0).all()
