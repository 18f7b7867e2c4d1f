"""Tests of flowpolicy.diagnostics: exact grid masses and the dQ/alpha callback."""

from __future__ import annotations

import csv
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.logger import configure
from torch.distributions import Normal

import flowpolicy
from flowpolicy.diagnostics import (
    QGapCallback,
    action_distribution,
    action_grid,
    density_grid,
    q_values,
    region_mass,
    side_mass,
)
from flowpolicy.flows import squashed_gaussian

torch.set_num_threads(1)


def test_action_grid_covers_the_square():
    points, area = action_grid(50)
    assert points.shape == (50, 50, 2)
    assert area * 50 * 50 == pytest.approx(4.0)
    assert points.abs().max() < 1.0  # midpoints never touch the singular boundary
    assert points[0, 1, 0] > points[0, 0, 0] and points[1, 0, 1] > points[0, 0, 1]  # x cols, y rows


def test_side_mass_matches_the_exact_gaussian_masses():
    # tanh is monotone per dimension: P(a_x < 0) = P(u_x < 0) = Phi(-mu / sigma), exactly
    mean = [[0.3, -0.2], [-0.5, 0.1], [0.0, 0.4]]
    std = [[0.3, 0.4], [0.2, 0.2], [0.5, 0.3]]
    dist = squashed_gaussian(mean, std)
    masses = side_mass(dist, None, resolution=300)
    phi = Normal(0.0, 1.0).cdf(-torch.tensor(mean)[:, 0] / torch.tensor(std)[:, 0]).numpy()
    np.testing.assert_allclose(masses["total"], 1.0, atol=2e-3)
    np.testing.assert_allclose(masses["left"], phi, atol=3e-3)
    np.testing.assert_allclose(masses["left"] + masses["right"], masses["total"], atol=1e-9)
    assert np.all(masses["gap"] <= masses["total"])


def test_region_mass_of_a_box_matches_the_product_of_cdfs():
    dist = squashed_gaussian([0.2, -0.1], [0.4, 0.6])
    lo, hi = math.atanh(-0.5), math.atanh(0.5)
    normal_x, normal_y = Normal(0.2, 0.4), Normal(-0.1, 0.6)
    exact = (normal_x.cdf(torch.tensor(hi)) - normal_x.cdf(torch.tensor(lo))) * (
        normal_y.cdf(torch.tensor(hi)) - normal_y.cdf(torch.tensor(lo))
    )
    mass = region_mass(dist, None, lambda p: (p.abs() < 0.5).all(-1), resolution=400)
    assert mass.shape == (1,)
    assert mass[0] == pytest.approx(float(exact), abs=2e-3)


def test_auto_method_samples_where_the_density_is_narrower_than_a_cell():
    # two states: a broad density (the grid resolves it) and one 100x narrower than a cell
    dist = squashed_gaussian([[0.3, 0.0], [0.01, 0.0]], [[0.3, 0.3], [1e-4, 1e-4]])
    grid = side_mass(dist, None, resolution=100, method="grid")
    assert abs(grid["total"][1] - 1.0) > 0.1  # the grid misses the spike's mass
    auto = side_mass(dist, None, resolution=100, method="auto", num_samples=4000)
    np.testing.assert_allclose(auto["total"], 1.0, atol=5e-3)
    assert auto["left"][0] == pytest.approx(grid["left"][0])  # resolved state: still the grid
    assert auto["right"][1] == pytest.approx(1.0)  # all of the spike at a_x = 0.01 > 0
    sampled = side_mass(dist, None, method="sample", num_samples=20000)
    phi = float(Normal(0.0, 1.0).cdf(torch.tensor(-1.0)))
    assert sampled["left"][0] == pytest.approx(phi, abs=0.015)  # 4.5 standard errors


def test_side_mass_direction_rotates_the_sides():
    dist = squashed_gaussian([[0.8, 0.0]], [[0.2, 0.2]])  # heading east
    north = side_mass(dist, None, direction=(0.0, 1.0))
    east = side_mass(dist, None, direction=(1.0, 0.0))
    assert north["right"][0] > 0.99  # east is right of north
    assert east["gap"][0] > 0.4  # straight ahead of east
    assert abs(east["left"][0] - east["right"][0]) < 0.02  # symmetric about the direction


def test_bad_inputs_raise_clear_errors():
    dist = squashed_gaussian([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="resolution"):
        action_grid(1)
    with pytest.raises(ValueError, match="direction"):
        side_mass(dist, None, direction=(0.0, 0.0))
    with pytest.raises(ValueError, match="region returned shape"):
        region_mass(dist, None, lambda p: torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="method"):
        side_mass(dist, None, method="quadrature")
    with pytest.raises(ValueError, match="unsupported policy"):
        action_distribution(object(), np.zeros(2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: action_grid(2.5), "resolution must be an integer >= 2, got 2.5"),
        (lambda d: action_grid(10, float("nan"), 1.0), "low must be finite"),
        (lambda d: action_grid(10, -1.0, float("inf")), "high must be finite"),
        (lambda d: density_grid(d, None, resolution=2.5), "resolution must be an integer"),
        (lambda d: side_mass(d, None, method="sample", num_samples=2.5), "num_samples must be"),
        (lambda d: side_mass(d, None, method="sample", num_samples=0), "num_samples must be"),
        (lambda d: side_mass(d, None, tolerance=float("nan")), "tolerance must be finite"),
        (lambda d: side_mass(d, None, gap=-0.1), "gap must be finite and >= 0"),
        (lambda d: side_mass(d, None, gap=float("nan")), "gap must be finite"),
        (lambda d: side_mass(d, None, direction=(float("nan"), 1.0)), "direction must be finite"),
    ],
)
def test_bad_numbers_raise_clear_errors(call, match):
    """Non-integer counts, NaN tolerances and negative gaps once gave torch errors or results."""
    with pytest.raises(ValueError, match=match):
        call(squashed_gaussian([0.0, 0.0], [1.0, 1.0]))


