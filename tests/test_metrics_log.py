"""metrics.jsonl on resume: damaged lines are named and removed, valid rows up to the resumed step all kept."""

import json
import logging

import pytest

from gift_megatron.metrics_log import MetricsLog


def _write(run_dir, lines: list[str | bytes | dict]) -> None:
    """metrics.jsonl from rows (dicts), raw text lines and raw bytes; every line but a bytes one ends in \\n."""
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        out += line if isinstance(line, bytes) else line.encode() + b"\n"
    (run_dir / "metrics.jsonl").write_bytes(out)


def _rewind(run_dir, step: int) -> MetricsLog:
    m = MetricsLog(run_dir, writes=True)
    m.rewind(step)
    m.close()
    return m


def _file_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_torn_line_in_the_middle_keeps_every_valid_row_after_it(tmp_path, caplog):
    """The old reader stopped at the first torn line and dropped steps 3 and 4 without a word."""
    _write(tmp_path, [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}, '{"step": 9, "rew',
                      {"step": 3, "reward": 0.3}, {"step": 4, "reward": 0.4}, {"step": 5}, b'{"step": 6, "re'])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 4)
    assert [r["step"] for r in m.history] == [1, 2, 3, 4]  # step 5 is past the checkpoint: it runs again
    assert _file_steps(tmp_path) == [1, 2, 3, 4]  # the file is rewritten without the damaged lines
    warned = _warnings(caplog)
    assert len(warned) == 2, warned
    assert "metrics.jsonl:3" in warned[0] and '{"step": 9, "rew' in warned[0]
    assert "metrics.jsonl:7" in warned[1] and '{"step": 6, "re' in warned[1]  # a partial last line


@pytest.mark.parametrize("line,why", [
    ("[1, 2]", "not an object"),
    ('{"reward": 1.0}', 'no int "step"'),
    ('{"step": "3"}', 'no int "step"'),
    ('{"step": true}', 'no int "step"'),
    ('{"step": 2.5}', 'no int "step"'),
])
def test_a_row_that_parses_but_has_no_int_step_is_named_as_damaged(tmp_path, caplog, line, why):
    """These used to crash rewind (KeyError/TypeError) or slip through as a step."""
    _write(tmp_path, [{"step": 1}, line, {"step": 2}])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 5)
    assert [r["step"] for r in m.history] == [1, 2]
    (warned,) = _warnings(caplog)
    assert "metrics.jsonl:2" in warned and why in warned and line[:10] in warned


def test_invalid_utf8_is_a_damaged_line_not_a_crash(tmp_path, caplog):
    """read_text() raised UnicodeDecodeError on a line of disk garbage and the resume failed."""
    _write(tmp_path, [{"step": 1}, b'{"step": 2, "r\xff\xfe": 1}\n', {"step": 3}])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 3)
    assert [r["step"] for r in m.history] == [1, 3]
    (warned,) = _warnings(caplog)
    assert "metrics.jsonl:2" in warned and "UTF-8" in warned


def test_a_restart_that_skipped_rewind_supersedes_the_abandoned_rows(tmp_path, caplog):
    """Steps 1..5, then a run restarted from step 2 logged 3 and 4 again: 3..5 of the first run are an
    abandoned timeline (keeping 5 would put it before the new 3 and 4), so the rows stay in increasing
    step order with the later run's values."""
    _write(tmp_path, [{"step": s, "run": "a"} for s in range(1, 6)] + [{"step": s, "run": "b"} for s in (3, 4)])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 10)
    assert [(r["step"], r["run"]) for r in m.history] == [(1, "a"), (2, "a"), (3, "b"), (4, "b")]
    assert _file_steps(tmp_path) == [1, 2, 3, 4]
    (warned,) = _warnings(caplog)
    assert "metrics.jsonl:6" in warned and "step 3" in warned and "[3, 4, 5]" in warned


def test_two_interleaved_runs_keep_the_last_row_of_each_step_and_warn(tmp_path, caplog):
    _write(tmp_path, [{"step": 1, "run": "a"}, {"step": 1, "run": "b"}, {"step": 2, "run": "a"},
                      {"step": 2, "run": "b"}])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 2)
    assert [(r["step"], r["run"]) for r in m.history] == [(1, "b"), (2, "b")]
    warned = _warnings(caplog)
    assert len(warned) == 2 and "[1]" in warned[0] and "[2]" in warned[1], warned


def test_a_clean_file_is_rewound_silently_and_a_fresh_start_keeps_nothing(tmp_path, caplog):
    _write(tmp_path, [{"step": s, "eval_accuracy": s / 10} for s in range(0, 6)])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 3)
    assert [r["step"] for r in m.history] == [0, 1, 2, 3] and m.evals() == [0.0, 0.1, 0.2, 0.3]
    assert _warnings(caplog) == []
    _write(tmp_path, [{"step": 1}, "torn"])
    with caplog.at_level(logging.WARNING):
        m = _rewind(tmp_path, 0)
    assert m.history == [] and (tmp_path / "metrics.jsonl").read_text() == ""
    assert _warnings(caplog) == []  # a fresh start drops the old run's rows anyway: nothing to report


def test_rows_added_after_a_rewind_follow_the_kept_ones(tmp_path):
    _write(tmp_path, [{"step": 1}, "garbage", {"step": 2}, {"step": 3}])
    m = MetricsLog(tmp_path, writes=True)
    m.rewind(2)
    m.add(3, {"reward": 1.0})
    m.close()
    assert _file_steps(tmp_path) == [1, 2, 3] and [r["step"] for r in m.history] == [1, 2, 3]
