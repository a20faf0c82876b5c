"""The mismatch alarm, by hand: warn above the threshold, stop after `patience` checked steps in a row."""

import logging

import pytest

from gift_megatron.mismatch import MismatchAlarm, MismatchError, logprob_mismatch


def _stats(mean, peak=None):
    return {"logprob_diff_mean": mean, "logprob_diff_max": mean if peak is None else peak}


def test_alarm_warns_then_stops_and_a_good_step_resets_it(caplog):
    alarm = MismatchAlarm(1e-3, patience=3, log=logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        alarm.check(0, _stats(5e-4))  # under: nothing
        alarm.check(1, _stats(2e-3))
        alarm.check(2, _stats(3e-3))
        alarm.check(3, _stats(1e-3))  # equal to the threshold is fine: resets the count
        alarm.check(4, _stats(0.5))
        alarm.check(5, _stats(float("nan")))  # NaN is never "fine"
        with pytest.raises(MismatchError, match=r"step 6: .* by 22.8 nats .* 3 checked steps in a row"):
            alarm.check(6, _stats(22.8, 40.0))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and "1 of 3" in warned[0] and "2 of 3" in warned[1] and "1 of 3" in warned[2]


def test_mismatch_stats_by_hand():
    import torch

    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    trainer = torch.tensor([[-1.1, -2.0, -9.0], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the 6-nat gap is padding: excluded
    out = logprob_mismatch(engine, trainer, mask)
    assert out["logprob_diff_mean"] == pytest.approx(0.4 / 4) and out["logprob_diff_max"] == pytest.approx(0.3)
