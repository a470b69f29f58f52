"""Decision Transformer (Chen et al., 2021) for offline RL on D4RL-format and Minari data, in one file, read top to
bottom: config -> data -> model -> evaluation -> logging -> training -> main. It follows CORL's baseline detail by
detail (README.md, "Algorithm"), except two defaults (fields): keep_trailing_piece true, loss_reduction real_steps.

    python algorithms/dt.py --config_path configs/dt/hopper/medium_v2.yaml [--field value ...]
"""
import contextlib
import copy
import ctypes
import difflib
import errno
import functools
import importlib.util
import inspect
import io
import json
import multiprocessing as mp
import netrc
import os
import math
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import gymnasium as gym
import h5py
import numpy as np
import pyrallis
import yaml
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


# --- Config -----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every field of the CORL baseline (same names and defaults, device 'auto'), then this project's own."""
    project: str = "CORL"  # wandb project name
    group: str = "DT-D4RL"  # wandb group name
    name: str = "DT"  # wandb run name (the run folder adds env name, seed and a unique suffix)
    embedding_dim: int = 128  # transformer hidden dim
    num_layers: int = 3  # depth of the transformer model
    num_heads: int = 1  # number of heads in the attention
    seq_len: int = 20  # maximum sequence length during training (context length K)
    episode_len: int = 1000  # maximum rollout length, needed for the positional embeddings
    attention_dropout: float = 0.1  # attention dropout
    residual_dropout: float = 0.1  # residual dropout
    embedding_dropout: float = 0.1  # embeddings dropout
    max_action: float = 1.0  # maximum range for the symmetric actions, [-1, 1]
    env_name: str = "halfcheetah-medium-v2"  # D4RL name (hopper-medium-v2, antmaze-umaze-v2), or a Minari id with a '/'
    learning_rate: float = 1e-4  # AdamW optimizer learning rate
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW optimizer betas
    weight_decay: float = 1e-4  # AdamW weight decay
    clip_grad: Optional[float] = 0.25  # maximum gradient norm during training, optional (null disables clipping)
    batch_size: int = 64  # training batch size
    update_steps: int = 100_000  # total training steps
    warmup_steps: int = 10_000  # warmup steps for the learning rate scheduler
    reward_scale: float = 0.001  # reward scaling, to reduce the magnitude
    num_workers: int = 4  # CORL's; unused: batches are sampled on the device without a DataLoader
    target_returns: Tuple[float, ...] = (12000.0, 6000.0)  # return-to-go prompts of evaluation, e.g. [3600,1800]
    eval_episodes: int = 100  # number of episodes to run during evaluation (per target return)
    eval_every: int = 10_000  # evaluate every eval_every training steps and after the last one
    checkpoints_path: Optional[str] = None  # folder for latest.pt, best.pt: a subfolder per run (unset: the run folder)
    deterministic_torch: bool = False  # PyTorch's deterministic algorithms instead of nondeterministic ones
    train_seed: int = 10  # training random seed
    eval_seed: int = 42  # evaluation random seed (episode i starts from reset seed eval_seed + i)
    device: str = "auto"  # training device: auto (cuda when available), cpu, cuda, cuda:N
    dataset_source: str = "d4rl"  # env_name's data from: d4rl (files on D4RL's server) or hf (the Hugging Face Hub copy)
    dataset_path: Optional[str] = None  # train on this D4RL-layout HDF5 file instead (hf: a save_to_disk folder)
    dataset_dir: Optional[str] = None  # folder of D4RL files; when unset: $D4RL_DATASET_DIR, else ~/.d4rl/datasets
    eval_env: Optional[str] = None  # gymnasium eval env id; unset: env_name's (Minari: the dataset's), the file's env_id
    ref_min_score: Optional[float] = None  # random policy's return for the normalized score (unset: D4RL's or HDF5's)
    ref_max_score: Optional[float] = None  # expert policy's return for the normalized score (unset: D4RL's or HDF5's)
    runs_dir: str = "runs"  # folder that receives one subfolder per run (config.yaml, metrics.jsonl, wandb files)
    compile: bool = False  # torch.compile the model for training (evaluation stays eager: its shapes change every step)
    bf16: bool = False  # bf16 autocast for training on CUDA (ignored on CPU)
    fused_adamw: bool = True  # fused AdamW kernel on CUDA (ignored on CPU)
    micro_batch: int = 0  # windows per forward/backward chunk, gradients summed; 0: whole batch on GPU, 64 on CPU
    eval_workers: int = -1  # env processes (CPU: own rollouts; GPU: env steps); 0: in-process; -1: one per 16 envs, <= cores
    log_every: int = 100  # log train_loss (mean over the interval) and learning_rate every log_every steps
    run_dir: Optional[str] = None  # this run's folder (default: new in runs_dir); one holding a run resumes from it
    eval_checkpoint: Optional[str] = None  # evaluate this .pt file or run folder with the eval_* fields given, then exit
    activation: str = "gelu"  # MLP activation: gelu (exact erf, as CORL) or relu (as the DT authors' code)
    init: str = "corl"  # corl: N(0, 0.02), q/k/v xavier as in CORL; normal: N(0, 0.02) everywhere; kzl: DT authors'
    attention_init: Optional[str] = None  # init's old name: xavier (now init corl) or normal; still read, with a warning
    lr_schedule: str = "constant"  # after warm-up: constant (CORL) or cosine to 1/10 (DT authors' Atari code)
    eval_video: int = 0  # episodes of every target recorded to the run's videos/ at each evaluation (0: none)
    val_fraction: float = 0.0  # fraction of trajectories held out (drawn with train_seed) to log val_loss (0: none)
    loss_reduction: str = "real_steps"  # masked MSE divided by the real entries, or by all_entries of the batch (CORL)
    padding_mask: str = "real_steps"  # padded steps out of the loss and keys; all_ones: CORL e4f6175's (mask made after padding)
    keep_trailing_piece: bool = True  # a last piece with no terminal/timeout flag: a trajectory, or dropped (CORL, authors)
    eval_reset: str = "per_episode"  # seed eval_seed + i; per_target: CORL's (seeded per target); unseeded: DT authors'
    tf32: bool = True  # float32 matmuls on TF32 tensor cores (CUDA): PyTorch 1.7-1.11 did, as both tables ran (docs/gpu.md)


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data); main() prints it as one line."""


def validate_config(config: TrainConfig) -> None:
    c = config
    for what, holds, names in (  # first: the checks below divide by num_heads
            ("a positive integer", lambda v: v > 0, "embedding_dim num_layers num_heads seq_len episode_len "
             "batch_size update_steps eval_episodes eval_every log_every"),
            ("in [0, 1)", lambda v: 0 <= v < 1, "attention_dropout residual_dropout embedding_dropout val_fraction"),
            (">= 0", lambda v: v >= 0, "micro_batch warmup_steps train_seed eval_seed weight_decay")):
        for name in names.split():
            if not holds(getattr(c, name)):
                raise UserError(f"{name} must be {what}, got {getattr(c, name)}")
    checks = [  # (holds, what to say when it does not)
        (c.embedding_dim % c.num_heads == 0, f"embedding_dim ({c.embedding_dim}) must be divisible by num_heads ({c.num_heads})"),
        (min(c.max_action, c.reward_scale, c.learning_rate) > 0, "max_action, reward_scale and learning_rate must be positive"),
        (len(c.target_returns) > 0, "target_returns is empty; give at least one, e.g. --target_returns '[3600,1800]'"),
        (len(set(c.target_returns)) == len(c.target_returns),
         f"target_returns has repeated values {c.target_returns}; give each target once"),
        (c.eval_workers >= -1, "eval_workers must be -1 (auto), 0 (in-process) or a number of processes, "
                               f"got {c.eval_workers}"),
        (len(c.betas) == 2 and all(0.0 <= b < 1.0 for b in c.betas), f"betas must be two values in [0, 1), got {c.betas}"),
        (0 <= c.eval_video <= c.eval_episodes, f"eval_video must be in [0, eval_episodes={c.eval_episodes}], got {c.eval_video}"),
    ]
    choices = {"dataset_source": ("d4rl", "hf"), "activation": tuple(ACTIVATIONS), "lr_schedule": ("constant", "cosine"),
               "init": ("corl", "kzl", "normal"), "attention_init": (None, "xavier", "normal"),
               "loss_reduction": ("real_steps", "all_entries"), "padding_mask": ("real_steps", "all_ones"),
               "eval_reset": ("per_episode", "per_target", "unseeded")}
    checks += [(getattr(c, name) in allowed, f"{name} must be {' or '.join(map(str, allowed))}, got '{getattr(c, name)}'")
               for name, allowed in choices.items()]
    for holds, message in checks:
        if not holds:
            raise UserError(message)
    if c.attention_init is not None:  # a YAML of the field's old name still loads
        c.init, old, c.attention_init = {"xavier": "corl", "normal": "normal"}[c.attention_init], c.attention_init, None
        print(f"warning: attention_init was renamed init: attention_init {old} is read as init {c.init}", file=sys.stderr)
    if c.warmup_steps > c.update_steps:
        print(f"warning: warmup_steps ({c.warmup_steps}) > update_steps ({c.update_steps}): "
              "the learning rate never reaches learning_rate", file=sys.stderr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was requested but CUDA is not available here; use --device auto or --device cpu")
    return device


def keep_freed_memory() -> None:
    """glibc keeps freed blocks: CPU forward passes stop page-faulting (1.9x faster, benchmarks/page_faults.py)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(-3, 1 << 30):  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the heap
            libc.mallopt(-3, 32 << 20)  # older glibc caps it at 32 MB
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never hand the heap's free top back (peak memory stays)


def set_seed(seed: int, deterministic_torch: bool = False) -> None:
    if deterministic_torch:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic_torch)


# --- Data: D4RL names and files ---------------------------------------------------------------
D4RL_URL = "https://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{file}"
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")  # the arrays of a D4RL HDF5 file
D4RL_KINDS = ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert")
# gymnasium -v4 envs are the maintained equivalents of the gym -v3 envs the -v2 data was collected on
D4RL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
# (random return, expert return) used by D4RL's normalized score
D4RL_REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                   "walker2d": (1.629008, 4592.3)}
D4RL_NAMES = [f"{env}-{kind}-v2" for env in D4RL_ENVS for kind in D4RL_KINDS]

# The other D4RL families are read from their maintained Minari ports and evaluated in gymnasium-robotics envs:
# (D4RL name, Minari id, env id, D4RL (ref_min, ref_max) where the port keeps D4RL's task else None, eval env kwargs)
_ANTMAZES = {"umaze": "UMaze", "umaze-diverse": "UMaze", "medium-play": "Medium", "medium-diverse": "Medium_Diverse_GR",
             "large-play": "Large", "large-diverse": "Large_Diverse_GR"}
