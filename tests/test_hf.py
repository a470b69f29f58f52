"""Hugging Face interop: trajectories in the Hub dataset's schema, and export to transformers' DecisionTransformerModel."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dt
from conftest import ROOT, write_d4rl_file

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "tools"))
import export_hf  # noqa: E402


def save_as_hub_rows(raw: dict, folder: Path, array2d: bool = False) -> None:
    """Write D4RL flat arrays as the Hub dataset does: one row per trajectory, dones per step."""
    starts, lengths = dt.cut_trajectories(raw["terminals"], raw["timeouts"])
    pieces = [slice(s, s + n) for s, n in zip(starts, lengths)]
    rows = {"observations": [raw["observations"][p] for p in pieces], "actions": [raw["actions"][p] for p in pieces],
            "rewards": [raw["rewards"][p] for p in pieces], "dones": [raw["terminals"][p] for p in pieces]}
    if array2d:  # the dataset card's Array2D features, saved as a DatasetDict with a train split
        matrix = lambda width: datasets.Array2D(shape=(None, width), dtype="float32")  # noqa: E731
        features = datasets.Features({"observations": matrix(raw["observations"].shape[1]),
                                      "actions": matrix(raw["actions"].shape[1]),
                                      "rewards": datasets.Sequence(datasets.Value("float32")),
                                      "dones": datasets.Sequence(datasets.Value("bool"))})
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(folder))
    else:
        datasets.Dataset.from_dict(rows).save_to_disk(str(folder))


@pytest.fixture(scope="module")
def hopper_rows(hopper_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "hopper-medium-v2"
    save_as_hub_rows(dt.load_d4rl_hdf5(hopper_file), folder)
    return folder


@pytest.mark.parametrize("array2d", [False, True], ids=["sequence", "array2d"])
def test_hub_rows_give_the_trajectories_returns_and_statistics_of_the_hdf5_file(tmp_path, array2d):
    write_d4rl_file(tmp_path / "hopper.hdf5", "Hopper-v4", episodes=8, max_steps=30, seed=0, trailing_steps=7)
    raw = dt.load_d4rl_hdf5(tmp_path / "hopper.hdf5")
    assert raw["terminals"].any() and raw["timeouts"].any()  # episodes that end both ways, and a trailing piece
    assert not (raw["terminals"] | raw["timeouts"])[-1]
    save_as_hub_rows(raw, tmp_path / "rows", array2d)
    hub = dt.load_hf_trajectories(tmp_path / "rows")
    for key in ("observations", "actions", "rewards", "terminals"):
        np.testing.assert_array_equal(hub[key], raw[key], err_msg=key)
    assert hub["timeouts"][-1]  # the trailing piece's row ends without done: a timeout, as cut_trajectories treats it
    for got, want in zip(dt.cut_trajectories(hub["terminals"], hub["timeouts"]),
                         dt.cut_trajectories(raw["terminals"], raw["timeouts"])):
        np.testing.assert_array_equal(got, want)
    ours, theirs = dt.prepare_data(hub, 0.001), dt.prepare_data(raw, 0.001)
    for field in dataclasses.fields(dt.OfflineData):
        np.testing.assert_array_equal(getattr(ours, field.name), getattr(theirs, field.name), err_msg=field.name)


def test_training_on_hub_rows_equals_training_on_the_hdf5_file(hopper_file, hopper_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tiny = dict(env_name="hopper-medium-v2", update_steps=6, eval_every=6, log_every=1, batch_size=8, seq_len=5,
                episode_len=100, embedding_dim=32, num_layers=2, warmup_steps=2, eval_episodes=1,
                target_returns=(100.0,), device="cpu", eval_workers=0)
    hdf5 = dt.train(dt.TrainConfig(**tiny, dataset_dir=str(hopper_file.parent), runs_dir=str(tmp_path / "a")))
    hub = dt.train(dt.TrainConfig(**tiny, dataset_source="hf", dataset_path=str(hopper_rows), runs_dir=str(tmp_path / "b")))
    assert hub == hdf5  # same data, same seed: same losses, same evaluation returns and normalized scores
    assert "eval/100.0_normalized_score_mean" in hub  # the D4RL name still picks Hopper-v4 and its reference scores


def test_hub_source_errors_are_one_clear_line(tmp_path, hopper_file, monkeypatch):
    with pytest.raises(dt.UserError, match="save_to_disk"):
        dt.resolve_dataset(dt.TrainConfig(env_name="hopper-medium-v2", dataset_source="hf", dataset_path=str(hopper_file)))
    with pytest.raises(dt.UserError, match="cannot load"):
        dt.load_hf_trajectories(tmp_path)  # an empty folder
    datasets.Dataset.from_dict({"observations": [[[0.0]]], "actions": [[[0.0]]]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(dt.UserError, match=r"lacks columns \['rewards', 'dones'\]"):
        dt.load_hf_trajectories(tmp_path / "bad")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(dt.UserError, match="pip install -r requirements-dev.txt"):
        dt.load_hf_trajectories(tmp_path / "bad")


def test_hub_without_network_is_one_error_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), "--env_name", "hopper-medium-replay-v2",
                             "--dataset_source", "hf", "--device", "cpu"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot load hopper-medium-replay-v2") and "dataset_path" in lines[0]


def perturbed_model(config: dt.TrainConfig, state_dim: int = 5, action_dim: int = 3) -> dt.DecisionTransformer:
    """A model whose LayerNorms and biases are not at their init values, so a mis-mapped one shows."""
    torch.manual_seed(0)
    model = dt.build_model(config, state_dim, action_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def window(batch: int, steps: int, state_dim: int = 5, action_dim: int = 3, episode_len: int = 50, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, steps, state_dim, generator=g), torch.rand(batch, steps, action_dim, generator=g) * 2 - 1,
            torch.randn(batch, steps, generator=g),
            torch.randint(0, episode_len, (batch, 1), generator=g) + torch.arange(steps))


SMALL = dict(embedding_dim=32, num_layers=2, num_heads=2, seq_len=6, episode_len=50)


@pytest.mark.parametrize("activation, init", [("gelu", "corl"), ("relu", "kzl")])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_exported_model_predicts_our_actions_with_and_without_padding(tmp_path, activation, init, attention):
    config = dt.TrainConfig(**SMALL, activation=activation, init=init)
    model = perturbed_model(config)
    export_hf.to_transformers(model, config).save_pretrained(tmp_path)
    theirs = transformers.DecisionTransformerModel.from_pretrained(tmp_path, attn_implementation=attention).eval()
    assert theirs.config.activation_function == activation and theirs.config.max_ep_len == 50 + 6
    states, actions, returns, timesteps = window(batch=4, steps=6)

    def hf_actions(mask):
        return theirs(states=states, actions=actions, returns_to_go=returns[..., None], timesteps=timesteps,
                      attention_mask=mask.long()).action_preds

    with torch.no_grad():
        full = torch.ones(4, 6, dtype=torch.bool)
        torch.testing.assert_close(hf_actions(full), model(states, actions, returns, timesteps), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_actions(full)[:, -1], model(states, actions, returns, timesteps, last_only=True),
                                   rtol=0, atol=1e-5)  # the evaluation path
        right = full.clone()  # our training convention: real steps first, padding after
        right[1, 4:], right[2, 1:] = False, False
        ours = model(states, actions, returns, timesteps, padding_mask=right)
        torch.testing.assert_close(hf_actions(right)[right], ours[right], rtol=0, atol=1e-5)
        left = right.flip(1)  # the Hugging Face blog's convention: padding first
        hf_left = hf_actions(left)
        for row in range(4):  # each row's real steps alone, unpadded, as our evaluation feeds them
            real = left[row]
            alone = model(states[row:row + 1, real], actions[row:row + 1, real], returns[row:row + 1, real],
                          timesteps[row:row + 1, real])
            torch.testing.assert_close(hf_left[row, real], alone[0], rtol=0, atol=1e-5)


def test_export_command_writes_a_folder_transformers_loads(tmp_path, capsys):
    config = dt.TrainConfig(**SMALL, env_name="hopper-medium-v2", reward_scale=0.01, target_returns=(3600.0, 1800.0))
    model = perturbed_model(config, state_dim=11, action_dim=3)
    state_mean, state_std = np.linspace(-1, 1, 11).astype(np.float32) / 3, np.linspace(0.5, 2, 11).astype(np.float32) / 3
    torch.save({"model_state": model.state_dict(), "state_mean": state_mean, "state_std": state_std,
                "config": dataclasses.asdict(config), "step": 7, "state_dim": 11, "action_dim": 3},
               tmp_path / "checkpoint.pt")
    out = tmp_path / "exported"
    export_hf.main([str(tmp_path / "checkpoint.pt"), str(out)])
    assert "max action difference to the checkpoint's model" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "exported"]  # no temporary folder left
    theirs = transformers.DecisionTransformerModel.from_pretrained(out).eval()
    assert export_hf.max_action_difference(model, theirs) <= 1e-5
    saved = json.loads((out / "config.json").read_text())
    assert np.array(saved["state_mean"], dtype=np.float32).tobytes() == state_mean.tobytes()  # exact floats
    assert np.array(saved["state_std"], dtype=np.float32).tobytes() == state_std.tobytes()
    assert (saved["reward_scale"], saved["context_length"], saved["target_returns"]) == (0.01, 6, [3600.0, 1800.0])
    assert (saved["env_name"], saved["eval_env"], saved["training_steps"]) == ("hopper-medium-v2", "Hopper-v4", 7)

    capsys.readouterr()  # drop transformers' progress bars
    with pytest.raises(SystemExit) as exit_status:
        export_hf.main([str(tmp_path / "checkpoint.pt"), str(out)])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {out} already exists")


def test_models_transformers_cannot_represent_are_refused():
    config = dt.TrainConfig(**SMALL, max_action=2.0)
    with pytest.raises(dt.UserError, match="max_action"):
        export_hf.to_transformers(perturbed_model(config), config)


def test_activation_field_changes_the_mlp_but_not_the_parameters():
    gelu, relu = (perturbed_model(dt.TrainConfig(**SMALL, activation=a)) for a in ("gelu", "relu"))
    assert isinstance(gelu.blocks[0].mlp[1], torch.nn.GELU) and gelu.blocks[0].mlp[1].approximate == "none"
    assert isinstance(relu.blocks[0].mlp[1], torch.nn.ReLU)
    relu.load_state_dict(gelu.state_dict())  # same names and shapes: checkpoints stay interchangeable
    inputs = window(batch=2, steps=6)
    assert not torch.allclose(gelu(*inputs), relu(*inputs), atol=1e-4)
