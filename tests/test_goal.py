"""The goal-conditioned lake (LakeCrossingGoal-v0) and SAC + HER with the Dict flow policy."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3 import SAC, HerReplayBuffer
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import flowpolicy.envs  # noqa: F401  (registers the environments)
from flowpolicy.envs import LakeCrossingGoalEnv, geodesic_distance
from flowpolicy.sb3 import MultiInputFlowPolicy


def test_passes_gymnasium_and_sb3_env_checkers():
    env = gym.make("LakeCrossingGoal-v0").unwrapped
    gym_check_env(env)
    sb3_check_env(env)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    assert set(env.observation_space.spaces) == {"observation", "achieved_goal", "desired_goal"}


def test_goals_lie_in_the_sector_north_of_the_lake_and_on_both_sides():
    env = gym.make("LakeCrossingGoal-v0")
    goals = []
    obs, _ = env.reset(seed=0)
    for _ in range(400):
        goals.append(obs["desired_goal"])
        assert np.array_equal(obs["observation"], obs["achieved_goal"])
        obs, _ = env.reset()
    goals = np.array(goals, dtype=np.float64)
    distance = np.linalg.norm(goals, axis=1)  # the lake is the unit disk at the origin
    angle = np.degrees(np.arctan2(goals[:, 0], goals[:, 1]))  # from north, east positive
    assert goals[:, 1].min() > 0.0  # north of the lake's equator: both routes reach them
    assert 1.4 - 1e-6 <= distance.min() and distance.max() <= 2.0 + 1e-6
    assert np.abs(angle).max() <= 30.0 + 1e-4
    assert (angle < -15).mean() > 0.15 and (angle > 15).mean() > 0.15  # both sides drawn
    # the same seed gives the same goals
    again = gym.make("LakeCrossingGoal-v0")
    assert np.array_equal(again.reset(seed=0)[0]["desired_goal"], goals[0].astype(np.float32))


def _transitions(env, episodes):
    """Random-action transitions (next achieved goal, desired goal, reward, info) of the given
    episodes, each ``(reset options, n_steps)``; actions straight north (drowning from the
    default start) when the options say so."""
    rng = np.random.default_rng(0)
    records = []
    for seed, (options, north) in enumerate(episodes):
        obs, _ = env.reset(seed=seed, options=options)
        for _ in range(60):
            action = np.array([0.0, 1.0], np.float32) if north else rng.uniform(-1, 1, 2)
            obs, reward, terminated, truncated, info = env.step(action.astype(np.float32))
            records.append((obs["achieved_goal"], obs["desired_goal"], reward, info))
            if terminated or truncated:
                break
    return records


@pytest.mark.parametrize("shaping_weight", [0.0, 20.0])
def test_compute_reward_is_vectorized_and_equals_the_step_rewards(shaping_weight):
    env = gym.make("LakeCrossingGoal-v0", shaping_weight=shaping_weight)
    near_goal = {"start": (1.3, 1.2), "goal": (1.3, 1.55)}  # 0.35 north of the start
    episodes = [(None, False)] * 6 + [(None, True), (near_goal, True)]
    records = _transitions(env, episodes)
    achieved = np.array([r[0] for r in records])
    desired = np.array([r[1] for r in records])
    rewards = np.array([r[2] for r in records])
    infos = np.array([r[3] for r in records])
    lake = env.unwrapped
    batch = lake.compute_reward(achieved, desired, infos)
    assert batch.shape == rewards.shape
    np.testing.assert_array_equal(batch, rewards)
    single = [lake.compute_reward(a, d, i) for a, d, i in zip(achieved, desired, infos)]
    np.testing.assert_array_equal(np.array(single), batch)
    # the three cases occurred: step, drowning and success
    drowned = np.array([i["drowned"] for i in infos])
    success = np.array([i["success"] for i in infos])
    assert drowned.any() and success.any()
    if shaping_weight == 0.0:
        assert set(np.unique(rewards)) == {-1.5, -26.5, 0.0}
    else:  # progress around the lake towards the goal pays, moving away costs
        assert rewards[~drowned & ~success].max() > 0 > rewards[~drowned & ~success].min()
    # relabelling: a transition's own position as the goal is worth 0, exactly what the
    # termination that HER's relabelled transitions lack would be worth
    np.testing.assert_array_equal(lake.compute_reward(achieved, achieved, infos)[~drowned], 0.0)
    # leading batch dimensions, as HER's (batch, n_envs) would be
    grid = lake.compute_reward(
        achieved[None].repeat(3, 0), desired[None].repeat(3, 0), infos[None].repeat(3, 0)
    )
    assert grid.shape == (3, len(rewards))
    np.testing.assert_array_equal(grid[1], batch)


def test_batched_goal_distance_is_the_geodesic_to_the_goal_disk():
    lake = LakeCrossingGoalEnv()
    rng = np.random.default_rng(0)
    points = rng.uniform(-3.0, 3.0, (3000, 2))
    goals = rng.uniform(-3.0, 3.0, (3000, 2))
    points[:3] = 0.0  # the lake's centre, a special case of the projection onto the shore
    points[3:6] = goals[3:6]
    points[6:500] *= 0.3  # many points in the lake (drowned positions, relabelled goals too)
    batch = lake._goal_distances(points, goals)
    radius = lake.home_radius
    expected = [max(0.0, geodesic_distance(p, g) - radius) for p, g in zip(points, goals)]
    np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-12)
    # home_distance is the step's own potential; same value for goal = home
    home = np.broadcast_to(lake.home, points.shape)
    step_phi = [lake.geometry.home_distance(*p) for p in points]
    np.testing.assert_allclose(lake._goal_distances(points, home), step_phi, atol=1e-12)


def test_shaped_reward_without_infos_names_the_fix():
    env = gym.make("LakeCrossingGoal-v0")
    start, _ = env.reset(seed=0)
    obs, reward, *_, info = env.step(np.array([1.0, 0.0], np.float32))
    assert np.array_equal(info["previous_position"], start["observation"])
    achieved, desired = obs["achieved_goal"][None], obs["desired_goal"][None]
    for infos in (None, [{}], np.array([{}, {}], dtype=object)):
        with pytest.raises(ValueError, match="copy_info_dict=True"):
            env.unwrapped.compute_reward(achieved, desired, infos)
    # the sparse reward needs no info
    sparse = LakeCrossingGoalEnv(shaping_weight=0.0)
    assert sparse.compute_reward(achieved, desired, None).tolist() == [-1.5]


def test_bad_goals_and_settings_raise():
    env = gym.make("LakeCrossingGoal-v0")
    with pytest.raises(ValueError, match="not a valid home"):
        env.reset(options={"goal": (0.0, 0.5)})  # in the lake
    with pytest.raises(ValueError, match="shaping_weight"):
        LakeCrossingGoalEnv(shaping_weight=-1.0)
    with pytest.raises(ValueError, match="goal_angle"):
        LakeCrossingGoalEnv(goal_angle=95.0)
    with pytest.raises(ValueError, match="goal_distance"):
        LakeCrossingGoalEnv(goal_distance=(1.1, 2.0))  # the home disk would overlap the lake
    with pytest.raises(ValueError, match="compute_reward"):
        env.unwrapped.compute_reward(np.zeros(3), np.zeros(3), None)


def test_the_goal_moves_home_and_render_draws_it():
    env = gym.make("LakeCrossingGoal-v0", render_mode="rgb_array")
    obs, _ = env.reset(seed=0, options={"goal": (0.9, 1.4)})
    assert np.allclose(obs["desired_goal"], (0.9, 1.4))
    assert math.isclose(env.unwrapped.potential((0.9, 1.4)), 0.0)
    frame = env.render()
    assert frame.shape[2] == 3 and frame.dtype == np.uint8


def test_sac_her_with_the_dict_flow_policy():
    env = gym.make("LakeCrossingGoal-v0")
    model = SAC(
        MultiInputFlowPolicy,
        env,
        replay_buffer_class=HerReplayBuffer,
        replay_buffer_kwargs=dict(
            goal_selection_strategy="future", n_sampled_goal=4, copy_info_dict=True
        ),
        learning_starts=100,
        batch_size=64,
        policy_kwargs=dict(net_arch=[32, 32]),
        seed=0,
    )
    model.learn(300)
    assert model.num_timesteps == 300
    # HER relabels: most sampled goals are achieved positions, and every sampled reward is
    # compute_reward of the next achieved goal and the (relabelled) desired goal, with the
    # shaping's previous position (from the copied infos) the transition's own observation
    batch = model.replay_buffer.sample(256)
    achieved = batch.next_observations["achieved_goal"].numpy()
    desired = batch.observations["desired_goal"].numpy()
    before = batch.observations["observation"].numpy()
    infos = np.array([{"previous_position": p} for p in before], dtype=object)
    expected = env.unwrapped.compute_reward(achieved, desired, infos)
    np.testing.assert_allclose(batch.rewards.numpy().ravel(), expected, rtol=1e-6)
    assert (expected > 0).any() and (expected < -1.5).any()  # shaping both ways
    goals = model.replay_buffer.observations["desired_goal"][: model.replay_buffer.pos, 0]
    relabelled = ~(desired[:, None, :] == goals[None]).all(-1).any(-1)
    assert relabelled.mean() > 0.5  # n_sampled_goal=4: 80% virtual
    # predict takes one Dict observation and gives an action in the box
    obs, _ = env.reset(seed=1)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (2,) and np.all(np.abs(action) <= 1.0)