# D4RL's adroit reference returns (d4rl/infos.py); the ports hold D4RL's own demonstrations
ADROIT_REF_SCORES = {"pen": (96.262799, 3076.8331017826877), "door": (-56.512833, 2880.5693087298737),
                     "hammer": (-274.856578, 12794.134825156867), "relocate": (-6.425911, 4233.877797728884)}
_PORTS = [
    # D4RL's antmaze eval ends the episode at the goal (return = success, 0 or 1); the port's eval env is a
    # continuing task, so it is made episodic again and D4RL's 0/1 references apply
    *[(f"antmaze-{m}-v2", f"D4RL/antmaze/{m}-v1", f"AntMaze_{e}-v4", (0.0, 1.0), {"continuing_task": False})
      for m, e in _ANTMAZES.items()],
    # maze2d: data regenerated in a new simulator, so D4RL's measured references do not carry over (None)
    *[(f"maze2d-{m}-v1", f"D4RL/pointmaze/{m}-v2", f"PointMaze_{e}-v3", None, {})
      for m, e in (("umaze", "UMaze"), ("medium", "Medium"), ("large", "Large"))],
    *[(f"{task}-{kind}-v1", f"D4RL/{task}/{kind}-v2", f"AdroitHand{task.capitalize()}-v1", refs, {})
      for task, refs in ADROIT_REF_SCORES.items() for kind in ("human", "cloned", "expert")],
]
D4RL_TO_MINARI = {d4rl: minari_id for d4rl, minari_id, *_ in _PORTS}
MINARI_PORTS: Dict[str, Tuple[str, Optional[Tuple[float, float]], Dict[str, Any]]] = {
    minari_id: tuple(rest) for _, minari_id, *rest in _PORTS}
# Minari's own locomotion data (mujoco/<env>/<kind>-v0): new policies on gymnasium -v5 envs, own references
MINARI_MUJOCO_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
MINARI_MUJOCO_NAMES = [f"mujoco/{env}/{kind}-v0" for env in MINARI_MUJOCO_ENVS for kind in ("simple", "medium", "expert")]
# dict observations are flattened in this key order (then any other keys, sorted), in training and evaluation
OBS_KEY_ORDER = ("observation", "achieved_goal", "desired_goal")


@dataclass
class DatasetSource:
    path: Optional[Path]  # local HDF5 file or save_to_disk folder; None: env_name from the Hugging Face Hub
    url: Optional[str]  # where to download it from when missing (None: the user's own file)
    eval_env: Optional[str]  # gymnasium env id
    ref_min_score: Optional[float]
    ref_max_score: Optional[float]
    minari_id: Optional[str] = None  # a Minari dataset, loaded (and downloaded) by load_minari
    env_spec: Any = None  # the EnvSpec evaluation makes, when it is not just eval_env (Minari eval envs)


def d4rl_file_name(env_name: str) -> str:
    """hopper-medium-replay-v2 -> hopper_medium_replay-v2.hdf5 (D4RL's own file naming)."""
    env, rest = env_name.split("-", 1)
    kind, version = rest.rsplit("-", 1)
    return f"{env}_{kind.replace('-', '_')}-{version}.hdf5"


def resolve_dataset(config: TrainConfig) -> DatasetSource:
    """Where the data lives, which env evaluates it, and which reference scores normalize it."""
    env = config.env_name.split("-", 1)[0]
    is_d4rl = config.env_name in D4RL_NAMES
    hub = config.dataset_source == "hf"
    if config.dataset_path is None and ("/" in config.env_name or config.env_name in D4RL_TO_MINARI):
        dataset_id = D4RL_TO_MINARI.get(config.env_name, config.env_name)
        family = dataset_id.split("/")[1] if dataset_id.startswith("mujoco/") else None
        env_id, refs, _ = MINARI_PORTS.get(dataset_id, (MINARI_MUJOCO_ENVS.get(family), None, {}))
        refs = refs or (None, None)  # None: the dataset's own, read when load_minari opens it
        ref_min, ref_max = _first(config.ref_min_score, refs[0]), _first(config.ref_max_score, refs[1])
        root = Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")  # as Minari finds it
        return DatasetSource(root / dataset_id, None, config.eval_env or env_id, *_checked_refs(ref_min, ref_max),
                             minari_id=dataset_id)
    path, url, attrs = None, None, {}  # None: loaded by name from the Hub
    if config.dataset_path is not None:
        path = Path(config.dataset_path).expanduser()
        if hub != path.is_dir() or not path.exists():  # hf: a save_to_disk folder, else an HDF5 file
            problem = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a folder"
            wanted = "a folder written by datasets' save_to_disk" if hub else "a D4RL-layout HDF5 file"
            raise UserError(f"dataset_path '{path}' {problem}; point it to {wanted}")
        if not hub:
            try:
                with h5py.File(path, "r") as f:  # the dataset tool stores env id and reference scores as attributes
                    attrs = {k: v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
                             for k, v in f.attrs.items()}  # as Python str and float
            except OSError as err:
                raise UserError(f"cannot read {path} as HDF5 ({err}); fix dataset_path") from None
    elif is_d4rl and not hub:
        name = d4rl_file_name(config.env_name)
        folder = config.dataset_dir or os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets"
        path, url = Path(folder).expanduser() / name, D4RL_URL.format(file=name)
    elif not is_d4rl:
        close = difflib.get_close_matches(config.env_name, D4RL_NAMES + list(D4RL_TO_MINARI), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(D4RL_NAMES + list(D4RL_TO_MINARI))}."
        raise UserError(f"unknown D4RL dataset '{config.env_name}'.{hint} "
                        "For your own HDF5 file set dataset_path and eval_env.")
    eval_env = config.eval_env or attrs.get("env_id") or (D4RL_ENVS[env] if is_d4rl else None)
    if eval_env is None:
        raise UserError(f"no evaluation env for '{path}': set eval_env to a gymnasium env id (e.g. Hopper-v4)")
    d4rl_refs = D4RL_REF_SCORES[env] if is_d4rl and eval_env == D4RL_ENVS[env] else (None, None)
    refs = [_first(getattr(config, k), attrs.get(k), d) for k, d in zip(("ref_min_score", "ref_max_score"), d4rl_refs)]
    return DatasetSource(path, url, eval_env, *_checked_refs(*refs))


