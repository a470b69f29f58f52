"""The published recipes' switches, each pinned to its source: CORL's loss (HEAD and the table-era e4f6175), its
trailing-piece rule, its checkpoints (tools/import_corl.py), and the DT authors' preset configs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import dt
from conftest import ROOT


# --- CORL's data pipeline, as tinkoff-ai/CORL's dt.py builds a window --------------------------------------------
def corl_trajectories(raw):
    """load_d4rl_trajectories: a trajectory closes at each terminal or timeout; steps after the last flag are never
    closed (dropped); the state statistics are those of every observation of the file."""
    trajectories, current = [], []
    for i in range(len(raw["rewards"])):
        current.append(i)
        if raw["terminals"][i] or raw["timeouts"][i]:
            trajectories.append(np.array(current))
            current = []
    obs = raw["observations"].astype(np.float64)
    return trajectories, obs.mean(0), obs.std(0) + 1e-6


def corl_window(raw, trajectory, start, seq_len, mean, std, reward_scale, mask_after_padding):
    """SequenceDataset.__prepare_sample: slice, normalise, scale, right-pad with zeros, timesteps start..start+K-1.
    e4f6175 built the mask after padding (all ones), ef80957 before it."""
    steps = trajectory[start:start + seq_len]
    rewards = raw["rewards"][trajectory].astype(np.float64)
    returns = np.cumsum(rewards[::-1])[::-1][start:start + seq_len] * reward_scale
    states = (raw["observations"][steps] - mean) / std
    actions = raw["actions"][steps]
    pad = seq_len - len(steps)
    mask = np.hstack([np.ones(len(steps)), np.zeros(pad)])
    states, actions = (np.concatenate([x, np.zeros((pad, x.shape[1]))]) for x in (states, actions))
    returns = np.concatenate([returns, np.zeros(pad)])
    if mask_after_padding:
        mask = np.hstack([np.ones(states.shape[0]), np.zeros(seq_len - states.shape[0])])
    return states, actions, returns, np.arange(start, start + seq_len), mask


@pytest.fixture(scope="module")
def short_trajectories(hopper_file):
    """The hopper file (its episodes end early, many windows padded), its trailing piece included."""
    return dt.load_d4rl_hdf5(hopper_file)


def corl_and_our_batch(raw, mask_after_padding, seq_len=20):
    trajectories, mean, std = corl_trajectories(raw)
    data = dt.prepare_data(raw, 0.001, keep_trailing_piece=False)
    sampler = dt.WindowSampler(data, seq_len, torch.device("cpu"), seed=0)
    picks = [(t, s) for t in range(len(trajectories)) for s in (0, len(trajectories[t]) - 3, len(trajectories[t]) - 1)]
    corl = [corl_window(raw, trajectories[t], s, seq_len, mean, std, 0.001, mask_after_padding) for t, s in picks]
    corl = [torch.as_tensor(np.stack(x), dtype=torch.float32) for x in zip(*corl)]
    ours = sampler.windows(torch.as_tensor([int(trajectories[t][s]) for t, s in picks]))
    return corl, ours


@pytest.mark.parametrize("mask_after_padding", [False, True])
def test_our_windows_are_corls(short_trajectories, mask_after_padding):
    (states, actions, returns, timesteps, mask), ours = corl_and_our_batch(short_trajectories, mask_after_padding)
    for name, theirs, mine in zip(("states", "actions", "returns-to-go"), (states, actions, returns), ours):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(ours[3], timesteps.long())  # padded steps' timesteps keep counting
    assert (~ours[4]).sum() > 20  # the batch has padded steps
    if mask_after_padding:  # e4f6175: every step counts
        assert mask.all()
    else:
        assert torch.equal(ours[4], mask.bool())


def corl_loss(model, batch, mask):
    """CORL's training step (both commits): key_padding_mask = ~mask, then F.mse_loss(reduction="none") times the
    mask, .mean() over every entry of the batch."""
    states, actions, returns, timesteps, _ = batch
    predicted = model(states, actions, returns, timesteps, padding_mask=mask.bool())
    return (F.mse_loss(predicted, actions.detach(), reduction="none") * mask.unsqueeze(-1)).mean()


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return dt.DecisionTransformer(11, 3, seq_len=20, episode_len=1000, embedding_dim=32, num_layers=2, num_heads=2,
                                  attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, **kwargs)


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def test_table_era_loss_is_corl_e4f6175s(short_trajectories):
    """padding_mask all_ones + loss_reduction all_entries: the loss and gradient CORL's table-era code computed on
    the same batch, with its all-ones mask (padded steps attended to and in the loss)."""
    corl, batch = corl_and_our_batch(short_trajectories, mask_after_padding=True)
    model = tiny_model()
    expected = corl_loss(model, batch, corl[4])
    expected.backward()
    expected_grads = gradients(model)
    model.zero_grad()
    loss = dt.forward_backward(model, batch, micro_batch=7, bf16=False, loss_reduction="all_entries",
                               padding_mask="all_ones")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    for grad, want in zip(gradients(model), expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    default = dt.forward_backward(model, batch, micro_batch=7, bf16=False)
    assert abs(default.item() - loss.item()) > 1e-3 * loss.item()  # the padded steps do change it


def test_all_entries_reduction_is_corl_heads_formula(short_trajectories):
    """loss_reduction all_entries with the real mask: (squared error * mask).mean(), CORL HEAD's loss; the default
    divides by the real entries instead, so the two differ by exactly that ratio."""
    _, batch = corl_and_our_batch(short_trajectories, mask_after_padding=False)
    mask = batch[4]
    model = tiny_model()
    expected = corl_loss(model, batch, mask)
    loss = dt.forward_backward(model, batch, micro_batch=5, bf16=False, loss_reduction="all_entries")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    model.zero_grad()
    real_steps = dt.forward_backward(model, batch, micro_batch=5, bf16=False)
    torch.testing.assert_close(real_steps * mask.sum() / mask.numel(), loss, rtol=1e-6, atol=1e-7)


def test_trailing_piece_dropped_as_corl_does(short_trajectories):
    raw = short_trajectories
    trajectories, mean, std = corl_trajectories(raw)
    kept, dropped = dt.prepare_data(raw, 0.001), dt.prepare_data(raw, 0.001, keep_trailing_piece=False)
    assert len(kept.traj_lengths) == len(trajectories) + 1 and kept.traj_lengths[-1] == 7  # the fixture's tail
    assert dropped.traj_lengths.tolist() == [len(t) for t in trajectories]
    assert len(dropped.states) == len(raw["rewards"]) - 7  # no window can start in the tail
    np.testing.assert_allclose(dropped.state_mean, mean, rtol=1e-5)  # statistics of every observation, as CORL's
    np.testing.assert_allclose(dropped.state_std, std, rtol=1e-5)
    unflagged = {k: v[-7:] for k, v in raw.items()}
    with pytest.raises(dt.UserError, match="no terminal or timeout flag"):
        dt.prepare_data(unflagged, 0.001, keep_trailing_piece=False)


# --- CORL's checkpoints: its model, its files, and tools/import_corl.py -----------------------------------------
class CorlBlock(nn.Module):
    """CORL's TransformerBlock: nn.MultiheadAttention with a causal_mask buffer, pre-norm, GELU MLP."""

    def __init__(self, seq_len, dim, heads):
        super().__init__()
        self.register_buffer("causal_mask", ~torch.tril(torch.ones(seq_len, seq_len)).to(bool))
        self.norm1, self.norm2, self.drop = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.Dropout(0.1)
        self.attention = nn.MultiheadAttention(dim, heads, 0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.1))

    def forward(self, x, padding_mask):
        mask, normed = self.causal_mask[:x.shape[1], :x.shape[1]], self.norm1(x)
        x = x + self.drop(self.attention(normed, normed, normed, attn_mask=mask, key_padding_mask=padding_mask,
                                         need_weights=False)[0])
        return x + self.mlp(self.norm2(x))


