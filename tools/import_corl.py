"""Turn a checkpoint saved by CORL's dt.py (tinkoff-ai/CORL, algorithms/offline/dt.py) into one that
`algorithms/dt.py --eval_checkpoint` evaluates: the same weights through both evaluation stacks (CORL's d4rl and
mujoco-py env, this project's gymnasium one), to tell the model's score from the stack's.

    python tools/import_corl.py <CORL run folder> corl-hopper-medium.pt
    python tools/import_corl.py path/dt_checkpoint.pt corl-hopper-medium.pt --config path/config.yaml
    python algorithms/dt.py --eval_checkpoint corl-hopper-medium.pt [--eval_reset per_episode ...]

A CORL run folder is `<checkpoints_path>/<name>-<env>-<8 hex>/`, where CORL writes config.yaml (pyrallis) at the
start and dt_checkpoint.pt ({"model_state", "state_mean" [1, S], "state_std" [1, S]}) after the last update.
CORL's network is this project's with nn.MultiheadAttention, so every weight keeps its name except
  blocks.i.attention.in_proj_weight, in_proj_bias -> blocks.i.attention.qkv.weight, qkv.bias (the same [3E, E])
  blocks.i.attention.out_proj.weight, out_proj.bias -> blocks.i.attention.proj.weight, proj.bias
and CORL's blocks.i.causal_mask buffers are dropped (this model builds its mask when it runs). The weights are
loaded strictly into this project's model before anything is written. The checkpoint's config is CORL's
config.yaml with CORL HEAD's recipe switches (init corl, loss over all entries, trailing piece dropped, the eval
env seeded once per target: eval_reset per_target), device auto, and step = update_steps.
"""
import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyrallis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
import dt  # noqa: E402

# CORL HEAD's behaviour in this project's switches (docs/algorithm.md, "Two recipes")
CORL_RECIPE = {"init": "corl", "loss_reduction": "all_entries", "padding_mask": "real_steps",
               "keep_trailing_piece": False, "eval_reset": "per_target", "device": "auto"}


def corl_paths(source: Path, config: Optional[Path]) -> Dict[str, Path]:
    """dt_checkpoint.pt and config.yaml of a CORL run folder, or a checkpoint file and its (neighbouring) config."""
    checkpoint = source / "dt_checkpoint.pt" if source.is_dir() else source
    config = config or checkpoint.parent / "config.yaml"
    for what, path in (("checkpoint", checkpoint), ("config", config)):
        if not path.is_file():
            hint = "give CORL's run folder or its dt_checkpoint.pt" if what == "checkpoint" else "give --config"
            raise dt.UserError(f"CORL {what} {path} does not exist; {hint}")
    return {"checkpoint": checkpoint, "config": config}


def corl_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CORL's state_dict in this project's names: nn.MultiheadAttention's projections renamed, masks dropped."""
    renamed = {".attention.in_proj_weight": ".attention.qkv.weight", ".attention.in_proj_bias": ".attention.qkv.bias",
               ".attention.out_proj.weight": ".attention.proj.weight", ".attention.out_proj.bias": ".attention.proj.bias"}
    ours = {}
    for key, value in state.items():
        if key.endswith(".causal_mask"):
            continue
        for old, new in renamed.items():
            key = key.replace(old, new)
        ours[key] = value
    return ours


def import_corl(source: Path, out: Path, config_path: Optional[Path] = None) -> Dict[str, Any]:
    """Convert, check by loading strictly, write `out` (durably, as dt.py writes checkpoints); returns it."""
    paths = corl_paths(source, config_path)
    try:
        with open(paths["config"]) as f:
            config = pyrallis.load(dt.TrainConfig, f)  # CORL's fields are this project's: its YAML loads as it is
        saved = torch.load(paths["checkpoint"], map_location="cpu", weights_only=False)  # numpy statistics inside
    except Exception as err:
        raise dt.UserError(f"cannot read the CORL run ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(saved, dict) or "model_state" not in saved:
        raise dt.UserError(f"{paths['checkpoint']} is not CORL's dt_checkpoint.pt (no model_state)")
    config = dataclasses.replace(config, **CORL_RECIPE, checkpoints_path=None, run_dir=None)
    dt.validate_config(config)
    state = corl_state_dict(saved["model_state"])
    state_dim, action_dim = state["state_emb.weight"].shape[1], state["action_emb.weight"].shape[1]
    try:
        dt.build_model(config, state_dim, action_dim).load_state_dict(state)  # strict: every weight, every shape
    except RuntimeError as err:
        raise dt.UserError(f"the CORL weights do not fit the model its config.yaml describes ({err})") from None
    source_info = dt.resolve_dataset(config)  # the eval env and reference scores of env_name (no data is read)
    checkpoint = {
        "model_state": state, "config": dataclasses.asdict(config), "step": config.update_steps,
        "state_mean": np.asarray(saved["state_mean"], np.float32).reshape(-1),
        "state_std": np.asarray(saved["state_std"], np.float32).reshape(-1),
        "state_dim": state_dim, "action_dim": action_dim, "eval_env": source_info.eval_env,
        "ref_min_score": source_info.ref_min_score, "ref_max_score": source_info.ref_max_score,
        "imported_from": str(paths["checkpoint"]),
    }
    if checkpoint["state_mean"].shape != (state_dim,):
        raise dt.UserError(f"state_mean has {checkpoint['state_mean'].size} values for {state_dim} state features")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        dt.atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    except OSError as err:
        raise dt.UserError(f"cannot write {out} ({err.strerror or err}); choose another output path") from None
    return checkpoint


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="CORL's run folder (checkpoints_path/<name>) or its dt_checkpoint.pt")
    parser.add_argument("out", type=Path, help="the .pt file to write, for --eval_checkpoint")
    parser.add_argument("--config", type=Path, help="CORL's config.yaml (default: the one beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        checkpoint = import_corl(args.source, args.out, args.config)
    except dt.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {checkpoint['config']['env_name']}, state/action sizes {checkpoint['state_dim']}/"
          f"{checkpoint['action_dim']}, eval env {checkpoint['eval_env']}; evaluate it with\n"
          f"  python algorithms/dt.py --eval_checkpoint {args.out}")


if __name__ == "__main__":
    main()
