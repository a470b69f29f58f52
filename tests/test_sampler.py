"""The window sampler: length-weighted choice, right padding, mask and timesteps."""
import numpy as np
import torch

import dt


def make_data(lengths, state_dim=2, action_dim=1, reward_scale=1.0):
    """OfflineData whose state[:, 0] is the global transition index, to trace every sampled window."""
    lengths = np.asarray(lengths)
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    states = np.zeros((n, state_dim), np.float32)
    states[:, 0] = np.arange(n) + 1  # +1 so that zero padding is distinguishable from index 0
    actions = np.tile(np.arange(n, dtype=np.float32)[:, None] + 0.5, (1, action_dim))
    rewards = np.ones(n, np.float32)
    rtg = dt.returns_to_go(rewards, starts, lengths) * reward_scale
    return dt.OfflineData(states, actions, rtg, starts, lengths, rtg[starts], np.zeros(state_dim), np.ones(state_dim))


def test_trajectory_choice_is_length_weighted_and_start_uniform():
    lengths = [1, 3, 6, 30]
    data = make_data(lengths)
    sampler = dt.WindowSampler(data, seq_len=4, device=torch.device("cpu"), seed=0)
    draws = 200_000
    states = sampler.sample(draws)[0]
    start = states[:, 0, 0].long().numpy() - 1  # global index of the first step of each window
    traj = np.searchsorted(data.traj_starts, start, side="right") - 1
    freq = np.bincount(traj, minlength=len(lengths)) / draws
    expected = np.asarray(lengths) / sum(lengths)
    # binomial standard error is at most 0.0011 here; 5 sigma keeps the test deterministic in practice
    np.testing.assert_allclose(freq, expected, atol=0.006)
    # inside the longest trajectory every start index, including the last ones, is equally likely
    counts = np.bincount(start[traj == 3] - data.traj_starts[3], minlength=30)
    assert counts.min() > 0 and counts[-1] > 0
    assert counts.std() / counts.mean() < 0.06


def test_padding_mask_and_timesteps():
    data = make_data([5, 2, 8], reward_scale=0.5)
    K = 6
    sampler = dt.WindowSampler(data, seq_len=K, device=torch.device("cpu"), seed=1)
    states, actions, returns, timesteps, mask = sampler.sample(4000)
    assert states.shape == (4000, K, 2) and actions.shape == (4000, K, 1)
    assert returns.shape == timesteps.shape == mask.shape == (4000, K) and mask.dtype == torch.bool
    ends = data.traj_starts + data.traj_lengths
    seen_padding = False
    for b in range(0, 4000, 7):
        start = int(states[b, 0, 0]) - 1
        traj = np.searchsorted(data.traj_starts, start, side="right") - 1
        real = min(K, int(ends[traj] - start))
        assert mask[b].tolist() == [True] * real + [False] * (K - real)  # right padding only
        idx = np.arange(start, start + real)
        np.testing.assert_array_equal(states[b, :real, 0].numpy(), idx + 1)
        np.testing.assert_array_equal(actions[b, :real, 0].numpy(), idx + 0.5)
        np.testing.assert_allclose(returns[b, :real].numpy(), data.returns_to_go[idx])
        assert (states[b, real:] == 0).all() and (actions[b, real:] == 0).all() and (returns[b, real:] == 0).all()
        step_in_traj = start - data.traj_starts[traj]
        # timesteps keep counting through the padding
        assert timesteps[b].tolist() == list(range(step_in_traj, step_in_traj + K))
        seen_padding |= real < K
    assert seen_padding
    assert int(timesteps.max()) <= max(data.traj_lengths) - 1 + K - 1


def test_same_seed_same_batches():
    data = make_data([10, 20])
    a = dt.WindowSampler(data, 5, torch.device("cpu"), seed=3).sample(64)
    b = dt.WindowSampler(data, 5, torch.device("cpu"), seed=3).sample(64)
    c = dt.WindowSampler(data, 5, torch.device("cpu"), seed=4).sample(64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