class CorlDT(nn.Module):
    """CORL's DecisionTransformer: the same module names, a padding_mask that is True at padded steps."""

    def __init__(self, state_dim, action_dim, seq_len, episode_len, dim, layers, heads):
        super().__init__()
        self.emb_drop, self.emb_norm, self.out_norm = nn.Dropout(0.1), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.timestep_emb = nn.Embedding(episode_len + seq_len, dim)
        self.state_emb, self.action_emb = nn.Linear(state_dim, dim), nn.Linear(action_dim, dim)
        self.return_emb = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([CorlBlock(3 * seq_len, dim, heads) for _ in range(layers)])
        self.action_head = nn.Sequential(nn.Linear(dim, action_dim), nn.Tanh())
        for p in self.parameters():  # random weights of every scale, so no mapping error hides behind a tiny init
            nn.init.normal_(p, std=0.3)

    def forward(self, states, actions, returns, timesteps, padding_mask):
        batch, steps = states.shape[:2]
        time = self.timestep_emb(timesteps)
        sequence = torch.stack([self.return_emb(returns.unsqueeze(-1)) + time, self.state_emb(states) + time,
                                self.action_emb(actions) + time], dim=1).permute(0, 2, 1, 3).reshape(batch, 3 * steps, -1)
        padding_mask = torch.stack([padding_mask] * 3, dim=1).permute(0, 2, 1).reshape(batch, 3 * steps)
        out = self.emb_drop(self.emb_norm(sequence))
        for block in self.blocks:
            out = block(out, padding_mask)
        return self.action_head(self.out_norm(out)[:, 1::3])