def _checked_refs(ref_min: Optional[float], ref_max: Optional[float]) -> Tuple[Optional[float], Optional[float]]:
    if (ref_min is None) != (ref_max is None) or (ref_min is not None and ref_max <= ref_min):
        raise UserError(f"reference scores need both ref_min_score < ref_max_score, got {ref_min} and {ref_max}")
    return ref_min, ref_max


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def download(url: str, path: Path, attempts: int = 6, timeout: float = 60.0) -> None:
    """Download to <path>.part, renamed into place once whole and a D4RL file. HTTP 5xx, a body cut off and a stall
    over `timeout` s are retried with backoff, resuming by HTTP Range; an unreachable server fails at once."""
    import requests  # wandb's dependency too
    session, part = requests.Session(), path.with_name(path.name + ".part")
    session.mount(url.split("://")[0] + "://", requests.adapters.HTTPAdapter(max_retries=requests.adapters.Retry(
        total=attempts, connect=0, read=0, backoff_factor=1, status_forcelist=(429, 500, 502, 503, 504))))
    print(f"downloading {url} to {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            have = part.stat().st_size if part.exists() else 0
            try:
                with session.get(url, stream=True, timeout=timeout, headers={"Range": f"bytes={have}-"}) as response:
                    response.raise_for_status()
                    have *= response.status_code == 206  # 200: the server ignored the range, the whole file again
                    size = have + int(response.headers.get("Content-Length", 0))
                    with open(part, "ab" if have else "wb") as f, tqdm(total=size, initial=have, unit="B",
                                                                      unit_scale=True, desc=path.name) as bar:
                        for chunk in response.iter_content(1 << 16):  # a body short of Content-Length raises
                            bar.update(f.write(chunk))
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                if attempt == attempts - 1 or not part.exists():  # the last try, or no body ever began
                    raise
                print(f"download cut off ({type(err).__name__}); resuming in {2 ** attempt} s", file=sys.stderr)
                time.sleep(2 ** attempt)
        with h5py.File(part, "r") as f:  # it counts as downloaded only when it opens with D4RL's keys
            if missing := [k for k in D4RL_KEYS if k not in f]:
                raise OSError(f"the downloaded file lacks the D4RL keys {missing}")
        os.replace(part, path)
    except OSError as err:  # requests' errors are OSErrors, as h5py's
        part.unlink(missing_ok=True)
        why = getattr(err.args[0], "reason", err) if err.args else err  # urllib3's cause, without its wrappers
        raise UserError(f"dataset {path} is missing and downloading it from {url} failed ({str(why)[:300]}); "
                        f"download it by hand to {path}, or set dataset_path") from None


def load_d4rl_hdf5(path: Path) -> Dict[str, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in D4RL_KEYS if k not in f]:
                raise UserError(f"{path} is missing HDF5 keys {missing}; a D4RL-layout file has {list(D4RL_KEYS)}")
            return checked_transitions({k: f[k][()] for k in D4RL_KEYS}, path)
    except OSError as err:
        raise UserError(f"cannot read {path} as HDF5 ({err}); delete it to download again, or fix dataset_path") from None


def checked_transitions(data: Dict[str, np.ndarray], path: Any) -> Dict[str, np.ndarray]:
    """The five arrays after length and value checks, in the dtypes and shapes prepare_data expects."""
    n = len(data["rewards"])
    if n == 0:
        raise UserError(f"{path} holds no transitions")
    if bad := [f"{k} has {len(v)}" for k, v in data.items() if len(v) != n]:
        raise UserError(f"{path}: arrays differ in length (rewards has {n}, {', '.join(bad)})")
    if data["observations"].size == 0 or data["actions"].size == 0:
        raise UserError(f"{path}: observations or actions have no features (shapes "
                        f"{data['observations'].shape}, {data['actions'].shape}); expected [N, dim] arrays")
    for k, v in data.items():
        if np.asarray(v).dtype.kind not in "biuf":  # bool, integer or float; byte strings, objects are no data
            raise UserError(f"{path}: '{k}' has dtype {np.asarray(v).dtype}, not numbers; store it as float32 "
                            "(flags as bool)")
        if k in ("observations", "actions", "rewards") and not np.isfinite(v).all():
            raise UserError(f"{path}: '{k}' contains NaN or inf values")
    return {**{k: data[k].astype(np.float32).reshape(n, -1) for k in ("observations", "actions")},  # [N, dim]
            "rewards": data["rewards"].astype(np.float32).reshape(n),
            **{k: data[k].astype(bool).reshape(n) for k in ("terminals", "timeouts")}}


HF_D4RL_REPO = "edbeeching/decision_transformer_gym_replay"  # D4RL -v2 on the Hugging Face Hub, one row per trajectory


def load_hf_trajectories(source: Any) -> Dict[str, np.ndarray]:
    """D4RL's flat arrays from a config of HF_D4RL_REPO (hopper-medium-v2) or a save_to_disk folder (a Path)."""
    try:
        import datasets
        import huggingface_hub
        import pyarrow.compute as pc
    except ImportError:
        raise UserError("dataset_source hf needs the datasets package: pip install -r requirements-dev.txt") from None
    try:
        if isinstance(source, Path):
            loaded = datasets.load_from_disk(str(source))
        else:
            huggingface_hub.utils.logging.set_verbosity_error()  # no retry warnings: the error below says it all
            # the repo is a loading script, which datasets >= 4 does not run: read the Hub's parquet export of it
            loaded = datasets.load_dataset(HF_D4RL_REPO, data_files={"train": f"{source}/train/*.parquet"},
                                           revision="refs/convert/parquet", split="train")
    except (OSError, ValueError, RuntimeError) as err:  # ConnectionError and FileNotFoundError are OSErrors
        raise UserError(f"cannot load {source} with datasets ({err}); without network set dataset_path to a copy "
                        "saved with save_to_disk, or set HF_HUB_OFFLINE=1 to reuse a cached download") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    keys = ("observations", "actions", "rewards", "dones")
    if (missing := [k for k in keys if k not in loaded.column_names]) or loaded.num_rows == 0:
        raise UserError(f"{source} has no rows or lacks columns {missing}; it needs one row per trajectory with "
                        f"{list(keys)}")
    table, flat, lengths = loaded.with_format("arrow")[:], {}, {}
    for key in keys:
        rows = table.column(key).combine_chunks()
        rows = getattr(rows, "storage", rows)  # datasets' Array2D: an extension type over lists of lists
        lengths[key] = pc.list_value_length(rows).to_numpy(zero_copy_only=False)
        if (lengths[key] == 0).any():  # a zero-length trajectory has no step to learn from or to flag as its end
            raise UserError(f"{source}: row {int(np.argmax(lengths[key] == 0))} has no {key}; drop empty trajectories")
        flat[key] = pc.list_flatten(rows, recursive=True).to_numpy(zero_copy_only=False)
        flat[key] = flat[key].reshape(lengths[key].sum(), -1)  # [steps of all rows, width]
        if not np.array_equal(lengths[key], lengths["observations"]):
            raise UserError(f"{source}: some rows have a different number of {key} than of observations")
    last = np.cumsum(lengths["rewards"]) - 1  # each trajectory's last step in the flat arrays
    terminals, timeouts = np.zeros(len(flat["dones"]), bool), np.zeros(len(flat["dones"]), bool)
    done = flat["dones"][last, 0].astype(bool)
    terminals[last], timeouts[last] = done, ~done  # one flag per row, at its end: rows are the trajectories
    return checked_transitions({**flat, "terminals": terminals, "timeouts": timeouts}, source)


# --- Data: Minari datasets --------------------------------------------------------------------
def obs_keys(keys: Any) -> List[str]:  # OBS_KEY_ORDER's, then the others sorted
    return [k for k in OBS_KEY_ORDER if k in keys] + sorted(k for k in keys if k not in OBS_KEY_ORDER)


def load_minari(source: DatasetSource, recover_env: bool) -> Tuple[DatasetSource, Dict[str, np.ndarray]]:
    """A Minari dataset (downloaded when missing); the source gains its eval env and unset reference scores."""
    try:
        import minari
    except ImportError:
        raise UserError(f"'{source.minari_id}' is a Minari dataset: `pip install minari==0.5.4 "
                        "gymnasium-robotics==1.4.2 huggingface_hub==2.4.0`") from None
    existed = source.path.exists()
    try:
        dataset = minari.load_dataset(source.minari_id, download=True)
    except BaseException as err:  # the hub client raises many types (network, offline mode, unknown id)
        if not existed:
            shutil.rmtree(source.path, ignore_errors=True)  # no half-downloaded dataset left behind
        if not isinstance(err, Exception):
            raise
        known = list(MINARI_PORTS) + MINARI_MUJOCO_NAMES
        close = [] if source.minari_id in known else difflib.get_close_matches(source.minari_id, known, n=3, cutoff=0.5)
        raise UserError(f"Minari dataset '{source.minari_id}' is not readable at {source.path} and downloading it failed "
                        f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]})."
                        f"{' Did you mean ' + ', '.join(close) + '?' if close else ''} Without network, download it "
                        f"elsewhere (`minari download {source.minari_id}`) and copy its folder there") from None
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise UserError(f"{source.minari_id} has {dataset.action_space} actions; this DT needs continuous (Box) actions")
    keys = obs_keys(dataset.observation_space.spaces) if isinstance(dataset.observation_space, gym.spaces.Dict) else None
    episodes = []
    for episode in dataset.iterate_episodes():
        n, obs = len(episode.rewards), episode.observations
        obs = np.concatenate([np.asarray(obs[k]).reshape(len(obs[k]), -1) for k in keys], 1) if keys else np.asarray(obs)
        if n == 0 or len(obs) != n + 1:
            raise UserError(f"{source.minari_id}: episode {episode.id} has {len(obs)} observations for {n} actions; "
                            "Minari episodes hold N+1 observations for N > 0 actions")
        terminals = np.asarray(episode.terminations, dtype=bool)
        timeouts = np.asarray(episode.truncations, dtype=bool) & ~terminals
        timeouts[-1] = not terminals[-1]  # the episode's end always ends a trajectory, flagged or not
        # obs[t] is the state action[t] was taken in; the final observation has no action and is dropped
        episodes.append((obs[:-1], episode.actions, episode.rewards, terminals, timeouts))
    if not episodes:
        raise UserError(f"{source.path} holds no transitions")
    raw = checked_transitions(dict(zip(D4RL_KEYS, map(np.concatenate, zip(*episodes)))), source.path)  # all episodes
    if recover_env and dataset.env_spec is not None:  # the dataset's eval env, as its metadata describes it
        env_kwargs = MINARI_PORTS.get(source.minari_id, (None, None, {}))[2]
        with warnings.catch_warnings(action="ignore"):  # e.g. "no eval env spec: the data env is used", old versions
            try:
                env = dataset.recover_environment(eval_env=True, **env_kwargs)
            except (ImportError, gym.error.Error) as err:
                raise UserError(f"cannot create the eval env of {source.minari_id} ({err}); set eval_env, or "
                                "`pip install gymnasium-robotics==1.4.2` for maze and adroit envs") from None
        source.env_spec, source.eval_env = env.spec, env.spec.id
        env.close()
    if source.eval_env is None:
        raise UserError(f"no evaluation env for {source.minari_id}: set eval_env to a gymnasium env id")
    if source.ref_min_score is None:  # the dataset's own reference scores (what minari.get_normalized_score uses)
        meta = dataset.storage.metadata
        source.ref_min_score, source.ref_max_score = _checked_refs(meta.get("ref_min_score"), meta.get("ref_max_score"))
    return source, raw


def load_dataset(config: TrainConfig, source: DatasetSource) -> Tuple[DatasetSource, Dict[str, np.ndarray]]:
    if config.dataset_source == "hf":
        return source, load_hf_trajectories(source.path or config.env_name)
    if source.minari_id is not None:
        return load_minari(source, recover_env=config.eval_env is None)
    if not source.path.exists():
        download(source.url, source.path)
    return source, load_d4rl_hdf5(source.path)


# --- Data: trajectories, returns-to-go, normalisation -----------------------------------------
def cut_trajectories(terminals: np.ndarray, timeouts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Start index and length of every trajectory; a trajectory ends at each terminal or timeout."""
    ends = np.flatnonzero(terminals | timeouts) + 1  # exclusive end of each flagged trajectory
    if len(ends) == 0 or ends[-1] != len(terminals):
        ends = np.append(ends, len(terminals))  # keep a trailing piece with neither flag (the baseline drops it)
    starts = np.concatenate([[0], ends[:-1]])
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sum of rewards within each trajectory (gamma = 1)."""
    cumsum = np.concatenate([[0.0], np.cumsum(rewards, dtype=np.float64)])  # cumsum[i] = sum(rewards[:i])
    traj_end = np.repeat(starts + lengths, lengths)  # exclusive end of the trajectory of each step
    return (cumsum[traj_end] - cumsum[:-1]).astype(np.float32)


@dataclass
class OfflineData:
    states: np.ndarray  # [N, S] normalized
    actions: np.ndarray  # [N, A]
    returns_to_go: np.ndarray  # [N] already multiplied by reward_scale
    traj_starts: np.ndarray  # [num_traj]
    traj_lengths: np.ndarray  # [num_traj]
    traj_returns: np.ndarray  # [num_traj] undiscounted episode returns (unscaled)
    state_mean: np.ndarray  # [S]
    state_std: np.ndarray  # [S]


def prepare_data(raw: Dict[str, np.ndarray], reward_scale: float,
                 normalisation: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                 keep_trailing_piece: bool = True) -> OfflineData:
    """Trajectories, scaled returns-to-go and states normalised with raw's own statistics (or the given ones)."""
    starts, lengths = cut_trajectories(raw["terminals"], raw["timeouts"])
    observations = raw["observations"]  # all of them give the statistics, a dropped trailing piece too (as CORL)
    state_mean, state_std = normalisation or (observations.mean(0, dtype=np.float64).astype(np.float32),
                                              (observations.std(0, dtype=np.float64) + 1e-6).astype(np.float32))
    if not (keep_trailing_piece or raw["terminals"][-1] or raw["timeouts"][-1]):  # CORL, DT authors: flags cut only
        starts, lengths = starts[:-1], lengths[:-1]
        if len(starts) == 0:
            raise UserError("the dataset has no terminal or timeout flag: with keep_trailing_piece false nothing is left")
    end = starts[-1] + lengths[-1]  # the transitions trajectories hold
    rtg = returns_to_go(raw["rewards"][:end], starts, lengths)
    return OfflineData(states=(observations[:end] - state_mean) / state_std, actions=raw["actions"][:end],
                       returns_to_go=rtg * reward_scale,  # the model sees scaled returns, in training and evaluation
                       traj_starts=starts, traj_lengths=lengths, traj_returns=rtg[starts],
                       state_mean=state_mean, state_std=state_std)


def split_trajectories(raw: Dict[str, np.ndarray], fraction: float,
                       seed: int) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
    """(training, held-out) transitions: a seeded random `fraction` of whole trajectories held out, file order kept."""
    if fraction == 0:
        return raw, None
    starts, lengths = cut_trajectories(raw["terminals"], raw["timeouts"])
    held = round(fraction * len(starts))
    if not 0 < held < len(starts):
        raise UserError(f"val_fraction {fraction} of the dataset's {len(starts)} trajectories holds out {held}; "
                        "choose a fraction that leaves at least one trajectory on each side")
    held_out = np.isin(np.arange(len(starts)), np.random.default_rng(seed).permutation(len(starts))[:held])
    is_val = np.repeat(held_out, lengths)  # per transition
    return {k: v[~is_val] for k, v in raw.items()}, {k: v[is_val] for k, v in raw.items()}


class WindowSampler:
    """Batches of K-step windows, sampled on the training device. A start drawn uniformly over all N transitions
    is CORL's trajectory drawn in proportion to its length, then a start uniformly inside it."""
    def __init__(self, data: OfflineData, seq_len: int, device: torch.device, seed: int):
        lengths = torch.as_tensor(data.traj_lengths)
        traj_of_step = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.as_tensor(data.traj_starts)
        self.states = torch.as_tensor(data.states, device=device)
        self.actions = torch.as_tensor(data.actions, device=device)
        self.returns_to_go = torch.as_tensor(data.returns_to_go, device=device)
        self.traj_end = (starts + lengths)[traj_of_step].to(device)  # exclusive end, per transition
        self.step_in_traj = (torch.arange(len(traj_of_step)) - starts[traj_of_step]).to(device)
        self.offsets = torch.arange(seq_len, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, ...]:
        return self.windows(torch.randint(0, len(self.states), (batch_size,), device=self.states.device,
                                          generator=self.generator))

    def windows(self, start: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The windows that begin at global transition indices start [B], a tensor on the sampler's device."""
        index = start[:, None] + self.offsets  # [B, K] global transition indices
        mask = index < self.traj_end[start][:, None]  # real steps; the rest is right padding
        index = torch.where(mask, index, start[:, None])  # any valid row, zeroed below
        states = self.states[index] * mask[..., None]  # padding is zero after normalisation
        actions = self.actions[index] * mask[..., None]
        returns = self.returns_to_go[index] * mask
        timesteps = self.step_in_traj[start][:, None] + self.offsets  # keeps counting into the padding
        return states, actions, returns, timesteps, mask


# --- Model ------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads, self.attention_dropout = num_heads, attention_dropout
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.proj = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], queries: Optional[slice] = None) -> torch.Tensor:
        """x [B, L, E] -> [B, L, E], or only the query positions' outputs [B, Q, E] (attn_mask cut to their rows)."""
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        if queries is None:  # [B, L, 3E] -> [3, B, heads, L, E/heads]
            q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        else:  # queries only where an output is read: no FLOPs for outputs nobody reads
            w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
            b_q, b_kv = self.qkv.bias.split([dim, 2 * dim])
            q = F.linear(x[:, queries], w_q, b_q).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
            k, v = F.linear(x, w_kv, b_kv).view(batch, length, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        # attn_mask: causal and key padding; None: causal (or a last query that sees all); dropout on attention weights
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=attn_mask is None and queries is None,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, q.shape[2], dim))


