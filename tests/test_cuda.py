"""The CUDA paths: bf16 autocast, fused AdamW, torch.compile, the on-device sampler, GPU evaluation with env
workers, a GPU checkpoint resumed on CPU, and the SDPA kernels with fully padded query rows.

Tests marked cuda are skipped without a GPU (conftest.py); `pytest -m cuda` runs them alone, and
benchmarks/gpu_check.sh runs that. Where a check means something on CPU too it also runs there, unmarked,
so that its logic is exercised on every machine.
"""
import dataclasses
import signal

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import dt
from test_eval import hopper_model, strict_hopper
from test_resume import RUN, env, rows, run, start, wait_for  # noqa: F401 (env: the fixture of dt's subprocess env)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ON_CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
# bf16 keeps 8 significant bits (rounding errors up to 2^-8); measured on CPU with the same autocast policy: loss within
# 8e-4 and gradients within 1.2e-2 (relative norm of the difference) of fp32 over the first 100 updates
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-2, 5e-2


@pytest.fixture(autouse=True)
def ieee_float32():
    """These tests compare float32 paths number by number: TF32 off, whatever an earlier dt.train() set (tf32)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def hopper_data(hopper_file):
    return dt.prepare_data(dt.load_d4rl_hdf5(hopper_file), reward_scale=0.001)


def no_dropout_config(**fields) -> dt.TrainConfig:
    """The default model (E=128, 3 layers, K=20) without dropout, so that two runs can be compared number by number."""
    return dt.TrainConfig(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, **fields)


def loss_and_grad(model, batch, bf16: bool):
    """dt's forward/backward of the whole batch at once -> (loss, all gradients as one vector)."""
    model.zero_grad(set_to_none=True)
    device = batch[0].device
    if device.type == "cuda":
        loss = dt.forward_backward(model, batch, len(batch[0]), bf16)
    else:  # dt autocasts on CUDA only: the same bf16 policy on CPU, to exercise this comparison everywhere
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = dt.forward_backward(model, batch, len(batch[0]), False)
    return loss, torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_bf16_training_step_matches_fp32(hopper_data, device):
    device = torch.device(device)
    small = {} if device.type == "cuda" else dict(embedding_dim=64, num_layers=2)  # CPU bf16 is slow
    config = no_dropout_config(learning_rate=1e-3, warmup_steps=1, **small)
    torch.manual_seed(0)
    model, optimizer, scheduler = dt.build_training(config, 11, 3, device)
    sampler = dt.WindowSampler(hopper_data, config.seq_len, device, seed=0)
    for _ in range(10):  # away from the initialisation, where gradients are nearly those of a constant model
        optimizer.zero_grad(set_to_none=True)
        dt.forward_backward(model, sampler.sample(64), 64, False)
        dt.optimizer_step(model, optimizer, scheduler, config.clip_grad)
    batch = sampler.sample(128)
    # what autocast changes is the loss and the gradients; AdamW then runs in fp32 on the fp32 weights either way
    loss32, grad32 = loss_and_grad(model, batch, bf16=False)
    loss16, grad16 = loss_and_grad(model, batch, bf16=True)
    assert abs(loss16.item() / loss32.item() - 1) < BF16_LOSS_RTOL
    assert 0 < relative_error(grad16, grad32) < BF16_GRAD_RTOL  # > 0: bf16 really ran, its rounding shows