CORL_CONFIG = {  # the fields of CORL's TrainConfig, as its pyrallis.dump writes config.yaml (a small model)
    "project": "CORL", "group": "DT-D4RL", "name": "DT-hopper-medium-v2-1a2b3c4d", "embedding_dim": 32,
    "num_layers": 2, "num_heads": 2, "seq_len": 5, "episode_len": 50, "attention_dropout": 0.1,
    "residual_dropout": 0.1, "embedding_dropout": 0.1, "max_action": 1.0, "env_name": "hopper-medium-v2",
    "learning_rate": 0.0008, "betas": [0.9, 0.999], "weight_decay": 0.0001, "clip_grad": 0.25, "batch_size": 4096,
    "update_steps": 100000, "warmup_steps": 10000, "reward_scale": 0.001, "num_workers": 4,
    "target_returns": [3600.0, 1800.0], "eval_episodes": 100, "eval_every": 5000,
    "checkpoints_path": "/corl/checkpoints/DT-hopper-medium-v2-1a2b3c4d", "deterministic_torch": False,
    "train_seed": 10, "eval_seed": 42, "device": "cuda"}


def test_import_corl_checkpoint_predicts_corls_actions_and_evaluates(tmp_path):
    torch.manual_seed(0)
    corl = CorlDT(11, 3, seq_len=5, episode_len=50, dim=32, layers=2, heads=2).eval()
    run = tmp_path / "DT-hopper-medium-v2-1a2b3c4d"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CORL_CONFIG))
    mean, std = np.random.default_rng(0).normal(size=(1, 11)), np.random.default_rng(1).uniform(1, 2, size=(1, 11))
    torch.save({"model_state": corl.state_dict(), "state_mean": mean, "state_std": std}, run / "dt_checkpoint.pt")
    assert any(k.endswith("causal_mask") for k in corl.state_dict())  # CORL's layout, buffers and all

    out = tmp_path / "imported" / "corl.pt"
    result = subprocess.run([sys.executable, str(ROOT / "tools/import_corl.py"), str(run), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    checkpoint = dt.load_checkpoint(out)  # passes this project's checks, CRC-32s included
    config = dt.TrainConfig(**checkpoint["config"])
    assert (config.eval_reset, config.loss_reduction, config.keep_trailing_piece) == ("per_target", "all_entries", False)
    assert checkpoint["eval_env"] == "Hopper-v4" and checkpoint["state_mean"].shape == (11,)
    model = dt.build_model(config, 11, 3).eval()
    model.load_state_dict(checkpoint["model_state"])
    g = torch.Generator().manual_seed(2)
    states, actions, returns = torch.randn(4, 5, 11, generator=g), torch.rand(4, 5, 3, generator=g), torch.randn(4, 5, generator=g)
    timesteps = torch.randint(0, 50, (4, 1), generator=g) + torch.arange(5)
    real = torch.ones(4, 5, dtype=torch.bool)
    real[1, 3:] = False  # a right-padded window
    with torch.no_grad():
        theirs = corl(states, actions, returns, timesteps, padding_mask=~real)
        ours = model(states, actions, returns, timesteps, padding_mask=real)
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)

    env = {**os.environ, "WANDB_MODE": "disabled"}
    evaluated = subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), "--eval_checkpoint", str(out),
                                "--eval_episodes", "2", "--target_returns", "[3600]", "--eval_workers", "0",
                                "--runs_dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "eval @ step 100000" in evaluated.stdout and "3600.0" in evaluated.stdout


