"""Evaluation videos: real MuJoCo offscreen rendering (MUJOCO_GL=egl), mp4 files decoded back, the
returns of a rollout unchanged by recording, and the files a run and an eval-only run write."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dt
from conftest import ROOT

imageio = pytest.importorskip("imageio")
pytest.importorskip("imageio_ffmpeg")
CPU = torch.device("cpu")
LONG_HOPPER = functools.partial(dt.make_env, "Hopper-v4", terminate_when_unhealthy=False)  # every episode runs T steps
ARGS = ((3600.0, 1800.0), 3, 7, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CPU)


@pytest.fixture(scope="module", autouse=True)
def rendering():
    dt.check_video(LONG_HOPPER)  # what a run does first: sets MUJOCO_GL=egl here, renders one frame


def small_model(episode_len=30):
    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3, seq_len=4, episode_len=episode_len, embedding_dim=32, num_layers=2, num_heads=2)
    with torch.no_grad():
        model.action_head[0].weight.mul_(5.0)  # bigger actions than an untrained model's: the hopper moves
    return model


def frames(path):
    with imageio.get_reader(path) as reader:
        return np.stack(list(reader.iter_data()))


def test_recorded_episodes_decode_to_one_labelled_frame_per_step(tmp_path):
    model = small_model(episode_len=30)
    envs = dt.EvalEnvs(LONG_HOPPER, 6, render=[0, 4])  # target 3600's episode 0, target 1800's episode 1
    try:
        dt.evaluate(model, envs, *ARGS, video_prefix=str(tmp_path / "step5"))
    finally:
        envs.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step5_target1800.0_ep1.mp4", "step5_target3600.0_ep0.mp4"]
    video = frames(tmp_path / "step5_target3600.0_ep0.mp4")
    assert video.shape == (30, dt.VIDEO_SIZE, dt.VIDEO_SIZE, 3)  # one frame per step of the 30-step episode
    assert np.abs(np.diff(video.astype(int), axis=0)).mean(axis=(1, 2, 3)).min() > 0.05  # every frame moves on
    corner = video[:, 2:30, 2:70].astype(int)  # the label: white text on a black box
    assert (corner.max(axis=-1) < 40).mean() > 0.5 and (corner.min(axis=-1) > 200).any(axis=(1, 2)).all()
    labels = video[:, :30, :80].astype(int)
    assert np.abs(np.diff(labels, axis=0)).sum(axis=(1, 2, 3)).max() > 0  # the running return changes


@pytest.mark.parametrize("workers", [0, 2])
def test_recording_leaves_the_returns_unchanged(tmp_path, workers):
    """In the training process, and with workers both ways: each running its episodes' rollouts (CPU), or
    stepping envs for the model here (GPU), which then sends the frames of the recorded episodes back."""
    model = small_model(episode_len=40)
    modes = (None, False) if workers else (None,)  # worker_rollouts: the device's default, or envs stepped only
    returns = {}
    for render in ((), (0, 1, 3)):
        envs = dt.EvalEnvs(LONG_HOPPER, 6, workers, render=render)
        try:
            for mode in modes:
                returns[render, mode] = dt.evaluate(model, envs, *ARGS, worker_rollouts=mode,
                                                    video_prefix=str(tmp_path / f"{mode}"))
        finally:
            envs.close()
    for target in ARGS[0]:
        for mode in modes:
            np.testing.assert_array_equal(returns[(0, 1, 3), mode][target], returns[(), mode][target])
    assert len(list(tmp_path.glob("*.mp4"))) == 3 * len(modes) and not list(tmp_path.glob("*.part.mp4"))
    assert all(len(frames(p)) == 40 for p in tmp_path.glob("*.mp4"))


def test_a_failed_rollout_leaves_no_video(tmp_path):
    envs = dt.EvalEnvs(LONG_HOPPER, 2, render=[0])
    try:
        with pytest.raises(ValueError):  # state statistics of the wrong size: the first step fails
            dt.evaluate(small_model(), envs, (3600.0,), 2, 0, np.zeros(5, np.float32), np.ones(5, np.float32),
                        0.001, CPU, video_prefix=str(tmp_path / "step1"))
    finally:
        envs.close()
    assert not list(tmp_path.iterdir())


def test_training_and_eval_only_record_every_target(hopper_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb.Video is logged (offline) too
    monkeypatch.setenv("D4RL_DATASET_DIR", str(hopper_file.parent))
    monkeypatch.chdir(tmp_path)
    args = ["--env_name", "hopper-medium-v2", "--update_steps", "4", "--eval_every", "2", "--batch_size", "4",
            "--seq_len", "5", "--embedding_dim", "16", "--num_layers", "1", "--warmup_steps", "2", "--device", "cpu",
            "--episode_len", "80", "--eval_episodes", "2", "--eval_video", "1", "--target_returns", "[3600,1800]",
            "--run_dir", "run"]
    dt.main(args)
    names = sorted(p.name for p in (tmp_path / "run" / "videos").iterdir())
    assert names == [f"step{s}_target{t}_ep0.mp4" for s in (2, 4) for t in ("1800.0", "3600.0")]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("video") for row in rows for k in row)  # metrics.jsonl keeps numbers only
    logged = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/videos/video/target*.mp4"))
    assert len(logged) == 4

    monkeypatch.setenv("WANDB_MODE", "disabled")
    dt.main(["--eval_checkpoint", "run", "--eval_video", "2", "--target_returns", "[1000]", "--runs_dir", "evals"])
    (eval_dir,) = (tmp_path / "evals").iterdir()
    assert sorted(p.name for p in (eval_dir / "videos").iterdir()) == [f"step4_target1000.0_ep{i}.mp4" for i in (0, 1)]


def test_missing_video_package_stops_before_the_run(hopper_file, tmp_path):
    code = (f"import sys; sys.modules['imageio_ffmpeg'] = None; sys.path.insert(0, {str(ROOT / 'algorithms')!r}); "
            "import dt; dt.main(sys.argv[1:])")
    env = {**os.environ, "WANDB_MODE": "disabled", "D4RL_DATASET_DIR": str(hopper_file.parent)}
    result = subprocess.run([sys.executable, "-c", code, "--env_name", "hopper-medium-v2", "--eval_video", "1",
                             "--eval_episodes", "1", "--runs_dir", str(tmp_path / "runs")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: eval_video needs the imageio-ffmpeg package: "
                                                      "pip install imageio-ffmpeg==0.8.1")
    assert not (tmp_path / "runs").exists()
