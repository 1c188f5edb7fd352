"""The side-by-side harness: interleaved timing, ratios vs targets, JSON output."""

import json
import time

import pytest

from benchmarks import harness
from benchmarks.harness import Target, benchmark


@benchmark("_test_sleep", targets=[Target("slow", "fast", ">=", 1.5), Target("fast", "slow", ">=", 2.0),
                                   Target("fast", "slow", ">=", 1.0, metric="ess_per_s")], repeats=6)
def _sleepers(quick):
    return {
        "fast": lambda: time.sleep(0.002) or {"ess": 100.0},
        "slow": lambda: time.sleep(0.006) or {"ess": 100.0},
    }


def test_ratios_targets_and_json(tmp_path):
    record = harness.run("_test_sleep", out_dir=str(tmp_path))
    fast, slow = record["results"]["fast"], record["results"]["slow"]
    assert fast["repeats"] == slow["repeats"] == 6
    assert slow["median_s"] > fast["median_s"]
    t_slow_fast, t_fast_slow, t_ess = record["targets"]
    assert t_slow_fast["ratio"] == pytest.approx(slow["median_s"] / fast["median_s"])
    assert t_slow_fast["met"] is True  # ~3x slower
    assert t_fast_slow["met"] is False  # fast/slow ~ 0.33 < 2
    assert t_ess["met"] is True and fast["ess_per_s"] > slow["ess_per_s"]
    saved = json.loads((tmp_path / "_test_sleep.json").read_text())
    assert saved["machine"]["torch"] and saved["targets"][0]["target"].startswith("time(slow)")
    assert "met" in harness.format_record(record)


def test_unknown_benchmark_lists_available():
    with pytest.raises(KeyError, match="available"):
        harness.run("no_such_benchmark")


def test_target_validation():
    with pytest.raises(ValueError, match="op"):
        Target("a", "b", "<", 1.0)
    with pytest.raises(ValueError, match="metric"):
        Target("a", "b", "<=", 1.0, metric="memory")


def test_markdown_report(tmp_path):
    from benchmarks.__main__ import main

    report = tmp_path / "RESULTS.md"
    assert main(["_test_sleep", "--out", str(tmp_path), "--report", str(report)]) == 0
    text = report.read_text()
    assert "| _test_sleep | time(slow) / time(fast) >= 1.5 |" in text and "do not edit by hand" in text