def test_nan_observations_raise_even_without_torchs_default_validation(lake_models):
    """torch.compile anywhere turns torch's distribution validation off for the process."""
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        for model in lake_models:
            obs = np.array([[np.nan, 0.0], [0.0, -1.25]])
            with pytest.raises(ValueError, match="observations contain NaN"):
                side_mass(model, obs, method="sample", num_samples=10)
            with pytest.raises(ValueError, match="observations contain NaN"):
                q_values(model, obs, np.zeros((2, 2)))
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)


def test_empty_batches_and_bad_actions_in_q_values(lake_models):
    for model in lake_models:
        assert q_values(model, np.zeros((0, 2)), np.zeros((0, 2))).shape == (0,)
        assert side_mass(model, np.zeros((0, 2)), resolution=10)["total"].shape == (0,)
        with pytest.raises(ValueError, match="actions must be finite, one of size 2"):
            q_values(model, np.zeros((2, 2)), np.full((2, 2), np.nan))
        with pytest.raises(ValueError, match="actions must be finite, one of size 2"):
            q_values(model, np.zeros((2, 2)), np.zeros((3, 2)))


@pytest.fixture(scope="module")
def lake_models():
    kwargs = dict(learning_starts=50, batch_size=32, seed=0, verbose=0)
    arch = dict(net_arch=[16, 16])
    gaussian = SAC("MlpPolicy", "LakeCrossing-v0", policy_kwargs=arch, **kwargs)
    flow = SAC(
        flowpolicy.FlowPolicy,
        "LakeCrossing-v0",
        policy_kwargs=dict(**arch, flow_kwargs=dict(nonlinearity="spline", layers=2)),
        **kwargs,
    )
    return gaussian, flow


def test_sb3_gaussian_actor_density_matches_sb3_log_prob(lake_models):
    gaussian, _ = lake_models
    obs = torch.tensor([[0.0, -1.25], [0.5, -1.0]])
    actions, sb3_log_prob = gaussian.policy.actor.action_log_prob(obs)
    ours = action_distribution(gaussian, obs.numpy()).log_prob(actions)
    # SB3 adds 1e-6 inside log(1 - a^2): tiny differences only
    torch.testing.assert_close(ours, sb3_log_prob, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("index", [0, 1])
def test_policies_integrate_to_one(lake_models, index):
    model = lake_models[index]
    states = np.array([[0.0, -1.25], [1.2, 0.0]], dtype=np.float32)
    log_prob, _, _ = density_grid(model, states, resolution=120)
    assert log_prob.shape == (2, 120, 120) and torch.isfinite(log_prob).all()
    masses = side_mass(model, states, resolution=200)
    np.testing.assert_allclose(masses["total"], 1.0, atol=0.03)


def test_qgap_callback_logs_dq_over_alpha(lake_models, tmp_path):
    model = lake_models[0]
    model.set_logger(configure(str(tmp_path), ["csv"]))
    start = np.array([[0.0, -1.25]], dtype=np.float32)
    left, right = np.array([[-0.8, 0.6]]), np.array([[0.8, 0.6]])
    callback = QGapCallback(start, left, right, every=40)
    model.learn(120, callback=callback)
    assert [h["timesteps"] for h in callback.history] == [40, 80, 120]
    last = callback.history[-1]
    dq = q_values(model, start, left) - q_values(model, start, right)
    alpha = float(model.log_ent_coef.detach().exp())
    assert last["alpha"] == pytest.approx(alpha)
    assert last["dq_over_alpha"][0] == pytest.approx(float(dq[0] / alpha), rel=1e-5)
    model.logger.dump(model.num_timesteps)
    with open(tmp_path / "progress.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert "qgap/dq_over_alpha_0" in rows[-1] and "qgap/alpha" in rows[-1]
    assert float(rows[-1]["qgap/dq_over_alpha_0"]) == pytest.approx(last["dq_over_alpha"][0])


def test_qgap_callback_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must match"):
        QGapCallback(np.zeros((2, 2)), np.zeros((1, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="every"):
        QGapCallback(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), every=0)


def test_works_on_other_envs_obs_shapes():
    env = gym.make("LakeCrossing-v0")
    obs, _ = env.reset(seed=0)
    dist = squashed_gaussian([0.0, 0.0], [0.5, 0.5])
    masses = side_mass(dist, obs)  # a distribution ignores the observation
    assert masses["left"][0] == pytest.approx(0.5, abs=1e-6)
