"""Export a checkpoint of algorithms/dt.py as a Hugging Face transformers DecisionTransformerModel folder.

    python tools/export_hf.py runs/<run>/best.pt exported/dt-hopper-medium

The folder holds config.json and model.safetensors; `DecisionTransformerModel.from_pretrained(folder)` loads it
and predicts the same actions as this project's model (the tool checks it before writing, to 1e-5). Both are
the same network written twice, so every weight maps one to one:
  timestep_emb, return_emb, state_emb, action_emb, emb_norm -> embed_timestep, ..., embed_ln
  blocks.i (norm1, attention.qkv, attention.proj, norm2, mlp.0, mlp.2) -> encoder.h.i (ln_1, attn.c_attn,
      attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj); GPT-2's Conv1D stores weights as [in, out]: transposed
  out_norm, action_head.0 -> encoder.ln_f, predict_action.0
  encoder.wpe (GPT-2 position embeddings; transformers adds row 0 to every token) -> zeros, as this model has none
  encoder.wte, predict_state, predict_return (unused by action prediction; this model has none) -> zeros
The timestep table keeps its episode_len + seq_len rows (max_ep_len), the MLP activation maps to GPT-2's
activation_function ("gelu" is the exact erf GELU, like nn.GELU; "gelu_new" would be the tanh approximation).
config.json also carries what a user needs to run the model: state_mean and state_std (inputs are
(observation - state_mean) / state_std), reward_scale (returns_to_go are returns times reward_scale),
context_length (the K steps it was trained on), target_returns, env_name and eval_env.
Needs transformers (requirements-dev.txt).
"""
import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
from dt import (D4RL_ENVS, D4RL_NAMES, DecisionTransformer, TrainConfig, UserError, build_model,  # noqa: E402
                validate_config)
from dt import load_checkpoint as dt_load_checkpoint  # noqa: E402

try:
    from transformers import DecisionTransformerConfig, DecisionTransformerModel
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("error: this tool needs transformers: pip install -r requirements-dev.txt")

TOLERANCE = 1e-5  # largest action difference accepted between the two models


def load_checkpoint(path: Path) -> Tuple[DecisionTransformer, TrainConfig, Dict[str, Any]]:
    """This project's model (eval mode) from a checkpoint written by dt.train(), its config, the checkpoint."""
    checkpoint = dt_load_checkpoint(path)  # a .pt file or a run folder (its latest.pt)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in fields})  # older: defaults
    validate_config(config)
    model = build_model(config, checkpoint["state_dim"], checkpoint["action_dim"])
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its config describes ({err})") from None
    return model.eval(), config, checkpoint


def transformers_config(model: DecisionTransformer, config: TrainConfig, **extra: Any) -> DecisionTransformerConfig:
    """transformers' config of the same network; `extra` fields are stored in config.json as they are."""
    if model.max_action != 1.0:  # transformers ends the action head with a tanh and has no scale after it
        raise UserError(f"max_action is {model.max_action}, but transformers' DecisionTransformerModel predicts "
                        "actions in [-1, 1] only; only models trained with max_action 1.0 can be exported")
    return DecisionTransformerConfig(
        state_dim=model.state_dim, act_dim=model.action_dim, hidden_size=config.embedding_dim,
        max_ep_len=model.timestep_emb.num_embeddings,  # episode_len + seq_len rows, as trained
        action_tanh=True, n_layer=config.num_layers, n_head=config.num_heads, n_inner=4 * config.embedding_dim,
        n_positions=3 * model.seq_len,  # all-zero position table: the tokens of K steps
        activation_function=config.activation,  # "gelu" is exact GELU in transformers, as nn.GELU
        resid_pdrop=config.residual_dropout, embd_pdrop=config.embedding_dropout, attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=model.emb_norm.eps,  # 1e-5 in every LayerNorm of both models
        scale_attn_weights=True,  # softmax(q k^T / sqrt(head_dim)), as scaled_dot_product_attention
        vocab_size=1,  # no token ids: the inputs are embeddings
        bos_token_id=None, eos_token_id=None, use_cache=False, **extra,
    )