def test_import_corl_refuses_what_is_not_a_corl_run(tmp_path):
    (tmp_path / "dt_checkpoint.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CORL_CONFIG))
    for source in (tmp_path / "missing", tmp_path):
        result = subprocess.run([sys.executable, str(ROOT / "tools/import_corl.py"), str(source), str(tmp_path / "o.pt")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


# --- The DT authors' preset configs -------------------------------------------------------------------------------
PAPER_TARGETS = {"halfcheetah": [12000.0, 6000.0], "hopper": [3600.0, 1800.0], "walker2d": [5000.0, 2500.0]}


@pytest.mark.parametrize("path", sorted((ROOT / "configs/dt/paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_presets_are_the_authors_gym_recipe(path):
    """kzl/decision-transformer gym/experiment.py: batch 64, lr 1e-4, weight decay 1e-4, 10k warm-up, K 20, width
    128, 3 layers, 1 head, relu, dropout 0.1, 10 x 10k updates with an evaluation of 100 episodes after each,
    env_targets and scale 1000 per env, their GPT-2 init, trajectories cut at flags, an env never seeded."""
    config = dt.parse_config(["--config_path", str(path)])
    dt.validate_config(config)
    env = config.env_name.split("-")[0]
    expected = dict(batch_size=64, learning_rate=1e-4, weight_decay=1e-4, warmup_steps=10000, seq_len=20,
                    embedding_dim=128, num_layers=3, num_heads=1, activation="relu", attention_dropout=0.1,
                    residual_dropout=0.1, embedding_dropout=0.1, update_steps=100000, eval_every=10000,
                    eval_episodes=100, reward_scale=0.001, clip_grad=0.25, episode_len=1000, init="kzl",
                    lr_schedule="constant", keep_trailing_piece=False, loss_reduction="real_steps",
                    padding_mask="real_steps", eval_reset="unseeded", target_returns=tuple(PAPER_TARGETS[env]))
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.env_name == f"{env}-{path.stem.split('_', 1)[1][:-3].replace('_', '-')}-v2"


def test_paper_presets_cover_the_nine_locomotion_datasets():
    names = sorted(yaml.safe_load(p.read_text())["env_name"] for p in (ROOT / "configs/dt/paper").glob("*.yaml"))
    assert names == sorted(f"{e}-{k}-v2" for e in PAPER_TARGETS for k in ("medium", "medium-replay", "medium-expert"))


def test_grid_plans_the_paper_presets_like_any_config():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grid
    configs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/dt/paper").glob("*.yaml"))
    runs = grid.plan_grid(configs, [0, 1], [("padding_mask", "all_ones")])
    assert len(runs) == 18 and runs[0].label == "paper-halfcheetah_medium_expert_v2-seed0"
    assert all(run.config.init == "kzl" and run.config.padding_mask == "all_ones" for run in runs)


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_field_sets_cuda_matmul_precision(tmp_path, hopper_file, monkeypatch, tf32):
    """Training (and eval-only, from the checkpoint's config) set TF32 matmuls as the field says; default on."""
    assert dt.TrainConfig().tf32 is True
    monkeypatch.setenv("WANDB_MODE", "disabled")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        dt.train(dt.TrainConfig(env_name="hopper-medium-v2", dataset_dir=str(hopper_file.parent), update_steps=2,
                                eval_every=2, batch_size=4, seq_len=5, episode_len=100, embedding_dim=16, num_layers=1,
                                eval_episodes=1, target_returns=(100.0,), runs_dir=str(tmp_path), device="cpu",
                                eval_workers=0, tf32=tf32))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        (run,) = tmp_path.iterdir()
        dt.main(["--eval_checkpoint", str(run), "--runs_dir", str(tmp_path / "evals")])
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