# MLP activations: exact (erf) GELU as CORL, ReLU as the DT authors' code and transformers' default
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # no parameters: the state_dict is the same for every activation


class TransformerBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, attention_dropout: float, residual_dropout: float,
                 activation: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.attention = CausalSelfAttention(embedding_dim, num_heads, attention_dropout)
        self.attention_drop = nn.Dropout(residual_dropout)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, 4 * embedding_dim), ACTIVATIONS[activation](),
                                 nn.Linear(4 * embedding_dim, embedding_dim), nn.Dropout(residual_dropout))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], queries: Optional[slice] = None) -> torch.Tensor:
        attention = self.attention(self.norm1(x), attn_mask, queries)
        x = x if queries is None else x[:, queries]
        x = x + self.attention_drop(attention)  # pre-norm GPT block
        return x + self.mlp(self.norm2(x))


class DecisionTransformer(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, seq_len: int = 20, episode_len: int = 1000,
                 embedding_dim: int = 128, num_layers: int = 3, num_heads: int = 1,
                 attention_dropout: float = 0.1, residual_dropout: float = 0.1,
                 embedding_dropout: float = 0.1, max_action: float = 1.0, activation: str = "gelu", init: str = "corl"):
        super().__init__()
        self.state_dim, self.action_dim = state_dim, action_dim
        self.seq_len, self.episode_len, self.max_action = seq_len, episode_len, max_action
        self.timestep_emb = nn.Embedding(episode_len + seq_len, embedding_dim)  # padded steps count on past the end
        self.return_emb = nn.Linear(1, embedding_dim)
        self.state_emb = nn.Linear(state_dim, embedding_dim)
        self.action_emb = nn.Linear(action_dim, embedding_dim)
        self.emb_norm = nn.LayerNorm(embedding_dim)
        self.emb_drop = nn.Dropout(embedding_dropout)
        self.blocks = nn.ModuleList(TransformerBlock(embedding_dim, num_heads, attention_dropout, residual_dropout,
                                                     activation) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(embedding_dim)
        self.action_head = nn.Sequential(nn.Linear(embedding_dim, action_dim), nn.Tanh())
        # kzl: the DT authors' GPT-2 inits only its blocks and final LayerNorm; the rest keeps torch's defaults
        for part in (self.blocks, self.out_norm) if init == "kzl" else (self,):
            part.apply(self._init_weights)
        if init == "corl":  # CORL's nn.MultiheadAttention in_proj_weight [3E, E], never visited by its init
            for block in self.blocks:
                nn.init.xavier_uniform_(block.attention.qkv.weight)  # torch's own MHA init: std sqrt(1/(2E))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:  # LayerNorms keep torch's init: weight 1, bias 0 (as CORL sets)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                timesteps: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                last_only: bool = False) -> torch.Tensor:
        """states [B,T,S], actions [B,T,A], returns_to_go [B,T], timesteps [B,T], padding_mask [B,T] (True = real
        step) -> predicted actions [B,T,A], or [B,A] of the last step with last_only (evaluation)."""
        batch, steps = states.shape[:2]
        time_emb = self.timestep_emb(timesteps)  # shared timestep embedding for R, s, a of one step
        embeddings = (self.return_emb(returns_to_go.unsqueeze(-1)), self.state_emb(states), self.action_emb(actions))
        tokens = torch.stack([e + time_emb for e in embeddings], 2).flatten(1, 2)  # [B, 3T, E]: R_0, s_0, a_0, R_1, ...
        length = 3 * steps - 1  # a_T only influences later tokens, and there are none
        x = self.emb_drop(self.emb_norm(tokens[:, :length]))
        queries = slice(length - 1, None) if last_only else slice(1, None, 3)  # last block: each s_t (predicts a_t)
        attn_mask = last_mask = None  # None: causal (is_causal), or a last query that sees every key
        if padding_mask is not None:
            key_mask = padding_mask.repeat_interleave(3, dim=1)[:, :length]  # [B, 3T-1], same order as tokens
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            attn_mask = (causal & key_mask[:, None, :])[:, None]  # [B, 1, 3T-1, 3T-1], True = attend
            last_mask = attn_mask[:, :, queries]
        elif not last_only:
            last_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[queries]  # [T, 3T-1]
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x, last_mask if last else attn_mask, queries if last else None)
        predicted = self.action_head(self.out_norm(x)) * self.max_action  # [B, T or 1, A]
        return predicted[:, -1] if last_only else predicted