@pytest.mark.cuda
def test_fused_adamw_equals_unfused(hopper_data):
    config = no_dropout_config(learning_rate=1e-3, warmup_steps=5)
    torch.manual_seed(0)
    fused = dt.build_training(config, 11, 3, CUDA)
    plain = dt.build_training(dataclasses.replace(config, fused_adamw=False), 11, 3, CUDA)
    assert fused[1].param_groups[0]["fused"] and not plain[1].param_groups[0]["fused"]
    plain[0].load_state_dict(fused[0].state_dict())
    sampler = dt.WindowSampler(hopper_data, config.seq_len, CUDA, seed=0)
    for _ in range(10):  # both optimizers get the same gradients: only the AdamW kernels differ
        fused[1].zero_grad(set_to_none=True)
        dt.forward_backward(fused[0], sampler.sample(256), 256, False)
        for p, q in zip(fused[0].parameters(), plain[0].parameters()):
            q.grad = p.grad.clone()
        dt.optimizer_step(*fused, config.clip_grad)
        dt.optimizer_step(*plain, config.clip_grad)
    # 10 updates of ~1e-3 each: the kernels' different float orderings leave differences of ~1e-9
    for (name, p), q in zip(fused[0].named_parameters(), plain[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    for key, value in fused[1].state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(value[name], plain[1].state_dict()["state"][key][name], rtol=1e-5, atol=1e-9)


@pytest.mark.cuda
def test_compiled_model_equals_eager(hopper_data):
    config = no_dropout_config()
    torch.manual_seed(0)
    model = dt.build_model(config, 11, 3).to(CUDA).train()
    batch = dt.WindowSampler(hopper_data, config.seq_len, CUDA, seed=0).sample(512)
    eager_loss, eager_grad = loss_and_grad(model, batch, bf16=False)
    compiled_loss, compiled_grad = loss_and_grad(torch.compile(model), batch, bf16=False)  # as train() compiles
    # fp32 either way (TF32 stays off); inductor fuses and reorders sums, which moves the last digits only
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    assert relative_error(compiled_grad, eager_grad) < 1e-4


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_sampler_on_device_gives_the_cpu_samplers_windows(hopper_data, device):
    device = torch.device(device)
    sampler = dt.WindowSampler(hopper_data, 20, device, seed=3)
    batch = sampler.sample(4096)
    # the start indices sample() drew: the same draw from a generator of that device in the same state
    start = torch.randint(0, len(hopper_data.states), (4096,), device=device,
                          generator=torch.Generator(device=device).manual_seed(3))
    expected = dt.WindowSampler(hopper_data, 20, CPU, seed=3).windows(start.cpu())
    for got, want in zip(batch, expected):
        assert got.device.type == device.type
        assert torch.equal(got.cpu(), want)  # gathers and masks only: equal bit for bit
    assert not expected[-1].all()  # some windows run past their trajectory's end (padding is compared too)


@pytest.mark.cuda
def test_gpu_evaluation_with_env_workers_equals_in_process():
    model = hopper_model(episode_len=60).to(CUDA)
    args = ((3600.0, 1800.0), 3, 11, np.zeros(11, np.float32), np.ones(11, np.float32), 0.001, CUDA)
    envs = dt.EvalEnvs(strict_hopper, 6)
    workers = dt.EvalEnvs(strict_hopper, 6, workers=2)
    try:
        in_process = dt.evaluate(model, envs, *args)
        stepped = dt.evaluate(model, workers, *args)  # on GPU the model runs here and the workers step the envs
    finally:
        envs.close()
        workers.close()
    assert workers.workers == 2
    for target in (3600.0, 1800.0):
        # the same forward passes on the same GPU: equal, where a worker-side CPU rollout would differ in rounding
        np.testing.assert_array_equal(stepped[target], in_process[target])


@pytest.mark.cuda
def test_checkpoint_written_on_gpu_resumes_on_cpu(env, tmp_path):  # noqa: F811 (env: the imported fixture)
    marker = tmp_path / "hanging"  # the step-200 checkpoint write hangs until kill -9; latest.pt stays at step 100
    gpu = ["--device", "cuda", "--bf16", "true", "--deterministic_torch", "false", "--run_dir", "run"]
    proc = start([*RUN, *gpu], env, tmp_path, "hang_in_checkpoint_write", marker)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    checkpoint = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert checkpoint["step"] == 100 and checkpoint["config"]["device"] == "cuda"

    result = run(["--run_dir", "run", "--device", "cpu"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 100" in result.stdout and "device cpu" in result.stdout
    resumed = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert resumed["step"] == 300 and resumed["config"]["device"] == "cpu"
    assert not torch.equal(resumed["model_state"]["action_head.0.weight"], checkpoint["model_state"]["action_head.0.weight"])
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged if "train_loss" in r] == list(range(10, 301, 10))  # no row lost or repeated
    assert [r["step"] for r in logged if "train_loss" not in r] == [100, 200, 300]
    assert all(np.isfinite(v) for r in logged for v in r.values())


def padded_inputs(device: torch.device, state_dim: int = 11, action_dim: int = 3, steps: int = 6):
    """Left-padded inputs: the first two steps of every row and five of row 1 are padding, so the queries of
    those tokens see no real key at all (fully masked rows of the attention)."""
    g = torch.Generator().manual_seed(0)
    states, actions = torch.randn(4, steps, state_dim, generator=g), torch.rand(4, steps, action_dim, generator=g) * 2 - 1
    returns, timesteps = torch.randn(4, steps, generator=g), torch.arange(steps).repeat(4, 1) + 10
    mask = torch.ones(4, steps, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, :5] = False
    return [x.to(device) for x in (states, actions, returns, timesteps, mask)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, backend", [
    *[pytest.param("cpu", b, id=f"cpu-{b.name}") for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION)],
    *[pytest.param("cuda", b, marks=pytest.mark.cuda, id=f"cuda-{b.name}") for b in (
        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)]])
def test_fully_padded_query_rows_give_no_nan(device, backend, dtype):
    device = torch.device(device)
    torch.manual_seed(0)
    model = dt.build_model(no_dropout_config(embedding_dim=64, num_layers=3, num_heads=2), 11, 3).to(device).train()
    states, actions, returns, timesteps, mask = padded_inputs(device)
    with sdpa_kernel([backend]), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        try:
            predicted = model(states, actions, returns, timesteps, padding_mask=mask)
        except RuntimeError as err:  # flash (and cuDNN on some versions) take no attn_mask: masked calls never reach them
            if "No available kernel" not in str(err) or backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION):
                raise
            pytest.skip(f"{backend.name} does not run masked attention ({str(err).splitlines()[0]})")
        alone = model(states[:, 2:], actions[:, 2:], returns[:, 2:], timesteps[:, 2:], padding_mask=mask[:, 2:])
    assert torch.isfinite(predicted).all()
    predicted.float()[mask].square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # padded rows leak no NaN into gradients
    # the real steps predict what they predict without the padded steps in front of them
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(predicted[:, 2:][mask[:, 2:]].float(), alone[mask[:, 2:]].float(), **tolerance)
