"""Evaluation on a real MuJoCo env: return-to-go bookkeeping, batching, metrics and scores."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import dt

CPU = torch.device("cpu")


class RecordingDT(dt.DecisionTransformer):
    """The real model, recording every input it is given and the actions it returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def forward(self, states, actions, returns_to_go, timesteps, padding_mask=None, last_only=False):
        out = super().forward(states, actions, returns_to_go, timesteps, padding_mask, last_only)
        assert last_only  # evaluation asks only for the action it takes
        self.calls.append({k: v.clone() for k, v in dict(states=states, actions=actions, returns=returns_to_go,
                                                            timesteps=timesteps, out=out).items()})
        return out


class StrictEnv(gym.Wrapper):
    """Fails the test if an episode is stepped after it ended."""

    def reset(self, **kwargs):
        self.ended = False
        return self.env.reset(**kwargs)

    def step(self, action):
        assert not self.ended, "a finished episode was stepped again"
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.ended = terminated or truncated
        return obs, reward, terminated, truncated, info


def strict_hopper():
    return StrictEnv(dt.make_env("Hopper-v4"))


def hopper_model(cls=dt.DecisionTransformer, seq_len=4, episode_len=40, gain=5.0):
    torch.manual_seed(0)
    model = cls(11, 3, seq_len=seq_len, episode_len=episode_len, embedding_dim=32, num_layers=2, num_heads=2)
    with torch.no_grad():
        model.action_head[0].weight.mul_(gain)  # bigger actions than an untrained model's, so episodes differ
    return model


def test_return_to_go_bookkeeping_and_context_window():
    K, scale, target = 4, 0.01, 3600.0
    model = hopper_model(RecordingDT, seq_len=K, episode_len=40).train()
    mean, std = np.full(11, 0.1, np.float32), np.full(11, 2.0, np.float32)
    result = dt.evaluate(model, dt.EvalEnvs(strict_hopper, 1), (target,), 1, 42, mean, std, scale, CPU)
    assert model.training  # evaluation restores the mode it found

    # replay the actions the model chose in a fresh env with the same seed
    env = dt.make_env("Hopper-v4")
    obs, _ = env.reset(seed=42)
    observations, rewards = [obs], []
    for call in model.calls:
        obs, reward, terminated, truncated, _ = env.step(call["out"][0].numpy())
        observations.append(obs)
        rewards.append(reward)
    assert terminated or truncated or len(model.calls) == 40  # the episode ran to its natural end
    assert len(model.calls) > 2 * K  # long enough for the window to roll
    rtg = target * scale - np.concatenate([[0.0], np.cumsum(rewards)]) * scale  # R_{t+1} = R_t - r_t * scale
    for t, call in enumerate(model.calls):
        window = range(max(0, t - K + 1), t + 1)  # the last <= K steps
        assert call["timesteps"][0].tolist() == list(window)
        np.testing.assert_allclose(call["returns"][0].numpy(), rtg[list(window)], rtol=1e-5, atol=1e-5)
        expected_states = (np.asarray([observations[i] for i in window]) - mean) / std
        np.testing.assert_allclose(call["states"][0].numpy(), expected_states, rtol=1e-5, atol=1e-5)
        assert (call["actions"][0, -1] == 0).all()  # placeholder for the action being chosen
        previous = [model.calls[i]["out"][0].numpy() for i in window][:-1]
        if previous:
            np.testing.assert_allclose(call["actions"][0, :-1].numpy(), np.asarray(previous), rtol=1e-6)
    (episode,) = result[target]
    assert episode["return"] == pytest.approx(sum(rewards))
    assert episode["length"] == len(model.calls) and episode["terminated"] == terminated  # fell or ran out of time