def masked_mse(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               entries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared error summed over real steps, divided by their entries or by `entries` (the whole batch's, CORL's)."""
    squared = ((predicted - target) ** 2).sum(-1) * mask
    return squared.sum() / (mask.sum() * target.shape[-1] if entries is None else entries)


# --- Evaluation -------------------------------------------------------------------------------
def make_env(env_id: Any, **kwargs: Any) -> gym.Env:
    """gym.make of an env id or EnvSpec; dict observations come out flattened as in the training data."""
    if isinstance(env_id, str) and env_id not in gym.registry:
        # registers the AntMaze, PointMaze and AdroitHand envs; its import-time notice (README) stays quiet
        with contextlib.suppress(ImportError), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module("gymnasium_robotics")
    try:
        with warnings.catch_warnings():  # -v4 is chosen on purpose: it matches the D4RL -v2 data
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            env = gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as err:
        name = getattr(env_id, "id", env_id)
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "set eval_env to a registered gymnasium env id"
        raise UserError(f"cannot create gymnasium env '{name}' ({err}); {hint} (maze and adroit envs need "
                        "`pip install gymnasium-robotics==1.4.2`)") from None
    if isinstance(env.observation_space, gym.spaces.Dict):  # flattened as load_minari flattens the data
        keys = obs_keys(env.observation_space.spaces)
        size = sum(int(np.prod(env.observation_space[k].shape)) for k in keys)
        flat = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        env = gym.wrappers.TransformObservation(
            env, lambda obs: np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in keys]), flat)
    return env


def normalized_score(returns: np.ndarray, ref_min: float, ref_max: float) -> np.ndarray:
    return 100.0 * (returns - ref_min) / (ref_max - ref_min)


VIDEO_SIZE = 256  # frame width and height in pixels, a multiple of 16 as the mp4 encoder wants


def make_render_env(make_env_fn: Callable[..., gym.Env]) -> gym.Env:
    """An rgb_array eval env without MuJoCo's shadows, reflections and multisampling: 5, not 80 ms a frame."""
    try:
        env = make_env_fn(render_mode="rgb_array", width=VIDEO_SIZE, height=VIDEO_SIZE)
    except TypeError:  # an env without frame size arguments
        env = make_env_fn(render_mode="rgb_array")
    model = getattr(env.unwrapped, "model", None)
    if hasattr(model, "light_castshadow"):  # a MuJoCo env
        model.light_castshadow[:], model.mat_reflectance[:], model.vis.quality.offsamples = False, 0.0, 0
    return env


def check_video(make_env_fn: Callable[..., gym.Env]) -> None:
    """Fail before a run starts when it cannot record videos: a package missing, or no offscreen rendering."""
    for module, package in (("imageio", "imageio==2.38.1"), ("imageio_ffmpeg", "imageio-ffmpeg==0.8.1"),
                            ("PIL", "pillow==13.0.0")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"eval_video needs the {package.split('==')[0]} package: pip install {package}")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders headless (inherited by the env workers)
    os.environ.setdefault("LP_NUM_THREADS", "0")  # Mesa's GL helper threads made a 2-thread forward pass 7x slower
    try:
        env = make_render_env(make_env_fn)
        env.reset(seed=0)
        frame, error = env.render(), "it returned no rgb frame"
        env.close()
    except Exception as err:  # a missing OpenGL library, a bad MUJOCO_GL: mujoco and OpenGL raise many types
        frame, error = None, f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise UserError(f"eval_video: the eval env cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                        f"({error}); install Mesa's EGL (apt-get install libegl1 libopengl0 libgl1-mesa-dri), or "
                        "set MUJOCO_GL=osmesa with libosmesa6, or run without --eval_video")


class EpisodeVideo(contextlib.AbstractContextManager):
    """One episode's mp4, frames labelled with target and return so far; renamed into place when complete. One that
    cannot be written (a full disk, a folder gone) is dropped with a warning: a video is not worth a run."""
    def __init__(self, path: str, target: float, fps: float):
        import imageio
        import imageio_ffmpeg
        from PIL import Image, ImageDraw, ImageFont
        self.path, self.part, self.target, self.ffmpeg = path, path[:-len(".mp4")] + ".part.mp4", target, imageio_ffmpeg
        self.image, self.draw, self.font = Image, ImageDraw, ImageFont.load_default(size=14)
        self.writer = imageio.get_writer(self.part, fps=fps, ffmpeg_log_level="error",  # veryfast: half the
                                         output_params=["-preset", "veryfast"])  # encoding time, a smaller file

    def add(self, frame: np.ndarray, episode_return: float) -> None:
        if self.writer is None:  # dropped
            return
        image = self.image.fromarray(frame)
        draw, text = self.draw.Draw(image), f"target {self.target:g}\nreturn {episode_return:.1f}"
        draw.rectangle((0, 0, *np.add(draw.multiline_textbbox((4, 4), text, font=self.font)[2:], 4)), fill=(0, 0, 0))
        draw.multiline_text((4, 4), text, fill=(255, 255, 255), font=self.font)
        try:
            self.writer.append_data(np.asarray(image))
        except Exception as err:  # ffmpeg cannot write: imageio raises OSError, BrokenPipeError or RuntimeError
            self.drop(err)

    def drop(self, err: Exception) -> None:
        print(f"warning: video {self.path} dropped ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
              "the evaluation goes on", file=sys.stderr)
        with contextlib.suppress(Exception):
            self.writer.close()
        self.writer = None

    def __exit__(self, error: Any, *_: Any) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
                if error is None:  # read back: imageio ignores ffmpeg's exit code (a trailer lost to a full disk)
                    self.ffmpeg.count_frames_and_secs(self.part)
                    os.replace(self.part, self.path)
        except Exception as err:
            self.drop(err)
        with contextlib.suppress(OSError):  # what is left of an unfinished or dropped video
            os.remove(self.part)


def _env_worker(conn: Any, make_env_fn: Callable[..., gym.Env], num_envs: int, threads: int, render: List[int]) -> None:
    """A worker process's envs: it resets, steps or renders them on request, or runs whole rollouts (CPU)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # sent to the whole process group; the trainer handles them
        signal.signal(sig, signal.SIG_IGN)
    keep_freed_memory()
    torch.set_num_threads(threads)  # the cores are shared out between the workers
    envs = EvalEnvs(make_env_fn, num_envs, render=render)
    conn.send(("ok", None))  # ready
    try:
        while True:
            command, local, data = conn.recv()
            if command == "close":
                break
            try:
                if command == "rollout":  # data = (targets, seeds, videos, pickled model, state_mean, state_std, reward_scale)
                    targets, seeds, videos, model, *normalisation = data
                    timing = {"forward": 0.0, "env": 0.0}
                    episodes = rollout(pickle.loads(model), envs, targets, seeds, *normalisation,
                                       torch.device("cpu"), timing, videos)
                    # the episodes, then each one's share of the worker's forward and env seconds
                    result = (episodes, *(np.full(len(episodes), timing[k] / len(episodes)) for k in ("forward", "env")))
                else:  # reset (data: seeds), step (data: actions), render
                    result = getattr(envs, command)(local, data)
                conn.send(("ok", result))
            except Exception as err:  # reported to the main process, which raises it
                conn.send(("error", f"{type(err).__name__}: {err}"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        envs.close()


class EvalEnvs:
    """num_envs eval envs, in this process (workers=0) or in worker e % workers (round robin keeps the live
    episodes spread as others finish); the envs numbered in `render` render frames."""
    def __init__(self, make_env_fn: Callable[..., gym.Env], num_envs: int, workers: int = 0, render: Any = ()):
        probe = make_env_fn()
        self.state_dim, self.action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        self.fps, self.rendered = probe.metadata.get("render_fps", 30), sorted(render)
        probe.close()
        if workers == -1:  # measured: worth it from ~16 envs a worker
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = min(cores, num_envs // 16)
        self.num_envs, self.workers = num_envs, min(workers, num_envs)
        if self.workers == 0:
            self.envs = [make_render_env(make_env_fn) if e in self.rendered else make_env_fn() for e in range(num_envs)]
            return
        context = mp.get_context("spawn")  # no fork: the parent holds torch threads and maybe CUDA
        self.pipes = []
        for worker in range(self.workers):
            parent, child = context.Pipe()
            count = len(range(worker, num_envs, self.workers))
            threads = max(1, torch.get_num_threads() // self.workers)  # this process's threads, shared out
            render = [e // self.workers for e in self.rendered if e % self.workers == worker]
            context.Process(target=_env_worker, args=(child, make_env_fn, count, threads, render), daemon=True).start()
            child.close()
            self.pipes.append(parent)
        for pipe in self.pipes:  # wait until every worker has built its envs
            pipe.recv()

    def _ask(self, command: str, episodes: np.ndarray, data: Any, shared: Tuple[Any, ...] = ()) -> List[Any]:
        """Each worker gets its rows of data (an array or tuple of arrays) plus `shared`; answers in episode order."""
        owner = episodes % self.workers
        asked = [w for w in range(self.workers) if (owner == w).any()]
        for w in asked:  # all workers work at the same time
            rows = owner == w
            part = tuple(x[rows] for x in data) + shared if isinstance(data, tuple) else data[rows]
            self.pipes[w].send((command, episodes[rows] // self.workers, part))
        answers = {w: self.pipes[w].recv() for w in asked}  # every answer, so none is left for the next request
        for w, (status, result) in answers.items():
            if status == "error":
                raise RuntimeError(f"evaluation env worker {w} failed: {result}")
        parts = [result if isinstance(result, tuple) else (result,) for _, result in answers.values()]
        order = np.argsort(np.concatenate([np.flatnonzero(owner == w) for w in asked]))  # gathered rows -> episodes
        return [np.concatenate(values)[order] for values in zip(*parts)]  # each output, from every worker

    def reset(self, episodes: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """seeds [n, 2]: each env's reset seed, then how many resets without a seed follow before its episode."""
        if self.workers:
            return self._ask("reset", episodes, seeds)[0]
        observations = []
        for e, (seed, resets_after) in zip(episodes, seeds):
            observations.append(self.envs[e].reset(seed=int(seed))[0])
            for _ in range(resets_after):  # CORL's episode i of a target: the i-th reset after one env.seed(eval_seed)
                observations[-1] = self.envs[e].reset()[0]
        return np.stack(observations)

    def step(self, episodes: np.ndarray, actions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step each env with its action -> observations [n, S], rewards [n], (terminated, truncated) [n, 2]."""
        if self.workers == 0:
            results = [self.envs[e].step(action) for e, action in zip(episodes, actions)]
            return (np.stack([r[0] for r in results]), np.array([r[1] for r in results], dtype=np.float64),
                    np.array([r[2:4] for r in results], dtype=bool))
        return tuple(self._ask("step", episodes, actions))

    def render(self, episodes: np.ndarray, _: Any = None) -> np.ndarray:
        """The current frame of each of these envs (they must render): [n, height, width, 3] uint8."""
        if self.workers == 0:
            return np.stack([self.envs[e].render() for e in episodes])
        return self._ask("render", episodes, episodes)[0]

    def rollout(self, model: "DecisionTransformer", targets: np.ndarray, seeds: np.ndarray, videos: np.ndarray,
                *args: Any, timing: Optional[Dict[str, float]] = None) -> np.ndarray:
        """Each worker runs rollout() for its episodes with a CPU copy of the model; returns rollout()'s episodes."""
        blob = pickle.dumps(model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu())
        episodes, *seconds = self._ask("rollout", np.arange(len(targets)), (targets, seeds, videos), shared=(blob, *args))
        for key, shares in zip(("forward", "env") if timing is not None else (), seconds):  # episodes' shares
            timing[key] += shares.sum() / min(self.workers, len(targets))  # wall time: the mean over the workers
        return episodes

    def close(self) -> None:
        for env in getattr(self, "envs", []):  # in this process
            env.close()
        for pipe in getattr(self, "pipes", []):
            with contextlib.suppress(OSError):  # a worker that already died
                pipe.send(("close", None, None))
            pipe.close()


EPISODE = [("return", np.float64), ("length", np.int64), ("terminated", bool)]  # what rollout() records of an episode


@torch.no_grad()
def rollout(model: DecisionTransformer, envs: EvalEnvs, targets: np.ndarray, seeds: np.ndarray,
            state_mean: np.ndarray, state_std: np.ndarray, reward_scale: float, device: torch.device,
            timing: Optional[Dict[str, float]] = None, videos: Optional[np.ndarray] = None) -> np.ndarray:
    """Episode e runs in env e with target targets[e] from reset seeds[e], one batched forward pass a step for
    all; returns [episodes] of EPISODE. timing gains model and env seconds; videos: an mp4 path (or None) per episode."""
    num, K, S, A = len(targets), model.seq_len, model.state_dim, model.action_dim
    live = np.arange(num)  # episode index of each batch row
    observations = envs.reset(live, seeds)
    # the last K steps of every live episode; the newest step sits at index K-1
    states, actions = torch.zeros(num, K, S, device=device), torch.zeros(num, K, A, device=device)
    returns, timesteps = torch.zeros(num, K, device=device), torch.zeros(num, K, dtype=torch.long, device=device)
    returns[:, -1] = torch.as_tensor(targets * reward_scale, dtype=torch.float32, device=device)  # R_0
    episodes = np.zeros(num, dtype=EPISODE)
    with contextlib.ExitStack() as stack:  # a video is complete only when the rollout is
        videos = {e: stack.enter_context(EpisodeVideo(path, targets[e], envs.fps))
                  for e, path in enumerate(() if videos is None else videos) if path}
        for t in range(model.episode_len):
            start = time.perf_counter()
            states[:, -1] = torch.as_tensor((observations.astype(np.float32) - state_mean) / state_std, device=device)
            timesteps[:, -1] = t
            actions[:, -1] = 0.0  # placeholder for the action being chosen
            context = min(t + 1, K)  # prompt grows from 1 to K steps, no padding
            action = model(states[:, -context:], actions[:, -context:], returns[:, -context:],
                           timesteps[:, -context:], last_only=True)  # prediction at the last state token
            actions[:, -1] = action
            action = action.cpu().numpy()  # waits for the forward pass: its time is the model's
            stepped = time.perf_counter()
            next_obs, rewards, ended = envs.step(live, action)  # every live env steps
            if timing is not None:
                timing["forward"] += stepped - start
                timing["env"] += time.perf_counter() - stepped
            done = ended.any(axis=1) | (t + 1 >= model.episode_len)  # terminated, truncated or at episode_len
            episodes["return"][live] += rewards
            episodes["length"][live], episodes["terminated"][live] = t + 1, ended[:, 0]  # fell, not timed out
            filmed = [e for e in live if e in videos] if videos else []
            if filmed:  # one frame per step, after it, labelled with the return so far
                for e, frame in zip(filmed, envs.render(np.array(filmed))):
                    videos[e].add(frame, episodes["return"][e])
            next_rtg = returns[:, -1] - torch.as_tensor(rewards * reward_scale, dtype=torch.float32, device=device)
            keep = torch.as_tensor(~done, device=device)
            live, observations = live[~done], next_obs[~done]
            if len(live) == 0:
                break
            # drop finished episodes, shift the window left by one step and append the new return-to-go
            states, actions, returns, timesteps = (x[keep].roll(-1, dims=1) for x in (states, actions, returns, timesteps))
            returns[:, -1] = next_rtg[keep]
    return episodes


def evaluate(model: DecisionTransformer, envs: EvalEnvs, target_returns: Tuple[float, ...],
             eval_episodes: int, eval_seed: int, state_mean: np.ndarray, state_std: np.ndarray,
             reward_scale: float, device: torch.device, worker_rollouts: Optional[bool] = None,
             timing: Optional[Dict[str, float]] = None, video_prefix: Optional[str] = None,
             eval_reset: str = "per_episode") -> Dict[float, np.ndarray]:
    """eval_episodes episodes per target, all together -> {target: episodes (EPISODE)}, reset as eval_reset says.
    With workers on CPU each runs its episodes' rollout with a model copy; on GPU the model runs here, workers step."""
    num = eval_episodes * len(target_returns)
    targets = np.repeat(np.asarray(target_returns, dtype=np.float64), eval_episodes)  # episode e -> its target
    i = np.tile(np.arange(eval_episodes), len(target_returns))  # episode e is episode i of its target
    # [reset seed, resets after it]: eval_seed + i; CORL's eval_seed then i resets; the DT authors' never-seeded env
    seed = {"per_episode": eval_seed + i, "per_target": np.full_like(i, eval_seed),
            "unseeded": np.random.default_rng().integers(2**31, size=num)}[eval_reset]  # OS entropy each time
    seeds = np.stack([seed, i if eval_reset == "per_target" else np.zeros_like(i)], axis=1)
    videos = np.array([f"{video_prefix}_target{targets[e]}_ep{e % eval_episodes}.mp4"  # env e runs episode e
                       if video_prefix and e in envs.rendered else None for e in range(num)])
    was_training = model.training
    model.eval()
    try:
        if envs.workers and (device.type == "cpu" if worker_rollouts is None else worker_rollouts):
            episodes = envs.rollout(model, targets, seeds, videos, state_mean, state_std, reward_scale, timing=timing)
        else:
            episodes = rollout(model, envs, targets, seeds, state_mean, state_std, reward_scale, device, timing, videos)
    finally:
        model.train(was_training)
    return {target: episodes[targets == target] for target in target_returns}


def eval_metrics(results: Dict[float, np.ndarray], ref_min: Optional[float], ref_max: Optional[float]) -> Dict[str, float]:
    """The baseline's keys eval/{target}_return_mean, ..._normalized_score_std, then why episodes ended."""
    metrics = {}
    for target, episodes in results.items():
        scores = {"return": episodes["return"]}
        if ref_min is not None:
            scores["normalized_score"] = normalized_score(episodes["return"], ref_min, ref_max)
        for name, values in scores.items():
            metrics[f"eval/{target}_{name}_mean"] = float(np.mean(values))
            metrics[f"eval/{target}_{name}_std"] = float(np.std(values))
        metrics[f"eval/{target}_episode_length_mean"] = float(episodes["length"].mean())
        metrics[f"eval/{target}_terminated_fraction"] = float(episodes["terminated"].mean())  # fell before the time limit
    return metrics


def format_eval_table(step: int, metrics: Dict[str, float], target_returns: Tuple[float, ...]) -> str:
    lines = [f"eval @ step {step}", "    target      return mean +- std    normalized mean +- std   length  terminated"]
    for target in target_returns:
        key = f"eval/{target}_"
        ret = f"{metrics[key + 'return_mean']:.1f} +- {metrics[key + 'return_std']:.1f}"
        norm = (f"{metrics[key + 'normalized_score_mean']:.2f} +- {metrics[key + 'normalized_score_std']:.2f}"
                if key + "normalized_score_mean" in metrics else "n/a")
        lines.append(f"{target:>10}  {ret:>22}  {norm:>24}  {metrics[key + 'episode_length_mean']:>7.1f}"
                     f"  {metrics[key + 'terminated_fraction']:>10.0%}")
    return "\n".join(lines + ([f"  val_loss {metrics['val_loss']:.5f}"] if "val_loss" in metrics else []))


def make_eval_envs(config: TrainConfig, env_id: Any, sizes: Tuple[int, int], trained: str) -> EvalEnvs:
    """The envs of all evaluation episodes (each target's first eval_video render), checked against `sizes`."""
    make = functools.partial(make_env, env_id)  # picklable for env workers
    if config.eval_video:
        check_video(make)
    episodes = config.eval_episodes
    render = [t * episodes + i for t in range(len(config.target_returns)) for i in range(config.eval_video)]
    envs = EvalEnvs(make, episodes * len(config.target_returns), config.eval_workers, render)
    if (envs.state_dim, envs.action_dim) != tuple(sizes):
        envs.close()
        raise UserError(f"{trained} has state/action sizes {sizes[0]}/{sizes[1]} but env {getattr(env_id, 'id', env_id)}"
                        f" has {envs.state_dim}/{envs.action_dim}; set eval_env to the env the data came from")
    return envs


# --- Logging: a local run folder (config.yaml, metrics.jsonl) and wandb -----------------------
class RunLogger:
    """Every row to run_dir/metrics.jsonl and wandb (offline without an account)."""
    def __init__(self, config: TrainConfig, run_name: str, run_dir: Path, job_type: str = "train"):
        import wandb  # imported here: wandb is slow to import and only training needs it
        self.path, self.wandb = run_dir / "metrics.jsonl", wandb
        host, has_key = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname, False
        with contextlib.suppress(FileNotFoundError, netrc.NetrcParseError):  # an API key from `wandb login`
            has_key = netrc.netrc().authenticators(host) is not None
        # passed to init, not read from the environment: wandb reads it once per process, at its first init
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key or os.environ.get("WANDB_API_KEY") else "offline")
        if not os.environ.get("WANDB_MODE") and mode == "offline":
            print(f"wandb: no API key and WANDB_MODE unset, logging offline to {run_dir / 'wandb'} "
                  "(upload later with `wandb sync`)")
        id_file = run_dir / "wandb_run_id"  # a resumed run logs to the same wandb run
        self.run_id = id_file.read_text().strip() if id_file.exists() else os.urandom(4).hex()
        atomic_write(id_file, lambda tmp: tmp.write_text(self.run_id))
        try:
            self.run = wandb.init(project=config.project, group=config.group, name=run_name, job_type=job_type,
                                  config=asdict(config), dir=str(run_dir), id=self.run_id, resume="allow", mode=mode)
        except Exception as err:  # a bad API key, an unreachable server
            raise UserError(f"wandb could not start ({str(err).splitlines()[0]}); fix the key or set "
                            "WANDB_MODE=offline") from None

    def log(self, metrics: Dict[str, float], step: int, commit: bool = True, videos: List[Path] = ()) -> None:
        """A row of numbers to metrics.jsonl and wandb; the mp4 videos go to wandb only, in the same row."""
        line = (json.dumps({"step": step, **metrics}) + "\n").encode()
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing of a failed write is flushed later
            end = f.seek(0, os.SEEK_END)
            try:
                while line:  # a short write is followed by one that raises (a full disk)
                    line = line[f.write(line):]
            except OSError as err:
                f.truncate(end)  # only whole lines stay
                err.filename = str(self.path)
                raise
        media = {"video/" + p.stem.split("_", 1)[1]: self.wandb.Video(str(p), format="mp4") for p in videos}
        self.run.log({**metrics, **media}, step=step, commit=commit)

    def finish(self) -> None:
        self.run.finish()


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), from the OS cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some FUSE and network file systems cannot fsync a folder: nothing more to do there
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any], keep_previous: bool = False) -> None:
    """write(temporary path), fsync it, rename it to path, fsync the folder: readers, and the disk after a power
    loss, see the old file or the new one, never half of one. keep_previous: the old one becomes <name>.prev<suffix>."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync(tmp)
        if keep_previous and path.exists():
            os.replace(path, path.with_suffix(".prev" + path.suffix))  # latest.pt -> latest.prev.pt
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as err:
        err.filename = err.filename or str(tmp)  # a full disk's write error names no file: the folder is the news
        raise
    finally:
        with contextlib.suppress(OSError):  # a write cut off by an error (kill -9: open_run_dir removes it)
            tmp.unlink(missing_ok=True)


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl that have a step, skipping a row cut off by a crash."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


# --- Checkpoints, resume and eval-only --------------------------------------------------------
CHECKPOINT_KEYS = ("model_state", "state_mean", "state_std", "config", "step", "state_dim", "action_dim")
RESUME_KEYS = ("optimizer_state", "scheduler_state", "rng", "dataset_transitions", "best_score", "metrics",
               "loss_sum", "loss_count")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    if path.is_dir():
        path = path / "latest.pt"  # a run folder: its latest checkpoint
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give a .pt file or a run folder holding latest.pt")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's zip holds a CRC-32 of every record: check them all
            if (damaged := archive.testzip()) is not None:
                raise ValueError(f"record {damaged} fails its CRC-32 check")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy and RNG states
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        "the file is damaged or not a checkpoint of algorithms/dt.py") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of algorithms/dt.py (it lacks {list(CHECKPOINT_KEYS)})")
    return checkpoint


def saved_config(cli: TrainConfig, saved: Dict[str, Any], allowed: Tuple[str, ...]) -> TrainConfig:
    """The saved config with the user's values of `allowed` fields; other fields the user set are ignored, loudly."""
    try:
        config = pyrallis.decode(TrainConfig, saved)
    except Exception as err:
        raise UserError(f"the saved config does not load ({str(err).splitlines()[0]}); it was made by another "
                        "version of algorithms/dt.py") from None
    given = getattr(cli, "given", None)  # set by parse_config; a config built in code: its non-default fields
    given = given if given is not None else {k for k, v in asdict(cli).items() if v != getattr(TrainConfig(), k)}
    changed = [name for name in sorted(given & set(asdict(cli))) if getattr(cli, name) != getattr(config, name)]
    config = replace(config, **{name: getattr(cli, name) for name in changed if name in allowed})
    if ignored := [name for name in changed if name not in allowed]:
        print(f"warning: the run's saved config is used; ignoring command-line {', '.join(ignored)}", file=sys.stderr)
    return config


