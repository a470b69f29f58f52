"""Held-out validation (--val_fraction): whole trajectories, seeded and disjoint, state statistics from the
training part only, a reproducible val_loss on fixed windows, logged at every evaluation, exact on resume."""
import json
import signal
import sys
import time

import numpy as np
import pytest
import torch

import dt
from test_resume import RUN, env, rows, run, start, wait_for  # noqa: F401 (env: the fixture of the runs' env)


def trajectories(raw):
    starts, lengths = dt.cut_trajectories(raw["terminals"], raw["timeouts"])
    return [raw["observations"][s:s + n].tobytes() for s, n in zip(starts, lengths)]


def test_split_holds_out_whole_trajectories_disjoint_and_seeded(hopper_file):
    raw = dt.load_d4rl_hdf5(hopper_file)  # 8 flagged episodes and a trailing piece without a flag: 9
    train, val = dt.split_trajectories(raw, 0.3, seed=5)
    everything, kept, held = trajectories(raw), trajectories(train), trajectories(val)
    assert len(held) == round(0.3 * 9) == 3 and len(kept) == 6  # whole trajectories, none cut or merged
    assert set(kept) | set(held) == set(everything) and not set(kept) & set(held)
    assert len(train["rewards"]) + len(val["rewards"]) == len(raw["rewards"])
    again, _ = dt.split_trajectories(raw, 0.3, seed=5)
    assert all(np.array_equal(again[k], train[k]) for k in raw)  # the seed fixes the split
    other = [trajectories(dt.split_trajectories(raw, 0.3, seed=s)[1]) for s in range(6, 10)]
    assert any(set(h) != set(held) for h in other)
    assert dt.split_trajectories(raw, 0.0, seed=5) == (raw, None)


def test_val_loss_is_the_masked_mse_of_every_held_out_step_once(hopper_file):
    raw = dt.load_d4rl_hdf5(hopper_file)
    train, val_raw = dt.split_trajectories(raw, 0.3, seed=0)
    data = dt.prepare_data(train, 0.001)
    val = dt.prepare_data(val_raw, 0.001, (data.state_mean, data.state_std))
    assert not np.allclose(data.state_mean, dt.prepare_data(raw, 0.001).state_mean)  # statistics of the training part
    np.testing.assert_allclose(val.states, (val_raw["observations"] - data.state_mean) / data.state_std, rtol=1e-6)
    windows = dt.validation_windows(val, 5, torch.device("cpu"))
    states, actions, returns, timesteps, mask = windows
    assert int(mask.sum()) == len(val.states)  # every held-out step exactly once
    torch.testing.assert_close(actions[mask], torch.as_tensor(val.actions))

    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3, seq_len=5, episode_len=100, embedding_dim=16, num_layers=1)
    model.train()
    loss = dt.validation_loss(model, windows, chunk=3)  # chunks of 3 windows
    assert model.training  # the mode it found
    assert dt.validation_loss(model, windows) == pytest.approx(loss, rel=1e-6)  # no dropout: the same every time
    with torch.no_grad():  # the same masked MSE, over the whole set in one pass
        expected = dt.masked_mse(model.eval()(states, actions, returns, timesteps, padding_mask=mask), actions, mask)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_val_loss_logged_at_every_evaluation_and_exact_after_resume(env, tmp_path):
    env = {**env, "WANDB_MODE": "disabled"}  # metrics.jsonl is what is compared
    args = [*RUN, "--val_fraction", "0.3"]
    result = run([*args, "--run_dir", "full"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 trajectories" in result.stdout and "held out" in result.stdout
    full = rows(tmp_path / "full")
    evals = [row for row in full if "eval/3600.0_return_mean" in row]
    assert [row["step"] for row in evals if "val_loss" in row] == [100, 200, 300]
    assert len({row["val_loss"] for row in evals}) == 3  # it moves as the model trains

    marker = tmp_path / "training"
    proc = start([*args, "--run_dir", "run"], env, tmp_path, "slow_updates", marker)
    wait_for(marker, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stopped_at = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 300
    result = run(["--run_dir", "run"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows(tmp_path / "run") == full  # val_loss included, bit for bit


def test_report_curves_include_val_loss(tmp_path):
    pytest.importorskip("matplotlib")  # the curves are matplotlib PNGs (requirements-dev.txt)
    sys.path.insert(0, str(dt.Path(__file__).resolve().parents[1] / "benchmarks"))
    import report
    folder = tmp_path / "runs" / "seed0"
    folder.mkdir(parents=True)
    config = dt.TrainConfig(env_name="hopper-medium-v2", update_steps=200, target_returns=(3600.0,), val_fraction=0.2)
    with open(folder / "config.yaml", "w") as f:
        dt.pyrallis.dump(config, f)
    metrics = [{"step": 100, "train_loss": 0.5}, {"step": 200, "train_loss": 0.3}]
    for step, score, val_loss in ((100, 10.0, 0.6), (200, 20.0, 0.4)):
        metrics.append({"step": step, "eval/3600.0_return_mean": 10 * score, "eval/3600.0_normalized_score_mean": score,
                        "val_loss": val_loss})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    result = report.read_run(folder)
    assert result.losses == {"train_loss": [(100, 0.5), (200, 0.3)], "val_loss": [(100, 0.6), (200, 0.4)]}
    report.report([tmp_path / "runs"], tmp_path / "out", "test")
    import matplotlib.image
    width_with = matplotlib.image.imread(tmp_path / "out" / "curves_hopper-medium-v2.png").shape[1]
    for m in metrics:
        m.pop("val_loss", None)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    report.report([tmp_path / "runs"], tmp_path / "out2", "test")
    width_without = matplotlib.image.imread(tmp_path / "out2" / "curves_hopper-medium-v2.png").shape[1]
    assert width_with > width_without  # a loss panel beside the scores
