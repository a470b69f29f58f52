"""Config: CORL field names and defaults, YAML files, CLI overrides, device and validation."""
import dataclasses
import re
import subprocess
import sys

import pyrallis
import pytest
import torch

import dt
from conftest import ROOT

# every field of the public baseline's CLI, with its default (device is 'auto' here, by design)
CORL_DEFAULTS = dict(
    project="CORL", group="DT-D4RL", name="DT", embedding_dim=128, num_layers=3, num_heads=1, seq_len=20,
    episode_len=1000, attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1, max_action=1.0,
    env_name="halfcheetah-medium-v2", learning_rate=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, clip_grad=0.25,
    batch_size=64, update_steps=100_000, warmup_steps=10_000, reward_scale=0.001, num_workers=4,
    target_returns=(12000.0, 6000.0), eval_episodes=100, eval_every=10_000, checkpoints_path=None,
    deterministic_torch=False, train_seed=10, eval_seed=42, device="auto",
)

CORL_YAML = """attention_dropout: 0.1
batch_size: 4096
betas:
- 0.9
- 0.999
checkpoints_path: null
clip_grad: 0.25
deterministic_torch: false
device: cuda
embedding_dim: 128
embedding_dropout: 0.1
env_name: hopper-medium-v2
episode_len: 1000
eval_episodes: 100
eval_every: 5000
eval_seed: 42
group: dt-hopper-medium-v2-multiseed-v2
learning_rate: 0.0008
max_action: 1.0
name: DT
num_heads: 1
num_layers: 3
num_workers: 4
project: CORL
residual_dropout: 0.1
reward_scale: 0.001
seq_len: 20
target_returns:
- 3600.0
- 1800.0
train_seed: 10
update_steps: 100000
warmup_steps: 10000
"""


def parse(*args):
    return pyrallis.parse(config_class=dt.TrainConfig, args=list(args))


def test_corl_fields_names_and_defaults():
    config = dt.TrainConfig()
    for name, default in CORL_DEFAULTS.items():
        assert getattr(config, name) == default, name
    types = {f.name: f.type for f in dataclasses.fields(dt.TrainConfig)}
    assert types["betas"] == dt.Tuple[float, float] and types["clip_grad"] == dt.Optional[float]


def test_corl_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "corl.yaml"
    path.write_text(CORL_YAML)
    config = parse("--config_path", str(path))
    assert config.batch_size == 4096 and config.target_returns == (3600.0, 1800.0) and config.betas == (0.9, 0.999)
    assert config.device == "cuda" and config.group == "dt-hopper-medium-v2-multiseed-v2"
    dt.validate_config(config)


D4RL_LOCOMOTION_CONFIGS = sorted(p for env in ("halfcheetah", "hopper", "walker2d") for p in (ROOT / "configs/dt" / env).glob("*.yaml"))


@pytest.mark.parametrize("path", D4RL_LOCOMOTION_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_d4rl_locomotion_config_loads_and_resolves(path, tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    config = parse("--config_path", str(path))
    dt.validate_config(config)
    source = dt.resolve_dataset(config)
    env = dt.make_env(source.eval_env)
    env.close()
    assert source.ref_min_score is not None
    expected = {"halfcheetah": (12000.0, 6000.0), "hopper": (3600.0, 1800.0), "walker2d": (5000.0, 2500.0)}
    env_family = config.env_name.split("-")[0]
    assert config.target_returns == expected[env_family] and config.batch_size == 4096
    assert config.learning_rate == 8e-4 and config.eval_every == 5000 and config.reward_scale == 0.001
    assert path.name.replace("_v2.yaml", "") == config.env_name[len(env_family) + 1:-3].replace("-", "_")


def test_cli_overrides_yaml():
    path = ROOT / "configs/dt/hopper/medium_v2.yaml"
    config = parse("--config_path", str(path), "--batch_size", "8", "--target_returns", "[100,50,25]",
                   "--clip_grad", "null", "--betas", "[0.8,0.9]", "--device", "cpu")
    assert config.batch_size == 8 and config.target_returns == (100.0, 50.0, 25.0)
    assert config.clip_grad is None and config.betas == (0.8, 0.9) and config.device == "cpu"
    assert config.learning_rate == 8e-4  # the rest still comes from the file


def test_help_lists_every_field_with_default():
    out = subprocess.run([sys.executable, str(ROOT / "algorithms/dt.py"), "--help"], capture_output=True, text=True, check=True).stdout
    entries = {m.group(1): " ".join(m.group(2).split())  # argparse wraps lines
               for m in re.finditer(r"^  --(\w+) (.*?)(?=^  --|\Z)", out, re.M | re.S)}
    for field in dataclasses.fields(dt.TrainConfig):
        help_text = entries[field.name]
        assert re.search(r"\w \w+ \w+.*\(default: .+\)$", help_text), f"{field.name} lacks help or default: {help_text}"
        assert "option_strings" not in help_text, f"a '%' in {field.name}'s comment broke argparse's help: {help_text}"
    assert entries["seq_len"].endswith("(context length K) (default: 20)")
    assert entries["device"].endswith("(default: auto)")


def test_device_resolution():
    assert dt.resolve_device("cpu") == torch.device("cpu")
    assert dt.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(dt.UserError, match="unknown device"):
        dt.resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(dt.UserError, match="CUDA is not available"):
            dt.resolve_device("cuda")


@pytest.mark.parametrize("field, value", [
    ("seq_len", 0), ("batch_size", -1), ("update_steps", 0), ("eval_episodes", 0), ("num_heads", 3),
    ("attention_dropout", 1.0), ("max_action", 0.0), ("target_returns", ()), ("warmup_steps", -5),
    ("target_returns", (10.0, 10.0)), ("dataset_source", "minari"), ("activation", "gelu_new"),
])
def test_invalid_values_are_user_errors(field, value):
    config = dataclasses.replace(dt.TrainConfig(), **{field: value})
    with pytest.raises(dt.UserError, match=field if field != "max_action" else "max_action"):
        dt.validate_config(config)