class StopSignal:
    """SIGINT/SIGTERM: finish the update, checkpoint, exit; a second signal stops at once."""
    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this update (send again to stop at once)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate_checkpoint(cli: TrainConfig) -> Dict[str, float]:
    """Eval-only: load a checkpoint, evaluate it with the command line's targets/episodes/seed, log, exit."""
    checkpoint = load_checkpoint(Path(cli.eval_checkpoint).expanduser())
    if "env_name" in cli.given and cli.env_name != checkpoint["config"]["env_name"]:
        raise UserError(f"the checkpoint was trained on {checkpoint['config']['env_name']}, not {cli.env_name}; drop "
                        "--env_name or pick a checkpoint of that dataset")
    config = saved_config(cli, checkpoint["config"], allowed=(
        "target_returns", "eval_episodes", "eval_seed", "eval_reset", "eval_workers", "device", "eval_env", "ref_min_score",
        "ref_max_score", "runs_dir", "project", "group", "name", "eval_checkpoint", "eval_video", "tf32"))
    validate_config(config)
    device = resolve_device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = config.tf32  # as in training: the same numbers as its evaluations
    eval_env = config.eval_env or checkpoint.get("eval_env_spec") or checkpoint.get("eval_env")  # spec: Minari
    refs = [_first(getattr(config, key), checkpoint.get(key)) for key in ("ref_min_score", "ref_max_score")]
    run_dir = Path(config.runs_dir) / f"{config.name}-eval-{config.env_name.replace('/', '-')}-{os.urandom(4).hex()}"
    envs = make_eval_envs(config, eval_env, (checkpoint["state_dim"], checkpoint["action_dim"]), "the checkpoint")
    with contextlib.closing(envs), tempfile.TemporaryDirectory(prefix="dt-videos-") as videos:
        model = build_model(config, checkpoint["state_dim"], checkpoint["action_dim"]).to(device)
        model.load_state_dict(checkpoint["model_state"])
        results = evaluate(model, envs, config.target_returns, config.eval_episodes, config.eval_seed,
                           checkpoint["state_mean"], checkpoint["state_std"], config.reward_scale, device,
                           video_prefix=f"{videos}/step{checkpoint['step']}", eval_reset=config.eval_reset)
        create_dirs(run_dir, *([run_dir / "videos"] if config.eval_video else []))  # only now: an error or
        for video in Path(videos).glob("*.mp4"):  # Ctrl+C during evaluation leaves nothing behind
            shutil.move(str(video), run_dir / "videos" / video.name)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(pyrallis.dump(config)))
    scores = eval_metrics(results, *refs)
    print(format_eval_table(checkpoint["step"], scores, config.target_returns))
    logger = RunLogger(config, run_dir.name, run_dir, job_type="eval")
    logger.log(scores, step=checkpoint["step"], videos=sorted((run_dir / "videos").glob("*.mp4")))
    logger.finish()
    return scores


