"""Plot helpers: the per-domain means they draw, and that they write a PNG."""
import numpy as np

from mdmt_tf.report import plots


def test_domain_means_per_domain_and_nan_for_an_empty_domain():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    domain = np.array([0, 0, 2])
    grid = plots.domain_means(values, domain, 3)
    np.testing.assert_allclose(grid[0], [2.0, 3.0])
    assert np.isnan(grid[1]).all()
    np.testing.assert_allclose(grid[2], [10.0, 20.0])


def test_gate_nu_draws_epnet_and_every_ppnet_task(tmp_path):
    rng = np.random.default_rng(0)
    domain = rng.integers(0, 3, 200)
    scalings = {"epnet": rng.uniform(0, 2, (200, 40)), "ppnet_0": rng.uniform(0, 2, (200, 2, 16))}
    path = plots.gate_nu(scalings, domain, ["a", "b", "c"], ["click", "like"], tmp_path / "gate_nu.png")
    assert path.stat().st_size > 5000
    assert plots.gate_nu({}, domain, ["a"], ["click"], tmp_path / "none.png") is None


def test_gate_utilisation_ignores_non_expert_gates(tmp_path):
    domain = np.array([0, 1, 1])
    weights = np.array([[[0.2, 0.8]], [[0.5, 0.5]], [[0.7, 0.3]]])  # [B, tasks=1, experts=2]
    path = plots.gate_utilisation({"shared": weights}, domain, ["a", "b"], ["click"], tmp_path / "g.png")
    assert path.stat().st_size > 5000
    np.testing.assert_allclose(plots.domain_means(weights[:, 0], domain, 2), [[0.2, 0.8], [0.6, 0.4]])
