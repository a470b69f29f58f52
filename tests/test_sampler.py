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


def reference_window(data, traj, start, K):
    """The public baseline's per-sample window: slice, pad on the right, mask, timesteps."""
    s0, n = data.traj_starts[traj], data.traj_lengths[traj]
    idx = np.arange(s0 + start, s0 + min(start + K, n))
    pad = K - len(idx)
    states = np.concatenate([data.states[idx], np.zeros((pad, data.states.shape[1]))])
    mask = np.concatenate([np.ones(len(idx)), np.zeros(pad)])
    return states, mask, np.arange(start, start + K)


def test_vectorised_sampler_matches_a_per_sample_reference_in_distribution():
    lengths = [2, 5, 9, 17, 40]
    data = make_data(lengths)
    K, draws = 8, 100_000
    rng = np.random.default_rng(0)
    probs = np.asarray(lengths) / sum(lengths)
    ref_start, ref_real = np.empty(draws, int), np.empty(draws, int)
    for i in range(draws):  # straightforward per-sample reference
        traj = rng.choice(len(lengths), p=probs)
        start = rng.integers(0, lengths[traj])
        states, mask, _ = reference_window(data, traj, start, K)
        ref_start[i], ref_real[i] = data.traj_starts[traj] + start, mask.sum()
    states, _, _, timesteps, mask = dt.WindowSampler(data, K, torch.device("cpu"), seed=0).sample(draws)
    start = states[:, 0, 0].long().numpy() - 1
    n = int(sum(lengths))
    tv_start = 0.5 * np.abs(np.bincount(start, minlength=n) - np.bincount(ref_start, minlength=n)).sum() / draws
    tv_real = 0.5 * np.abs(np.bincount(mask.sum(1).numpy(), minlength=K + 1)
                           - np.bincount(ref_real, minlength=K + 1)).sum() / draws
    assert tv_start < 0.03 and tv_real < 0.01  # sampling noise is about 0.02 and 0.005 here
    # and window by window, the same content as the reference for the same (trajectory, start)
    for b in range(0, draws, 997):
        traj = np.searchsorted(data.traj_starts, start[b], side="right") - 1
        ref_states, ref_mask, ref_steps = reference_window(data, traj, start[b] - data.traj_starts[traj], K)
        np.testing.assert_array_equal(states[b].numpy(), ref_states)
        np.testing.assert_array_equal(mask[b].numpy(), ref_mask.astype(bool))
        np.testing.assert_array_equal(timesteps[b].numpy(), ref_steps)