def test_batched_evaluation_equals_one_episode_at_a_time():
    model = hopper_model(RecordingDT, episode_len=60)
    targets, episodes, seed = (3600.0, 1800.0), 3, 7
    zeros, ones = np.zeros(11, np.float32), np.ones(11, np.float32)
    envs = dt.EvalEnvs(strict_hopper, len(targets) * episodes)
    batched = dt.evaluate(model, envs, targets, episodes, seed, zeros, ones, 0.001, CPU)
    batch_sizes = [len(call["out"]) for call in model.calls]
    assert batch_sizes[0] == 6 and len(set(batch_sizes)) > 1  # episodes ended at different steps and left the batch
    batched_actions = [call["out"] for call in model.calls[:10]]
    for j, target in enumerate(targets):
        for i in range(episodes):
            model.calls.clear()
            alone = dt.evaluate(model, dt.EvalEnvs(strict_hopper, 1), (target,), 1, seed + i, zeros, ones, 0.001, CPU)
            assert batched[target][i]["return"] == pytest.approx(alone[target][0]["return"], rel=1e-6)
            assert batched[target][i]["length"] == alone[target][0]["length"]
            for t in range(10):  # the same actions, step by step
                torch.testing.assert_close(model.calls[t]["out"][0], batched_actions[t][j * episodes + i], rtol=1e-5, atol=1e-6)


def test_worker_processes_give_the_same_results():
    model = hopper_model(episode_len=60)
    args = ((3600.0, 1800.0), 3, 11, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CPU)
    in_process = dt.evaluate(model, dt.EvalEnvs(strict_hopper, 6), *args)
    envs = dt.EvalEnvs(strict_hopper, 6, workers=2)
    timing = {"forward": 0.0, "env": 0.0}
    try:
        rollouts = dt.evaluate(model, envs, *args, timing=timing)  # CPU: each worker runs its episodes
        stepped = dt.evaluate(model, envs, *args, worker_rollouts=False)  # GPU's way: workers only step envs
        again = dt.evaluate(model, envs, *args)  # the pool is reused across evaluations
    finally:
        envs.close()
    for target in (3600.0, 1800.0):
        np.testing.assert_array_equal(stepped[target], in_process[target])  # the same forward passes, here
        # the workers' own forward passes (other batch, thread count) may round differently by a few ulps, which
        # MuJoCo can amplify over an episode: the same episodes within 0.1%, not bit for bit
        np.testing.assert_allclose(rollouts[target]["return"], in_process[target]["return"], rtol=1e-3)
        np.testing.assert_array_equal(rollouts[target]["length"], in_process[target]["length"])
        assert len(set(rollouts[target]["return"])) == len(rollouts[target])  # each episode its own (seeds not mixed up)
        np.testing.assert_array_equal(again[target], rollouts[target])
    assert timing["forward"] > 0 and timing["env"] > 0  # the workers report where their time went
    assert dt.EvalEnvs(strict_hopper, 4, workers=-1).workers == 0  # auto: no worker for a handful of envs


def test_worker_rollout_errors_reach_the_caller():
    model = hopper_model(episode_len=20)
    envs = dt.EvalEnvs(strict_hopper, 2, workers=2)
    try:
        with pytest.raises(RuntimeError, match="worker .* failed: ValueError"):  # wrong state size: no broadcast
            dt.evaluate(model, envs, (3600.0,), 2, 0, np.zeros(5, np.float32), np.ones(5, np.float32), 0.001, CPU)
        ok = dt.evaluate(model, envs, (3600.0,), 2, 0, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CPU)
    finally:
        envs.close()
    assert len(ok[3600.0]) == 2  # the workers survive a failed rollout


def test_eval_seed_makes_evaluation_repeatable():
    model = hopper_model()
    args = ((3600.0,), 2, 5, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CPU)
    first = dt.evaluate(model, dt.EvalEnvs(strict_hopper, 2), *args)
    second = dt.evaluate(model, dt.EvalEnvs(strict_hopper, 2), *args)
    np.testing.assert_array_equal(first[3600.0], second[3600.0])
    assert first[3600.0][0]["return"] != first[3600.0][1]["return"]  # different episodes start from different seeds


def test_normalized_score_formula():
    low, high = dt.D4RL_REF_SCORES["hopper"]
    assert dt.normalized_score(np.array(high), low, high) == pytest.approx(100.0)
    assert dt.normalized_score(np.array(low), low, high) == pytest.approx(0.0)
    assert dt.normalized_score(np.array(1000.0), low, high) == pytest.approx(100 * (1000 + 20.272305) / (3234.3 + 20.272305))


def episodes(returns, lengths=(1000, 1000), terminated=(False, False)):
    return np.array(list(zip(returns, lengths, terminated)), dtype=dt.EPISODE)