def transformers_state_dict(model: DecisionTransformer, hf_config: DecisionTransformerConfig) -> Dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts (see the module docstring)."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hidden = hf_config.hidden_size
    theirs = {
        "encoder.wte.weight": torch.zeros(1, hidden),
        "encoder.wpe.weight": torch.zeros(hf_config.n_positions, hidden),
        "predict_state.weight": torch.zeros(model.state_dim, hidden),
        "predict_state.bias": torch.zeros(model.state_dim),
        "predict_return.weight": torch.zeros(1, hidden),
        "predict_return.bias": torch.zeros(1),
    }
    renamed = {"timestep_emb": "embed_timestep", "return_emb": "embed_return", "state_emb": "embed_state",
               "action_emb": "embed_action", "emb_norm": "embed_ln", "out_norm": "encoder.ln_f",
               "action_head.0": "predict_action.0"}
    in_block = {"norm1": "ln_1", "attention.qkv": "attn.c_attn", "attention.proj": "attn.c_proj", "norm2": "ln_2",
                "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
    conv1d = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 Conv1D: weight is [in, out]
    for name, tensor in ours.items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("blocks."):
            _, index, inner = module.split(".", 2)
            target = f"encoder.h.{index}.{in_block[inner]}"
            tensor = tensor.t().contiguous() if kind == "weight" and in_block[inner] in conv1d else tensor
        else:
            target = renamed[module]
        theirs[f"{target}.{kind}"] = tensor
    return theirs


def to_transformers(model: DecisionTransformer, config: TrainConfig, **extra: Any) -> DecisionTransformerModel:
    hf_config = transformers_config(model, config, **extra)
    hf_model = DecisionTransformerModel(hf_config)
    hf_model.load_state_dict(transformers_state_dict(model, hf_config), strict=True)  # every weight, no leftovers
    return hf_model.eval()


@torch.no_grad()
def max_action_difference(model: DecisionTransformer, hf_model: DecisionTransformerModel, batch: int = 8,
                          seed: int = 0) -> float:
    """Largest |action| difference of the two models on random full-length windows."""
    g = torch.Generator().manual_seed(seed)
    steps = model.seq_len
    states = torch.randn(batch, steps, model.state_dim, generator=g)
    actions = torch.rand(batch, steps, model.action_dim, generator=g) * 2 - 1
    returns = torch.randn(batch, steps, generator=g)
    timesteps = torch.randint(0, model.episode_len, (batch, 1), generator=g) + torch.arange(steps)
    ours = model(states, actions, returns, timesteps)
    theirs = hf_model(states=states, actions=actions, returns_to_go=returns[..., None], timesteps=timesteps,
                      attention_mask=torch.ones(batch, steps, dtype=torch.long)).action_preds
    return (ours - theirs).abs().max().item()


def export(checkpoint_path: Path, out_dir: Path, overwrite: bool = False) -> float:
    """Write out_dir (complete or not at all); returns the checked max action difference."""
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another folder or pass --overwrite")
    model, config, checkpoint = load_checkpoint(checkpoint_path)
    d4rl_env = D4RL_ENVS[config.env_name.split("-", 1)[0]] if config.env_name in D4RL_NAMES else None
    hf_model = to_transformers(
        model, config, state_mean=[float(x) for x in checkpoint["state_mean"]],
        state_std=[float(x) for x in checkpoint["state_std"]], reward_scale=config.reward_scale,
        context_length=config.seq_len, target_returns=list(config.target_returns), env_name=config.env_name,
        eval_env=checkpoint.get("eval_env") or config.eval_env or d4rl_env, training_steps=checkpoint.get("step"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{out_dir.name}.tmp-"))
    try:
        hf_model.save_pretrained(tmp)
        difference = max_action_difference(model, DecisionTransformerModel.from_pretrained(tmp))  # as users load it
        if not difference <= TOLERANCE:
            raise RuntimeError(f"exported model differs from the checkpoint's by {difference:.2e} (> {TOLERANCE})")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return difference


def main(args=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="latest.pt/best.pt written by algorithms/dt.py, or a run folder (its latest.pt)")
    parser.add_argument("out_dir", type=Path, help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(args)
    try:
        difference = export(args.checkpoint, args.out_dir, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out_dir} (DecisionTransformerModel.from_pretrained loads it); "
          f"max action difference to the checkpoint's model: {difference:.2e}")


if __name__ == "__main__":
    main()