def create_dirs(*dirs: Path) -> None:
    made = []
    try:
        for folder in dirs:
            made += reversed([p for p in (folder, *folder.parents) if not p.exists()])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".write-test").touch()
            (folder / ".write-test").unlink()
    except OSError as err:
        for new_folder in reversed(made):
            shutil.rmtree(new_folder, ignore_errors=True)
        raise UserError(f"cannot write to {folder} ({err.strerror or err}); set runs_dir (or run_dir, "
                        "checkpoints_path) to a writable folder") from None


# --- Training ---------------------------------------------------------------------------------
def build_model(config: TrainConfig, state_dim: int, action_dim: int) -> DecisionTransformer:
    names = inspect.signature(DecisionTransformer).parameters.keys() - {"state_dim", "action_dim"}
    return DecisionTransformer(state_dim, action_dim, **{name: getattr(config, name) for name in names})


def build_training(config: TrainConfig, state_dim: int, action_dim: int,
                   device: torch.device) -> Tuple[DecisionTransformer, torch.optim.Optimizer, Any]:
    model = build_model(config, state_dim, action_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=config.betas,
                                  weight_decay=config.weight_decay,
                                  fused=config.fused_adamw and device.type == "cuda")  # one kernel for all params
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup=config.warmup_steps, total=config.update_steps, cosine=config.lr_schedule == "cosine"))
    return model, optimizer, scheduler


def lr_factor(step: int, warmup: int, total: int, cosine: bool) -> float:
    """Learning-rate multiplier of update step + 1: linear warm-up min((step+1)/warmup, 1), then 1 or a cosine to 0.1."""
    if step + 1 < warmup or not cosine:
        return min((step + 1) / max(warmup, 1), 1.0)
    progress = (step + 1 - warmup) / max(total - warmup, 1)  # 0 at the end of warm-up, 1 at the last update
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def forward_backward(model: nn.Module, batch: Tuple[torch.Tensor, ...], micro_batch: int, bf16: bool,
                     loss_reduction: str = "real_steps", padding_mask: str = "real_steps") -> torch.Tensor:
    """The batch's masked MSE (detached) and its gradient, micro_batch windows at a time (in cache on CPU)."""
    states, actions, returns, timesteps, mask = batch
    if padding_mask == "all_ones":  # CORL e4f6175 made its mask after padding: padded steps are keys and in the loss
        mask = torch.ones_like(mask)
    # the mean over real entries, or CORL's (squared errors * mask).mean(): divided by every entry of the batch
    entries = (mask.sum() if loss_reduction == "real_steps" else mask.numel()) * actions.shape[-1]
    loss = torch.zeros((), device=states.device)
    for start in range(0, len(states), micro_batch):  # chunks divide by the whole batch's entries: same gradient
        chunk = slice(start, start + micro_batch)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):  # matmuls in bf16, loss in fp32
            predicted = model(states[chunk], actions[chunk], returns[chunk], timesteps[chunk], padding_mask=mask[chunk])
        chunk_loss = masked_mse(predicted.float(), actions[chunk], mask[chunk], entries)
        chunk_loss.backward()
        loss += chunk_loss.detach()
    return loss


def validation_windows(val: OfflineData, seq_len: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """The held-out trajectories as consecutive K-step windows (each step once), the same at every evaluation."""
    starts = np.concatenate([np.arange(s, s + n, seq_len) for s, n in zip(val.traj_starts, val.traj_lengths)])
    return WindowSampler(val, seq_len, device, seed=0).windows(torch.as_tensor(starts, device=device))


@torch.no_grad()
def validation_loss(model: nn.Module, windows: Tuple[torch.Tensor, ...], chunk: int = 256) -> float:
    """The training loss (masked action MSE) over the held-out windows, without dropout."""
    was_training = model.training
    model.eval()
    squared = sum(masked_mse(model(*w[:4], padding_mask=w[4]), w[1], w[4], entries=1)  # sums of squares
                  for w in zip(*(x.split(chunk) for x in windows)))
    model.train(was_training)
    return squared.item() / (windows[4].sum().item() * windows[1].shape[-1])


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   clip_grad: Optional[float]) -> Tuple[float, torch.Tensor]:
    """Clip, step, advance the schedule -> the learning rate this update used, the gradient norm before clipping."""
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), math.inf if clip_grad is None else clip_grad)  # inf: no clip
    learning_rate = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return learning_rate, grad_norm


def checkpoint_dir(config: TrainConfig, run_dir: Path) -> Path:
    return Path(config.checkpoints_path).expanduser() / run_dir.name if config.checkpoints_path else run_dir


