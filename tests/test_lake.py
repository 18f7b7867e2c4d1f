"""Tests of the LakeCrossing environment, its scripted expert and the plotting helpers."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import flowpolicy.envs as lake_envs
from flowpolicy.envs import (
    LakeCrossingEnv,
    LakeExpert,
    LakeGeometry,
    collect_demonstrations,
    draw_lake,
    geodesic_distance,
    plot_trajectories,
    rollout,
)

DEFAULT_START = (0.0, -1.25)


def mirror(v):
    """Mirror about the default symmetry axis x = 0."""
    return np.array([-v[0], v[1]], dtype=np.asarray(v).dtype)


def shaping_part(env: LakeCrossingEnv, reward: float, info: dict) -> float:
    """The shaping term of a reward: r + step_cost - bonus [success] + penalty [drowned]."""
    return (
        reward
        + env.step_cost
        - env.home_bonus * info["success"]
        + env.lake_penalty * info["drowned"]
    )


# ----------------------------------------------------------------------------- API checks


@pytest.mark.parametrize("render_mode", [None, "rgb_array"])
def test_gymnasium_check_env(render_mode):
    from gymnasium.utils.env_checker import check_env

    env = gym.make("LakeCrossing-v0", render_mode=render_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    # ResourceWarnings come from garbage collected elsewhere (files left by earlier tests)
    assert [str(w.message) for w in caught if w.category is not ResourceWarning] == []


def test_sb3_check_env():
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(LakeCrossingEnv())
        check_env(gym.make("LakeCrossing-v0"))
    assert [str(w.message) for w in caught if w.category is not ResourceWarning] == []


def test_make_registration_and_time_limit():
    env = gym.make("LakeCrossing-v0")
    assert isinstance(env.unwrapped, LakeCrossingEnv)
    assert env.spec.max_episode_steps == 60
    env.reset(seed=0)
    for t in range(60):  # hovering never terminates: the time limit truncates
        _, reward, terminated, truncated, info = env.step(np.zeros(2, dtype=np.float32))
        assert reward == -env.unwrapped.step_cost and not terminated
        assert truncated == (t == 59)
    info.pop("TimeLimit.truncated", None)  # added by rl_zoo3's TimeLimit patch, once imported
    assert info == {"success": False, "drowned": False, "is_success": False, "route": None}


def test_registration_is_guarded_against_reimport():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(lake_envs)
    assert [str(w.message) for w in caught] == []
    assert "LakeCrossing-v0" in gym.registry


@pytest.mark.parametrize(
    "env_id", ["flowpolicy:LakeCrossing-v0", "flowpolicy.envs:LakeCrossing-v0"]
)
def test_module_qualified_ids_make_the_env(env_id):
    env = gym.make(env_id)
    assert isinstance(env.unwrapped, LakeCrossingEnv) and env.spec.max_episode_steps == 60


def test_subproc_vec_env_workers_find_the_env_by_its_module_qualified_id():
    """SubprocVecEnv's workers (forkserver or spawn) start without the parent's imports: with
    ``"flowpolicy:LakeCrossing-v0"`` each worker's ``gym.make`` imports flowpolicy itself."""
    code = """
import sys
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

venv = make_vec_env("flowpolicy:LakeCrossing-v0", n_envs=2, vec_env_cls=SubprocVecEnv,
                    seed=0)  # forkserver on Linux
print(venv.reset().shape, "flowpolicy" in sys.modules)
venv.close()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "(2, 2) False"


def test_public_attributes():
    env = LakeCrossingEnv()
    np.testing.assert_array_equal(env.lake_center, [0.0, 0.0])
    np.testing.assert_array_equal(env.start, DEFAULT_START)
    np.testing.assert_array_equal(env.home, [0.0, 1.6])
    assert (env.lake_radius, env.home_radius, env.max_speed) == (1.0, 0.25, 0.15)
    assert env.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    assert env.observation_space.shape == (2,) and env.observation_space.dtype == np.float32


def test_import_is_light():
    """``import flowpolicy.envs`` loads neither matplotlib nor Stable-Baselines3."""
    code = (
        "import sys, flowpolicy.envs; "
        "print([m for m in ('matplotlib', 'stable_baselines3') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_geometry_shared_by_env_expert_and_plots():
    env = gym.make("LakeCrossing-v0", lake_radius=0.8, home=(0.0, 1.5))
    geometry = env.unwrapped.geometry
    assert isinstance(geometry, LakeGeometry)
    assert geometry == LakeGeometry(lake_radius=0.8, home=(0.0, 1.5))
    assert geometry != LakeGeometry()
    assert pickle.loads(pickle.dumps(geometry)) == geometry
    with pytest.raises(dataclasses.FrozenInstanceError):
        geometry.lake_radius = 2.0
    assert env.unwrapped.lake_radius == 0.8
    np.testing.assert_array_equal(env.unwrapped.home, [0.0, 1.5])
    assert geometry.axis == (0.0, 1.0) and geometry.lateral == (1.0, -0.0)
    # The potential is the geometry's distance home; the generic geodesic agrees with it.
    for p in [(0.0, -1.25), (2.0, -2.0), (-1.5, 0.3), (0.9, 1.1)]:
        assert env.unwrapped.potential(p) == geometry.home_distance(*p)
        g = geometry.geodesic(p, geometry.home) - geometry.home_radius
        assert geometry.home_distance(*p) == pytest.approx(max(g, 0.0), abs=1e-12)
    # The expert follows the same lake: its margin is measured from this shore.
    with pytest.raises(ValueError, match="margin too large"):
        LakeExpert(env, margin=0.75)
    with pytest.raises(ValueError, match="inside the lake"):
        LakeGeometry(start=(0.0, -0.95))


def test_rollout_runs_sb3_style_models():
    """Anything with ``predict`` is run as an SB3 model, with ``deterministic`` passed on."""

    class Model:
        calls: list[bool] = []

        def predict(self, obs, deterministic=False):
            self.calls.append(deterministic)
            return np.array([0.0, 1.0], np.float32), None

    env = gym.make("LakeCrossing-v0")
    (res,) = rollout(env, Model(), 1, seed=0, deterministic=False)
    assert res["drowned"] and res["label"] == "drowned" and res["terminated"]
    assert set(Model.calls) == {False}
    assert res["observations"].shape == (res["length"] + 1, 2)
    np.testing.assert_array_equal(res["positions"], res["observations"])
    (res,) = rollout(env.unwrapped, Model(), 1, max_steps=1, reset_options={"start": (2, -2)})
    assert res["length"] == 1 and res["truncated"] and not res["terminated"]


# ----------------------------------------------------------------------------- dynamics


def test_straight_ahead_drowns_within_two_steps():
    env = LakeCrossingEnv()
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        assert obs[0] == 0.0 and -1.3 <= obs[1] <= -1.2  # noise only along the axis
        for _ in range(2):
            obs, reward, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))
            if terminated:
                break
        assert info["drowned"] and not info["success"] and terminated, seed
        assert reward < -env.lake_penalty + 5  # the penalty, a little shaping, the step cost


def test_step_moves_by_max_speed_and_clips_actions():
    env = LakeCrossingEnv()
    env.reset(options={"start": (2.0, -2.0)})
    obs, *_ = env.step(np.array([0.5, -0.2], np.float32))
    np.testing.assert_allclose(obs, [2.0 + 0.15 * 0.5, -2.0 - 0.15 * 0.2], rtol=1e-6)
    obs, *_ = env.step(np.array([7.0, -3.0], np.float32))  # clipped to (1, -1)
    np.testing.assert_allclose(obs, [2.225, -2.18], rtol=1e-6)
    for _ in range(20):  # the arena edge clips the position
        obs, _, terminated, _, _ = env.step(np.array([1.0, -1.0], np.float32))
        assert not terminated
    np.testing.assert_array_equal(obs, [3.0, -3.0])
    assert env.observation_space.contains(obs)
    # Lists and float64 arrays are accepted too.
    env.step([0.0, 0.0])
    env.step(np.zeros(2))


@pytest.mark.parametrize(
    "action",
    [
        np.array([np.nan, 0.0], np.float32),
        np.array([0.0, np.inf], np.float32),
        np.zeros(3, np.float32),
        np.zeros((1, 2), np.float32),
        np.zeros((2, 1), np.float32),
        "up",
    ],
)
def test_bad_actions_raise(action):
    env = LakeCrossingEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)


@pytest.mark.parametrize(
    ("start", "match"),
    [
        ((0.0, -0.5), "inside the lake"),
        ((0.0, 1.6), "inside home"),
        ((0.1, 1.5), "inside home"),
        ((3.5, 0.0), "outside the arena"),
        ((np.nan, -2.0), "finite"),
        ((0.0, -2.0, 1.0), "pair"),
    ],
)
def test_bad_starts_raise(start, match):
    env = LakeCrossingEnv()
    with pytest.raises(ValueError, match=match):
        env.reset(options={"start": start})


def test_bad_options_and_constructor_arguments_raise():
    with pytest.raises(ValueError, match="unknown reset options"):
        LakeCrossingEnv().reset(options={"strat": (0.0, -2.0)})
    with pytest.raises(ValueError, match="inside the lake"):
        LakeCrossingEnv(start=(0.0, -0.9))
    with pytest.raises(ValueError, match="start ± start_noise"):
        LakeCrossingEnv(start=(0.0, -1.02), start_noise=0.05)
    with pytest.raises(ValueError, match="overlaps the lake"):
        LakeCrossingEnv(home=(0.0, 1.1))
    with pytest.raises(ValueError, match="max_speed"):
        LakeCrossingEnv(max_speed=0.0)
    with pytest.raises(ValueError, match="render_mode"):
        LakeCrossingEnv(render_mode="ansi")
    # numbers of the wrong kind: clear errors, not TypeErrors or silent truncation
    with pytest.raises(ValueError, match="lake_penalty must be a finite number >= 0, got 'a'"):
        LakeCrossingEnv(lake_penalty="a")
    with pytest.raises(ValueError, match="step_cost must be a finite number"):
        LakeCrossingEnv(step_cost=float("nan"))
    with pytest.raises(ValueError, match="render_size must be an integer >= 16"):
        LakeCrossingEnv(render_size=100.5)


def test_exact_start_option():
    env = LakeCrossingEnv()
    obs, info = env.reset(seed=3, options={"start": (0.4, -1.5)})
    np.testing.assert_array_equal(obs, np.array([0.4, -1.5], np.float32))
    np.testing.assert_array_equal(env.position, [0.4, -1.5])
    assert info["route"] is None


def test_seeded_determinism():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(200, 2)).astype(np.float32)

    def run(seed):
        env = LakeCrossingEnv()
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for a in actions:
            obs, reward, terminated, truncated, info = env.step(a)
            out.append((obs, reward, terminated, info["route"]))
            if terminated:
                out.append(env.reset()[0])
        return out

    first, second = run(42), run(42)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert str(a) == str(b)
    starts = {float(LakeCrossingEnv().reset(seed=s)[0][1]) for s in range(10)}
    assert len(starts) == 10


def test_mirror_symmetry_step_by_step():
    rng = np.random.default_rng(1)
    env_a, env_b = LakeCrossingEnv(), LakeCrossingEnv()
    for trial in range(30):
        start = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-2.5, -1.3)])
        obs_a, _ = env_a.reset(options={"start": start})
        obs_b, _ = env_b.reset(options={"start": mirror(start)})
        assert np.array_equal(obs_b, mirror(obs_a))
        # Biased random walks north, so that episodes pass the lake, drown or go home.
        actions = rng.uniform(-1, 1, size=(80, 2)).astype(np.float32)
        actions[:, 1] = np.abs(actions[:, 1])
        for a in actions:
            obs_a, r_a, term_a, _, info_a = env_a.step(a)
            obs_b, r_b, term_b, _, info_b = env_b.step(mirror(a))
            assert r_a == r_b, trial  # exactly, not approximately
            assert np.array_equal(obs_b, mirror(obs_a))
            assert term_a == term_b
            assert (info_a["success"], info_a["drowned"]) == (info_b["success"], info_b["drowned"])
            swap = {"cw": "ccw", "ccw": "cw", None: None}
            assert info_b["route"] == swap[info_a["route"]]
            if term_a:
                break


@pytest.mark.parametrize(
    "kwargs", [{}, {"start": (-1.5, 0.0), "home": (1.6, 0.0)}], ids=["vertical", "horizontal"]
)
def test_reflection_is_an_exact_symmetry(kwargs):
    """From the mirrored state, the mirrored action gives the mirrored next observation and
    the same reward, termination and outcome; the routes swap."""
    from flowpolicy.symmetry import Reflection

    env_a, env_b = LakeCrossingEnv(**kwargs), LakeCrossingEnv(**kwargs)
    refl = env_a.reflection()
    assert isinstance(refl, Reflection)
    assert pickle.loads(pickle.dumps(refl)) == refl
    rng = np.random.default_rng(4)
    swap = {"cw": "ccw", "ccw": "cw", None: None}
    checked = 0
    while checked < 200:
        state = rng.uniform(-3, 3, 2)
        if np.hypot(*state) < 1.0 or np.hypot(*(state - env_a.home)) <= env_a.home_radius:
            continue
        checked += 1
        obs_a, _ = env_a.reset(options={"start": state})
        obs_b, _ = env_b.reset(options={"start": refl.obs(state)})
        np.testing.assert_array_equal(obs_b, refl.obs(obs_a))
        for action in rng.uniform(-1.2, 1.2, size=(3, 2)).astype(np.float32):
            obs_a, r_a, term_a, trunc_a, info_a = env_a.step(action)
            obs_b, r_b, term_b, trunc_b, info_b = env_b.step(refl.action(action))
            np.testing.assert_array_equal(obs_b, refl.obs(obs_a))
            assert (r_b, term_b, trunc_b) == (r_a, term_a, trunc_a)  # exactly
            assert (info_b["success"], info_b["drowned"]) == (info_a["success"], info_a["drowned"])
            assert info_b["route"] == swap[info_a["route"]]
            if term_a:
                break


def test_reflection_of_a_shifted_lake_and_of_an_asymmetric_task():
    env = LakeCrossingEnv(lake_center=(0.5, 0.0), start=(0.5, -1.25), home=(0.5, 1.6))
    refl = env.reflection()
    np.testing.assert_allclose(refl.obs(np.array([0.7, -2.0])), [0.3, -2.0])
    np.testing.assert_array_equal(refl.action(np.array([0.2, 0.9])), [-0.2, 0.9])
    assert env.potential((0.1, -1.3)) == pytest.approx(env.potential((0.9, -1.3)), abs=1e-12)
    with pytest.raises(ValueError, match="vertical or horizontal"):
        LakeCrossingEnv(start=(0.3, -1.25)).reflection()


# Recorded before the geometry moved into LakeGeometry: the dynamics and rewards are unchanged.
# (steps, return, final observation, success, drowned, route) per episode.
RECORDED_EPISODES = [
    (60, -53.301729315711384, [-2.7226877212524414, 2.1285743713378906], False, False, "cw"),
    (60, -86.71794154042243, [1.5737545490264893, -1.3011667728424072], False, False, None),
    (3, -26.71897238130719, [0.02980479598045349, -0.9152684211730957], False, True, None),
    (60, -95.18040137666571, [2.384786367416382, -0.20410868525505066], False, False, "ccw"),
    (3, -20.231904578340604, [-0.8958319425582886, 0.19218282401561737], False, True, "cw"),
    (60, -81.55234029535416, [0.21898342669010162, -2.4115798473358154], False, False, None),
]


def test_seeded_episodes_match_the_recorded_ones():
    env = LakeCrossingEnv()
    rng = np.random.default_rng(2024)
    starts = [(-2.0, -2.5), (1.5, -1.5), (0.0, -1.25), (2.5, 0.5), (-1.2, -0.2), (0.4, -2.9)]
    for i, (start, recorded) in enumerate(zip(starts, RECORDED_EPISODES, strict=True)):
        obs, _ = env.reset(seed=i, options={"start": start})
        total, steps = 0.0, 0
        while steps < 60:
            action = rng.uniform(-1.2, 1.2, 2).astype(np.float32)
            action[1] = abs(action[1]) if i % 2 == 0 else action[1]
            obs, reward, terminated, _, info = env.step(action)
            total, steps = total + reward, steps + 1
            if terminated:
                break
        length, ret, final, success, drowned, route = recorded
        assert (steps, obs.tolist(), info["success"], info["drowned"], info["route"]) == (
            steps,
            final,
            success,
            drowned,
            route,
        )
        assert total == pytest.approx(ret, rel=1e-13)  # bit for bit here; libm may differ
    demos = collect_demonstrations(3, seed=0)
    np.testing.assert_allclose(
        demos.episode_returns, [132.76469371696177, 132.58292068317337, 132.30378571352287]
    )
    assert demos.episode_routes.tolist() == ["ccw", "ccw", "cw"]
    assert demos.observations[0].tolist() == [0.0, -1.2694188356399536]
    assert demos.actions[0].tolist() == [0.7948440313339233, 0.6051644086837769]
    assert demos.next_observations[22].tolist() == [0.11444293707609177, 1.4595648050308228]


def test_route_labels():
    env = LakeCrossingEnv()
    for side, x_dir in (("ccw", 1.0), ("cw", -1.0)):
        env.reset(options={"start": DEFAULT_START})
        routes = []
        for _ in range(8):  # sideways past the lake's width
            routes.append(env.step(np.array([x_dir, 0.0], np.float32))[4]["route"])
        for _ in range(10):  # north to y = +0.25, across the equator y = 0
            routes.append(env.step(np.array([0.0, 1.0], np.float32))[4]["route"])
        for _ in range(8):  # back south: the route stays fixed
            routes.append(env.step(np.array([0.0, -1.0], np.float32))[4]["route"])
        crossed = routes.index(side)
        assert routes[:crossed] == [None] * crossed
        assert routes[crossed:] == [side] * (len(routes) - crossed)
        assert env.position[1] < 0.0  # it went back south and still has the label
    # A start north of the equator has no route until the agent crosses it from the south.
    obs, info = env.reset(options={"start": (1.5, 0.5)})
    assert env.step(np.zeros(2, np.float32))[4]["route"] is None


def test_lake_crossing_label_only_outside_the_lake():
    env = LakeCrossingEnv()
    env.reset(options={"start": (0.99, -0.2)})
    _, _, terminated, _, info = env.step(np.array([-0.2, 1.0], np.float32))
    assert terminated and info["drowned"] and info["route"] is None


# ----------------------------------------------------------------------------- rewards


def brute_force_geodesic(p, q, r=1.0, n=1000):
    """Shortest path p -> polygon vertex -> along the polygon -> vertex -> q around the disk.

    The polygon's edges touch the circle from outside, so every such path is dry and the
    minimum converges to the geodesic from above as n grows.
    """
    p, q = np.asarray(p, float), np.asarray(q, float)
    big_r = r / math.cos(math.pi / n)
    ang = 2 * math.pi * np.arange(n) / n
    verts = big_r * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    edge = 2 * big_r * math.sin(math.pi / n)

    def clearance(a, b):  # distance from the centre to each segment a -> b
        ab = b - a
        t = np.clip(-np.sum(a * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-300), 0, 1)
        return np.linalg.norm(a + t[..., None] * ab, axis=-1)

    if clearance(p[None], q[None])[0] >= r - 1e-12:
        return float(np.linalg.norm(p - q))
    cost_p = np.where(
        clearance(p[None], verts) >= r - 1e-9, np.linalg.norm(verts - p, axis=1), np.inf
    )
    cost_q = np.where(
        clearance(q[None], verts) >= r - 1e-9, np.linalg.norm(verts - q, axis=1), np.inf
    )
    gap = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
    along = edge * np.minimum(gap, n - gap)
    return float(np.min(cost_p[:, None] + along + cost_q[None, :]))


def test_geodesic_known_values():
    # Antipodal points on the shore: half the circumference.
    assert geodesic_distance((0, -1), (0, 1)) == pytest.approx(math.pi)
    # (0, -d) to (0, d): two tangents and two quarter-arcs shortened by acos(1/d).
    d = 2.0
    expected = 2 * math.sqrt(d * d - 1) + 2 * (math.pi / 2 - math.acos(1 / d))
    assert geodesic_distance((0, -d), (0, d)) == pytest.approx(expected)
    # Clear line of sight: the Euclidean distance.
    assert geodesic_distance((2, -1), (2, 1)) == pytest.approx(2.0)
    # Translation and scaling of the disk.
    assert geodesic_distance((5, 3 - 4), (5, 3 + 4), center=(5, 3), radius=2) == pytest.approx(
        2 * expected
    )
    # Default geometry: phi(start) = g(start) - home_radius.
    env = LakeCrossingEnv()
    g = geodesic_distance(DEFAULT_START, env.home)
    assert env.potential(DEFAULT_START) == pytest.approx(g - 0.25)
    assert g == pytest.approx(
        0.75 + math.sqrt(1.6**2 - 1) + math.pi - math.acos(1 / 1.25) - math.acos(1 / 1.6)
    )


def test_geodesic_distance_from_a_point_to_itself_is_zero():
    for p in [(0, 0), (0.5, -0.2), (1, 0), (2, 3)]:  # the centre once divided by zero
        assert geodesic_distance(p, p) == 0.0
        assert geodesic_distance(np.add(p, 5), np.add(p, 5), center=(5, 5), radius=2) == 0.0
    assert LakeCrossingEnv().geometry.geodesic((0, 0), (0, 0)) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(point=(np.nan, 0)), "point must be finite"),
        (dict(target=(2, 0, 1)), "target must be an"),
        (dict(center=(np.inf, 0)), "center must be finite"),
        (dict(radius=0.0), "radius must be finite and > 0"),
        (dict(radius=-1.0), "radius"),
        (dict(radius=np.nan), "radius"),
    ],
)
def test_geodesic_distance_refuses_bad_arguments(kwargs, match):
    arguments = dict(point=(3, 0), target=(-3, 0)) | kwargs
    with pytest.raises(ValueError, match=match):
        geodesic_distance(**arguments)


def test_geodesic_matches_brute_force():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 25:
        p, q = rng.uniform(-3, 3, size=(2, 2))
        if np.linalg.norm(p) < 1.0 or np.linalg.norm(q) < 1.0:
            continue
        checked += 1
        exact = geodesic_distance(p, q)
        brute = brute_force_geodesic(p, q)
        assert exact <= brute + 1e-9
        assert exact == pytest.approx(brute, abs=2e-5), (p, q)


def test_potential_properties():
    env = LakeCrossingEnv()
    assert env.potential(env.home) == 0.0
    assert env.potential((0.0, 1.4)) == 0.0  # anywhere inside home
    assert env.potential((0.0, 1.9)) == pytest.approx(0.05)
    rng = np.random.default_rng(2)
    for p in rng.uniform(-3, 3, size=(50, 2)):
        assert env.potential(p) == env.potential(mirror(p))
        if np.linalg.norm(p) >= 1.0:  # never shorter than the straight line
            assert env.potential(p) >= np.linalg.norm(p - env.home) - 0.25 - 1e-12
    # Inside the lake: the shore point radially outward.
    assert env.potential((0.0, -0.9)) == env.potential((0.0, -1.0))


def test_shaping_is_potential_based():
    env = LakeCrossingEnv()
    rng = np.random.default_rng(3)
    expert = LakeExpert(env, "ccw")
    outcomes = set()
    for episode in range(40):
        start = (rng.uniform(-2, 2), rng.uniform(-2.8, -1.3))
        env.reset(options={"start": start})
        total = 0.0
        for _ in range(60):
            if episode % 4 == 0:  # some successful episodes too
                action = expert(env.position.astype(np.float32))
            else:
                action = rng.uniform(-1, 1, 2).astype(np.float32)
                action[1] = abs(action[1])
            _, reward, terminated, _, info = env.step(action)
            total += shaping_part(env, reward, info)
            if terminated:
                break
        outcomes.add("success" if info["success"] else "drowned" if info["drowned"] else "time")
        expected = env.shaping_weight * (env.potential(start) - env.potential(env.position))
        assert total == pytest.approx(expected, abs=1e-9)
        if info["success"]:  # every success collects exactly c * phi(start)
            assert total == pytest.approx(env.shaping_weight * env.potential(start), abs=1e-9)
    assert outcomes == {"success", "drowned", "time"}


# ----------------------------------------------------------------------------- expert


@pytest.mark.parametrize("start", [DEFAULT_START, (0.0, -2.5), (0.3, -1.5), (-1.0, -2.0)])
def test_expert_succeeds_on_both_sides_with_mirrored_returns(start):
    env = gym.make("LakeCrossing-v0")
    results = {}
    for side, s in (("cw", start), ("ccw", mirror(np.asarray(start)))):
        expert = LakeExpert(env, side=side)
        (res,) = rollout(env, expert, 1, seed=0, reset_options={"start": s})
        assert res["success"] and res["route"] == side
        assert np.all(np.abs(res["actions"]) < 1.0)
        results[side] = res
    assert results["cw"]["return"] == results["ccw"]["return"]
    np.testing.assert_array_equal(
        results["ccw"]["positions"], results["cw"]["positions"] * np.array([-1.0, 1.0])
    )


def test_expert_is_near_optimal():
    env = gym.make("LakeCrossing-v0")
    (res,) = rollout(env, LakeExpert(env, "ccw"), 1, seed=0, reset_options={"start": DEFAULT_START})
    phi0 = env.unwrapped.potential(DEFAULT_START)
    fewest_steps = math.ceil(phi0 / 0.15)  # at unit speed along the geodesic
    assert res["length"] == fewest_steps
    assert res["return"] == pytest.approx(100 + 20 * phi0 - 1.5 * fewest_steps)


def test_averaged_expert_walks_into_the_lake():
    env = LakeCrossingEnv()
    cw, ccw = LakeExpert(env, "cw"), LakeExpert(env, "ccw")
    for y in np.linspace(-1.3, -1.2, 5):
        (res,) = rollout(env, lambda o: (cw(o) + ccw(o)) / 2, 1, reset_options={"start": (0, y)})
        assert res["drowned"] and res["length"] <= 5


def test_collect_demonstrations():
    demos = collect_demonstrations(200, seed=0)
    n = len(demos)
    assert demos.observations.shape == (n, 2) and demos.observations.dtype == np.float32
    assert demos.actions.shape == (n, 2) and demos.actions.dtype == np.float32
    assert np.all(np.abs(demos.actions) < 1.0)
    np.testing.assert_allclose(np.linalg.norm(demos.actions, axis=1), 0.999, rtol=1e-5)
    assert demos.episode_success.all()
    share_ccw = np.mean(demos.episode_routes == "ccw")
    assert 0.4 <= share_ccw <= 0.6
    # The expert's side is the route the environment reports.
    first = np.searchsorted(demos.episode_index, np.arange(200))
    np.testing.assert_array_equal(demos.routes[first], demos.episode_routes)
    np.testing.assert_allclose(
        np.bincount(demos.episode_index, weights=demos.rewards), demos.episode_returns
    )
    assert demos.terminated.sum() == 200 and demos.episode_lengths.sum() == n
    # Bimodal given the state: from starts on the axis, both sides start alike often.
    on_axis = demos.observations[first]
    assert np.all(on_axis[:, 0] == 0.0)
    first_x = demos.actions[first, 0]
    assert np.all(np.sign(first_x) == np.where(demos.episode_routes == "ccw", 1, -1))
    # Reproducible.
    again = collect_demonstrations(5, seed=0)
    np.testing.assert_array_equal(again.actions, demos.actions[: len(again)])


def test_collect_demonstrations_one_side_and_kwargs():
    demos = collect_demonstrations(4, seed=1, env_kwargs={"start_noise": 0.0}, side="cw")
    assert set(demos.routes) == {"cw"} and set(demos.episode_routes) == {"cw"}
    first = np.searchsorted(demos.episode_index, np.arange(4))
    np.testing.assert_array_equal(demos.observations[first], np.tile(DEFAULT_START, (4, 1)))
    np.testing.assert_array_equal(demos.episode_returns, demos.episode_returns[0])
    with pytest.raises(ValueError, match="side"):
        LakeExpert(LakeCrossingEnv(), side="left")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((2.5, 0), {}, "n_episodes must be an integer >= 1, got 2.5"),
        ((2.0, 0), {}, "n_episodes must be an integer"),
        ((-1, 0), {}, "n_episodes must be an integer >= 1"),
        ((0, 0), {}, "n_episodes"),
        ((True, 0), {}, "n_episodes"),
        ((2, 0.5), {}, "seed must be an integer >= 0"),
        ((2, -1), {}, "seed must be an integer >= 0"),
        ((2, 0), dict(margin=1e-9), "margin must be >= 2.25e-05"),
        ((2, 0), dict(margin=0.0), "margin must be >="),
        ((2, 0), dict(margin=-0.1), "margin must be >="),
        ((2, 0), dict(margin=float("nan")), "margin must be >="),
        ((2, 0), dict(margin="0.01"), "margin must be a number"),
        ((2, 0), dict(margin=5.0), "margin too large"),
        ((2, 0), dict(side="west"), "side must be 'cw', 'ccw' or None"),
    ],
)
def test_collect_demonstrations_refuses_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        collect_demonstrations(*args, **kwargs)


def test_expert_margin_bound_is_where_it_stops_drowning():
    """A step aimed at the look-ahead point lands short of it, inside the expert's circle by up
    to scale (1 - scale) max_speed^2 / (2 R); the smallest accepted margin, twice that, is dry
    from every start, and half of it drowns (1e-9 drowned every demonstration)."""
    env = LakeCrossingEnv()
    g = env.geometry
    smallest = 0.999 * (1 - 0.999) * g.max_speed**2 / g.lake_radius
    with pytest.raises(ValueError, match="margin must be >="):
        LakeExpert(env, margin=smallest * 0.99)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    starts = [(1.01 * np.cos(a), 1.01 * np.sin(a)) for a in angles] + [(0.0, -1.25), (2.5, -2.5)]
    for side in ("cw", "ccw"):
        expert = LakeExpert(env, side, margin=smallest)
        for start in starts:
            (res,) = rollout(env, expert, 1, reset_options={"start": start})
            assert res["success"], (side, start)
    assert collect_demonstrations(4, seed=0, margin=smallest).episode_success.all()
    # below the bound the expert's steps do land in the lake
    expert = LakeExpert(env, "ccw")
    expert._radius = g.lake_radius + smallest / 4  # what margin=smallest/4 would give
    outcomes = [rollout(env, expert, 1, reset_options={"start": s})[0] for s in starts]
    assert any(res["drowned"] for res in outcomes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(side="left"), "side"),
        (dict(side=1), "side"),
        (dict(scale=float("nan")), "scale must lie in"),
        (dict(scale=1.0), "scale must lie in"),
        (dict(scale=True), "scale must be a number"),
        (dict(margin=None), "margin must be a number"),
    ],
)
def test_expert_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LakeExpert(LakeCrossingEnv(), **kwargs)


def test_expert_refuses_what_is_not_a_lake_and_non_finite_observations():
    with pytest.raises(ValueError, match="needs a LakeCrossing environment"):
        LakeExpert(gym.make("Pendulum-v1"))
    expert = LakeExpert(gym.make("LakeCrossing-v0"), "cw")
    for obs in ([np.nan, 0.0], [0.0, np.inf]):
        with pytest.raises(ValueError, match="position must be finite"):
            expert(np.array(obs, dtype=np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_episodes=-1), "n_episodes must be an integer >= 0"),
        (dict(n_episodes=1.5), "n_episodes"),
        (dict(n_episodes=1, max_steps=0), "max_steps must be an integer >= 1"),
        (dict(n_episodes=1, max_steps=2.5), "max_steps"),
    ],
)
def test_rollout_refuses_bad_counts(kwargs, match):
    env = LakeCrossingEnv()
    with pytest.raises(ValueError, match=match):
        rollout(env, LakeExpert(env), **kwargs)
    assert rollout(env, LakeExpert(env), 0) == []


# ----------------------------------------------------------------------------- rendering


def test_rgb_array_frames():
    env = LakeCrossingEnv(render_mode="rgb_array", render_size=128)
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    for _ in range(5):
        env.step(np.array([1.0, 0.0], np.float32))
    later = env.render()
    assert later.shape == (128, 128, 3) and not np.array_equal(first, later)
    # The lake is drawn blue at the centre pixel.
    assert later[64, 64, 2] > later[64, 64, 0]
    env.reset(seed=0)
    np.testing.assert_array_equal(env.render(), first)  # the trail restarts
    with pytest.warns(UserWarning, match="render_mode"):
        assert LakeCrossingEnv().render() is None


def test_human_render_and_plotting_with_agg(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "pause", lambda interval: None)  # no GUI event loop under Agg
    env = LakeCrossingEnv(render_mode="human", render_size=64)
    env.reset(seed=0)
    env.step(np.zeros(2, np.float32))
    assert env.render() is None
    env.close()

    env = gym.make("LakeCrossing-v0")
    expert = LakeExpert(env, seed=0)

    def policy(obs):
        return expert(obs)

    results = []
    for episode in range(4):
        expert.reset()
        results += rollout(env, policy, 1, seed=episode)
    results += rollout(env, lambda o: np.array([0.0, 1.0], np.float32), 1, seed=0)
    labels = [r["label"] for r in results]
    assert labels[-1] == "drowned" and set(labels[:-1]) <= {"cw", "ccw"}
    assert results[0]["positions"].shape == (results[0]["length"] + 1, 2)
    fig, ax = plt.subplots()
    draw_lake(ax, env)
    plot_trajectories(ax, [r["positions"] for r in results], labels)
    draw_lake(ax, {"lake_center": (0, 0), "lake_radius": 1, "home": (0, 2), "home_radius": 0.2})
    with pytest.raises(ValueError, match="labels"):
        plot_trajectories(ax, [results[0]["positions"]], ["left"])
    plt.close(fig)


def test_docstring_example():
    import doctest

    import flowpolicy.envs.lake as lake_module

    assert doctest.testmod(lake_module).failed == 0


def test_route_stats_counts_each_outcome():
    episodes = [
        {"success": True, "drowned": False, "route": "cw", "return": 10.0},
        {"success": True, "drowned": False, "route": "ccw", "return": 20.0},
        {"success": False, "drowned": True, "route": None, "return": -30.0},
        {"success": False, "drowned": False, "route": "cw", "return": 0.0},  # timed out
    ]
    stats = lake_envs.route_stats(episodes)
    assert stats == {"success": 0.5, "drowned": 0.25, "cw": 0.25, "ccw": 0.25, "return": 0.0}
    with pytest.raises(ValueError, match="no episodes"):
        lake_envs.route_stats([])