def test_eval_metric_keys_and_values():
    results = {3600.0: episodes([1000.0, 2000.0], (400, 1000), (True, False)), 1800.0: episodes([500.0, 500.0])}
    metrics = dt.eval_metrics(results, *dt.D4RL_REF_SCORES["hopper"])
    ended = ("episode_length_mean", "terminated_fraction")
    assert set(metrics) == {f"eval/{t}_{k}" for t in ("3600.0", "1800.0") for k in
                            ("return_mean", "return_std", "normalized_score_mean", "normalized_score_std", *ended)}
    assert metrics["eval/3600.0_return_mean"] == 1500.0 and metrics["eval/3600.0_return_std"] == 500.0  # population std
    assert metrics["eval/1800.0_normalized_score_mean"] == pytest.approx(dt.normalized_score(500.0, *dt.D4RL_REF_SCORES["hopper"]))
    assert metrics["eval/3600.0_episode_length_mean"] == 700.0 and metrics["eval/3600.0_terminated_fraction"] == 0.5
    assert metrics["eval/1800.0_terminated_fraction"] == 0.0
    raw_only = dt.eval_metrics(results, None, None)
    assert set(raw_only) == {f"eval/{t}_{k}" for t in ("3600.0", "1800.0") for k in ("return_mean", "return_std", *ended)}
    table = dt.format_eval_table(10, metrics, (3600.0, 1800.0))
    assert "3600.0" in table and "1500.0 +- 500.0" in table and "700.0" in table and "50%" in table


@pytest.mark.parametrize("unhealthy_ends", [True, False])
def test_episode_lengths_and_terminations(unhealthy_ends):
    """A model that makes the hopper fall: with terminate_when_unhealthy on, episodes end early by termination; off,
    every episode runs to episode_len and none counts as terminated."""
    model = hopper_model(episode_len=60, gain=50.0)
    make = lambda: StrictEnv(dt.make_env("Hopper-v4", terminate_when_unhealthy=unhealthy_ends))  # noqa: E731
    results = dt.evaluate(model, dt.EvalEnvs(make, 4), (3600.0, 1800.0), 2, 0, np.zeros(11, np.float32),
                          np.ones(11, np.float32), 0.001, CPU)
    metrics = dt.eval_metrics(results, None, None)
    for target, ran in results.items():
        assert ((1 <= ran["length"]) & (ran["length"] <= 60)).all()
        assert metrics[f"eval/{target}_episode_length_mean"] == ran["length"].mean()
        if unhealthy_ends:
            assert ran["terminated"].all() and (ran["length"] < 60).all()  # it fell, before the time limit
        else:
            assert metrics[f"eval/{target}_terminated_fraction"] == 0.0 and (ran["length"] == 60).all()


def first_observations(model, envs, eval_reset, targets=(3600.0, 1800.0), episodes=4, seed=42):
    model.calls.clear()
    dt.evaluate(model, envs, targets, episodes, seed, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CPU,
                worker_rollouts=False, eval_reset=eval_reset)
    return model.calls[0]["states"][:, 0].numpy()  # every episode's first observation (mean 0, std 1: as observed)


def test_eval_reset_protocols_against_corl_and_our_seeds():
    """per_target is CORL's: for each target eval_env.seed(eval_seed), then one env reset episode after episode (the
    gymnasium form: reset(seed=eval_seed), then reset()); per_episode resets episode i with seed eval_seed + i."""
    model, episodes = hopper_model(RecordingDT), 4
    env = dt.make_env("Hopper-v4")
    corl = [env.reset(seed=42)[0]] + [env.reset()[0] for _ in range(episodes - 1)]  # one target's sequence
    ours = [env.reset(seed=42 + i)[0] for i in range(episodes)]
    for workers in (0, 2):  # the same in worker processes
        envs = dt.EvalEnvs(strict_hopper, 2 * episodes, workers=workers)
        try:
            np.testing.assert_allclose(first_observations(model, envs, "per_target"), np.concatenate([corl, corl]),
                                       rtol=0, atol=1e-6)
            np.testing.assert_allclose(first_observations(model, envs, "per_episode"), np.concatenate([ours, ours]),
                                       rtol=0, atol=1e-6)
            unseeded = [first_observations(model, envs, "unseeded") for _ in range(2)]
        finally:
            envs.close()
        assert not np.allclose(unseeded[0], unseeded[1])  # the DT authors' env is never seeded: no two alike
        assert len({row.tobytes() for row in unseeded[0]}) == 2 * episodes
    assert not np.allclose(corl[1:], ours[1:])  # the protocols differ after each one's first episode