class Run:
    """A training run: its data, eval envs, folders and model, and what a checkpoint saves and resume restores."""
    def __init__(self, config: TrainConfig, resume: Optional[Dict[str, Any]]):
        self.config, device = config, resolve_device(config.device)
        torch.backends.cuda.matmul.allow_tf32 = config.tf32  # float32 matmuls on TF32 tensor cores (CUDA only)
        self.source, raw = load_dataset(config, resolve_dataset(config))
        raw, val_raw = split_trajectories(raw, config.val_fraction, config.train_seed)  # val: None if val_fraction 0
        data = self.data = prepare_data(raw, config.reward_scale, keep_trailing_piece=config.keep_trailing_piece)
        val = None if val_raw is None else prepare_data(val_raw, config.reward_scale, (data.state_mean, data.state_std),
                                                        config.keep_trailing_piece)
        longest = max(data.traj_lengths.max(), 0 if val is None else val.traj_lengths.max())
        if longest > config.episode_len:  # timesteps index a table of episode_len + seq_len rows
            raise UserError(f"the dataset has a trajectory of {longest} steps, longer than "
                            f"episode_len={config.episode_len}; raise episode_len")
        if resume is not None and (resume["dataset_transitions"] != len(data.states)
                                   or not np.array_equal(resume["state_mean"], data.state_mean)):
            raise UserError(f"the dataset {self.source.path} is not the one {config.run_dir} was trained on "
                            f"({resume['dataset_transitions']} transitions then, {len(data.states)} now); "
                            "restore that file or start a new run")
        sizes = (data.states.shape[1], data.actions.shape[1])
        self.envs = make_eval_envs(config, self.source.env_spec or self.source.eval_env, sizes, "dataset")
        env_label = config.env_name.replace("/", "-")  # Minari ids have '/'
        self.run_dir = Path(config.run_dir or Path(config.runs_dir) /
                            f"{config.name}-{env_label}-seed{config.train_seed}-{os.urandom(4).hex()}")
        config.run_dir = str(self.run_dir)  # saved in config.yaml: `--run_dir <this folder>` resumes the run
        self.ckpt_dir = checkpoint_dir(config, self.run_dir)
        try:
            create_dirs(self.run_dir, self.ckpt_dir, *([self.run_dir / "videos"] if config.eval_video else []))
        except UserError:
            self.envs.close()
            raise
        for stale in {*self.ckpt_dir.glob("*.tmp-*"), *self.run_dir.glob("*.tmp-*")}:  # a write cut off by kill -9
            stale.unlink()
        if resume is None:
            atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(pyrallis.dump(config)))
        last_step = resume["step"] if resume else 0  # metrics.jsonl's rows after the checkpoint resumed from go
        if (metrics := self.run_dir / "metrics.jsonl").exists():
            keep = [json.dumps(row) + "\n" for row in read_metrics(metrics) if row["step"] <= last_step]
            atomic_write(metrics, lambda tmp: tmp.write_text("".join(keep)))
        held_out = f"; {len(val.traj_lengths)} trajectories ({len(val.states)} transitions) held out" if val else ""
        print(f"dataset {self.source.path or f'{HF_D4RL_REPO} {config.env_name}'}: {len(data.states)} transitions, "
              f"{len(data.traj_lengths)} trajectories, mean return {data.traj_returns.mean():.1f}{held_out}; "
              f"eval env {self.source.eval_env}; device {device}; run {self.run_dir}")
        self.logger = RunLogger(config, self.run_dir.name, self.run_dir)
        set_seed(config.train_seed, config.deterministic_torch)
        self.sampler = WindowSampler(data, config.seq_len, device, seed=config.train_seed)
        self.model, self.optimizer, self.scheduler = build_training(config, *sizes, device)
        self.val = None if val is None else validation_windows(val, config.seq_len, device)  # the val_loss windows
        self.loss_sum = torch.zeros((), device=device)  # the logging interval's loss, on the device: no sync per step
        self.loss_count, self.step, self.best_score, self.metrics = 0, 0, -math.inf, {}  # metrics: the last logged
        if resume is not None:
            self.restore(resume)
            print(f"resuming from step {self.step} (checkpoints in {self.ckpt_dir})")

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        rng = checkpoint["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if len(rng["sampler"]) == len(self.sampler.generator.get_state()):
            self.sampler.generator.set_state(rng["sampler"])
        else:  # saved on the other device type (CPU and CUDA generators differ): a new stream, seeded from the restored ones
            self.sampler.generator.manual_seed(random.getrandbits(63))
        self.step, self.best_score, self.metrics = checkpoint["step"], checkpoint["best_score"], checkpoint["metrics"]
        self.loss_sum, self.loss_count = checkpoint["loss_sum"].to(self.loss_sum.device), checkpoint["loss_count"]

    def save(self, *names: str) -> None:
        data, source = self.data, self.source
        checkpoint = {  # written to each of `names`
            "model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(), "step": self.step,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "sampler": self.sampler.generator.get_state()},  # every random stream training draws from
            "state_mean": data.state_mean, "state_std": data.state_std, "state_dim": data.states.shape[1],
            "action_dim": data.actions.shape[1], "dataset_transitions": len(data.states),
            "config": asdict(self.config), "eval_env": source.eval_env, "eval_env_spec": source.env_spec,
            "ref_min_score": source.ref_min_score, "ref_max_score": source.ref_max_score,
            "wandb_run_id": self.logger.run_id, "best_score": self.best_score, "metrics": self.metrics,
            "loss_sum": self.loss_sum.detach().cpu(), "loss_count": self.loss_count}
        serialised = io.BytesIO()
        torch.save(checkpoint, serialised)  # in memory: a full disk then fails the file's write, an OSError
        if self.logger.path.exists():  # metrics.jsonl's rows up to this checkpoint reach the disk before it
            fsync(self.logger.path)
        for name in names:  # latest.pt's previous version is kept as latest.prev.pt
            atomic_write(self.ckpt_dir / name, lambda tmp: tmp.write_bytes(serialised.getbuffer()), name == "latest.pt")

    def check_finite(self, first_bad_step: torch.Tensor) -> None:
        """Stop at the first update whose loss was NaN/inf, or now if the weights became so."""
        bad_step = int(first_bad_step.item())
        if not bad_step and not all(torch.isfinite(p).all() for p in self.model.parameters()):
            bad_step = self.step  # the loss was finite but the update made the weights NaN/inf
        if bad_step:
            last = self.ckpt_dir / "latest.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise UserError(f"the loss became NaN/inf at step {bad_step}; training stopped and {kept}. "
                            "Lower learning_rate, set clip_grad, or check the dataset")

    def log_training(self, learning_rate: float, grad_norm: torch.Tensor, commit: bool) -> None:
        row = {"train_loss": self.loss_sum.item() / self.loss_count, "learning_rate": learning_rate,
               "grad_norm": grad_norm.item()}
        self.metrics = {**self.metrics, **row}
        # at an eval step wandb gets this row with the eval row, so a kill during evaluation loses neither
        self.logger.log(row, step=self.step, commit=commit)
        self.loss_sum.zero_()
        self.loss_count = 0

    def evaluate(self) -> None:
        config, step, videos = self.config, self.step, self.run_dir / "videos"
        results = evaluate(self.model, self.envs, config.target_returns, config.eval_episodes, config.eval_seed,
                           self.data.state_mean, self.data.state_std, config.reward_scale, self.loss_sum.device,
                           video_prefix=str(videos / f"step{step}"), eval_reset=config.eval_reset)
        scores = eval_metrics(results, self.source.ref_min_score, self.source.ref_max_score)
        if self.val is not None:
            scores["val_loss"] = validation_loss(self.model, self.val)
        self.logger.log(scores, step=step, videos=sorted(videos.glob(f"step{step}_*.mp4")))
        self.metrics.update(scores)
        tqdm.write(format_eval_table(step, scores, config.target_returns))
        top_target = max(config.target_returns)  # "best" is judged at the highest target, as the tables report
        score = scores.get(f"eval/{top_target}_normalized_score_mean", scores[f"eval/{top_target}_return_mean"])
        improved, self.best_score = score > self.best_score, max(self.best_score, score)
        self.save(*(("best.pt", "latest.pt") if improved else ("latest.pt",)))


def train(config: TrainConfig) -> Dict[str, float]:
    """Train, evaluate and checkpoint every eval_every steps -> the last metrics. A run_dir holding a run (its
    config.yaml) resumes from its latest.pt, or from latest.prev.pt, with a warning, when that is damaged or missing."""
    resume, run_dir = None, Path(config.run_dir or ".")
    if config.run_dir is not None and (run_dir / "config.yaml").exists():
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # decoded by saved_config
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read {run_dir / 'config.yaml'} ({type(err).__name__}); "
                            "restore it, or give a new run_dir") from None
        config = saved_config(config, saved, allowed=("run_dir", "device", "eval_workers", "tf32"))
        latest, previous = (checkpoint_dir(config, run_dir) / name for name in ("latest.pt", "latest.prev.pt"))
        try:
            resume = load_checkpoint(latest) if latest.exists() or previous.exists() else None  # None: none yet
        except UserError as err:  # damaged, or missing between the two renames of a write: one interval back
            if not previous.exists():
                raise
            print(f"warning: {err}; resuming from {previous}, one checkpoint interval earlier", file=sys.stderr)
            if latest.exists():  # set aside: the next checkpoint must not rotate it into latest.prev.pt
                latest.replace(latest.with_name("latest.damaged.pt"))
            resume = load_checkpoint(previous)
        if missing := [k for k in RESUME_KEYS if resume is not None and k not in resume]:
            raise UserError(f"{latest.parent}'s checkpoint cannot resume a run (it lacks {missing}); start a new run_dir")
    if resume is not None and resume["step"] >= config.update_steps:
        print(f"{config.run_dir} has finished all {config.update_steps} steps; nothing to do")
        return resume["metrics"]
    validate_config(config)
    run = Run(config, resume)
    device = run.loss_sum.device
    train_model = torch.compile(run.model) if config.compile else run.model  # evaluation runs the eager model
    bf16 = config.bf16 and device.type == "cuda"
    micro_batch = config.micro_batch or (config.batch_size if device.type == "cuda" else 64)
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # first step with a NaN/inf loss
    stop = StopSignal()
    try:
        progress = tqdm(range(run.step + 1, config.update_steps + 1), initial=run.step,
                        total=config.update_steps, desc="train", dynamic_ncols=True)
        for step in progress:
            run.step = step
            run.optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(train_model, run.sampler.sample(config.batch_size), micro_batch, bf16,
                                    config.loss_reduction, config.padding_mask)
            learning_rate, grad_norm = optimizer_step(run.model, run.optimizer, run.scheduler, config.clip_grad)
            run.loss_sum += loss
            run.loss_count += 1
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), step, first_bad_step)
            is_eval = step % config.eval_every == 0 or step == config.update_steps
            stop_signal = stop.received  # read once: a signal arriving later in this step is handled next step
            if step % config.log_every == 0 or step == config.update_steps:
                run.check_finite(first_bad_step)
                run.log_training(learning_rate, grad_norm, commit=not is_eval)
                progress.set_postfix(loss=f"{run.metrics['train_loss']:.4f}", lr=f"{learning_rate:.2e}")
            if is_eval or stop_signal is not None:
                run.check_finite(first_bad_step)
                if is_eval:
                    run.evaluate()
                else:
                    run.save("latest.pt")
            if stop_signal is not None and step < config.update_steps:
                progress.close()
                print(f"stopped at step {step}; checkpoint {run.ckpt_dir / 'latest.pt'}. Resume with:\n"
                      f"  python algorithms/dt.py --run_dir {run.run_dir}")
                raise SystemExit(130 if stop_signal == signal.SIGINT else 0)  # the shell's code for Ctrl+C; else done
    finally:
        stop.restore()
        run.logger.finish()
        run.envs.close()
    print(f"checkpoints: {run.ckpt_dir / 'latest.pt'} (step {config.update_steps}), {run.ckpt_dir / 'best.pt'} "
          f"(best {run.best_score:.2f} at target {max(config.target_returns)})")
    return run.metrics


# --- Main -------------------------------------------------------------------------------------
def parse_config(args: Optional[List[str]] = None) -> TrainConfig:
    """The config from --config_path YAML and command-line fields, with one-line errors. config.given (not a field):
    the fields the user set (`--field value`, `--field=value`, --config_path's keys), for resume and eval-only."""
    args = sys.argv[1:] if args is None else args
    try:
        config = pyrallis.parse(config_class=TrainConfig, args=args)
        paths = [a.split("=", 1)[1] for a in args if a.startswith("--config_path=")]
        paths += [value for flag, value in zip(args, args[1:]) if flag == "--config_path"]
        config.given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}.union(
            *(yaml.safe_load(Path(path).read_text()) or {} for path in paths))
        return config
    except FileNotFoundError as err:
        raise UserError(f"config file {err.filename} does not exist") from None
    except pyrallis.utils.ParsingError as err:
        raise UserError(f"invalid config: {str(err).splitlines()[0]} (lists are written as '[3600,1800]')") from None
    except Exception as err:  # pyrallis reports a field the config does not have with a bare Exception
        raise UserError(f"invalid config: {str(err).splitlines()[0]}; `--help` lists the fields") from None


STORAGE_ERRORS = {errno.ENOSPC: "the disk or quota holding {} is full", errno.EDQUOT: "the disk or quota holding {} is "
                  "full", errno.EROFS: "{} became read-only", errno.ENOENT: "{} was deleted or moved away",
                  errno.EACCES: "{} is not writable any more"}


def main(args: Optional[List[str]] = None) -> None:
    keep_freed_memory()
    try:
        config = parse_config(args)
        if config.eval_checkpoint is not None:
            evaluate_checkpoint(config)
        else:
            train(config)
    except KeyboardInterrupt:
        print("interrupted; the latest checkpoint is kept (resume with --run_dir <run folder>)", file=sys.stderr)
        sys.exit(130)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # storage failing mid-run (start-up problems are UserErrors already)
        if err.errno not in STORAGE_ERRORS:
            raise
        run_dir = config.run_dir  # parse_config raises UserErrors only: config is set
        resume = f"resume with: python algorithms/dt.py --run_dir {run_dir}" if run_dir else "run the command again"
        print(f"error: {STORAGE_ERRORS[err.errno].format(Path(err.filename).parent if err.filename else run_dir)} "
              f"({err.strerror}: {err.filename}); free space or make it writable again, then {resume}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
