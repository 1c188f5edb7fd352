"""models.metrics: distances to reference draws, the per-coordinate summary and diagnose()."""

import numpy as np
import pytest
import torch

from models.methods import FitResult
from models.metrics import diagnose, energy_distance, mean_error, summary_table


def test_energy_distance_separates_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g)
    same = energy_distance(a, b)
    shifted = energy_distance(a, b + 1.0)
    assert shifted > 10 * same
    # V-statistic between two N(0, I) samples: small, and the chunked version is identical
    assert same < 0.05
    torch.testing.assert_close(energy_distance(a, b + 1.0, chunk_size=7), shifted)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        energy_distance(torch.randn(4, 2), torch.randn(4, 3))


def test_mean_error_in_sd_units():
    draws = {"a": torch.full((10, 2), 1.0)}
    assert mean_error(draws, {"a": torch.zeros(2)}) == pytest.approx(1.0)
    assert mean_error(draws, {"a": torch.zeros(2)},
                      scale={"a": torch.full((2,), 2.0)}) == pytest.approx(0.5)


def _result(kind="draws", chains=2, ess_defined=True, **fields):
    g = torch.Generator().manual_seed(0)
    draws = {"mu": torch.randn(chains, 200, 2, generator=g), "s": torch.rand(chains, 200,
                                                                             generator=g)}
    return FitResult("m", "toy", draws, 1.0, kind=kind, ess_defined=ess_defined, **fields)


def test_summary_table_has_diagnostics_only_where_defined():
    rows = summary_table(_result())
    assert [r["site"] for r in rows] == ["mu[0]", "mu[1]", "s"]
    assert all({"ess_bulk", "r_hat"} <= set(r) for r in rows)
    assert all(np.isfinite(r["r_hat"]) for r in rows)  # never an all-NaN column
    vi = summary_table(_result(chains=1, ess_defined=False))
    assert all("r_hat" not in r and "ess_bulk" not in r for r in vi)
    particles = summary_table(_result(kind="particles", ess_defined=False))
    assert all("r_hat" in r and "ess_bulk" not in r for r in particles)


def test_diagnose_names_the_fit_and_reports_method_warnings():
    summary, messages = diagnose(_result())
    assert summary.startswith("m on toy: 2 chains x 200 draws") and messages == []
    vi = _result(chains=1, ess_defined=False, info={"stop": "cap", "num_steps": 50, "lr": 0.1,
                                                    "final_lr": 0.1},
                 warnings=["m on toy: hit the cap"])
    summary, messages = diagnose(vi)
    assert "hit the step cap after 50 steps" in summary and messages == ["m on toy: hit the cap"]
    coin = _result(kind="particles", ess_defined=False, info={"ksd": 3.0, "initial_ksd": 4.0})
    summary, messages = diagnose(coin)
    assert "KSD 4 -> 3" in summary and "has not fallen" in messages[0]
