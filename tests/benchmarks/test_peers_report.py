"""The peers benchmark's harness logic that can go wrong without a peer installed: the paired ratio, the
comparison with keel's outputs, peers.json's schema, the table and the keel-slower list."""

from __future__ import annotations

import torch

from benchmarks.peers import harness, report
from benchmarks.peers.run import CASES


def test_cases_match_the_harness():
    assert CASES == harness.CASES


def test_paired_ratio_is_the_median_of_same_round_ratios():
    times = {"plain": [1.0, 2.0, 4.0], "steer": [1.1, 2.0, 8.0]}
    # per round 1.1, 1.0, 2.0: the median is 1.1, not the ratio of medians (2.0 / 2.0 = 1.0)
    assert abs(harness.paired_ratios(times)["steer"] - 1.1) < 1e-12
    assert "plain" not in harness.paired_ratios(times)


def test_compare_uses_the_tolerance_and_relative_gradients():
    ref = {"logits": torch.zeros(2, 3), "grads": {"w": torch.full((2,), 100.0)}}
    close = {"logits": torch.full((2, 3), 5e-6), "grads": {"w": torch.full((2,), 100.0 + 5e-4)}}
    assert harness.compare(close, ref)["matches_keel"]  # grad diff 5e-4 / 100 = 5e-6
    far = {"logits": torch.full((2, 3), 2e-5), "grads": {"w": torch.full((2,), 100.0)}}
    assert not harness.compare(far, ref)["matches_keel"]
    missing = {"logits": torch.zeros(2, 3), "grads": {"w": None}}
    assert harness.compare(missing, ref)["matches_keel"] is False
    wrong_shape = {"logits": torch.zeros(2, 4), "grads": {}}
    assert harness.compare(wrong_shape, ref)["matches_keel"] is False


def test_assemble_schema_and_failed_libraries():
    results = {
        "keel": {
            "cases": {"steer": {"time_ratio": 1.01, "memory_ratio": 1.0, "matches_keel": True, "error": None}}
        },
        "repeng": {"error": "not installed: ResolutionImpossible"},
    }
    peers = report.assemble(results, ("steer", "ablate"))
    assert set(peers) == {"keel", "repeng"}
    for by_case in peers.values():
        assert set(by_case) == {"steer", "ablate"}
        for r in by_case.values():
            assert set(r) == set(report.FIELDS)
    assert peers["keel"]["steer"]["time_ratio"] == 1.01
    assert peers["keel"]["ablate"]["error"] == "no result for this case"
    assert peers["repeng"]["steer"]["error"] == "not installed: ResolutionImpossible"
    table = report.table(peers, ("steer", "ablate"))
    assert "| keel | 1.01 / 1.00 / yes | fails |" in table
    assert "| repeng | fails | fails |" in table


def test_keel_slower_lists_only_cases_where_keel_is_above():
    row = lambda t: {"time_ratio": t, "memory_ratio": 1.0, "matches_keel": True, "error": None}  # noqa: E731
    peers = {
        "keel": {"steer": row(1.05), "ablate": row(1.00)},
        "nnsight": {"steer": row(1.02), "ablate": row(1.10)},
        "pyvene": {"steer": {**row(None), "error": "x"}, "ablate": row(0.99)},
    }
    assert report.keel_slower(peers) == [("nnsight", "steer", 1.05, 1.02), ("pyvene", "ablate", 1.00, 0.99)]
