"""The transformer: causality, padding, action bound, parameter count, init, loss, optimisation."""
import json

import numpy as np
import pytest
import torch

import dt


def small_model(**kwargs):
    args = dict(state_dim=5, action_dim=2, seq_len=6, episode_len=50, embedding_dim=32, num_layers=2, num_heads=2)
    args.update(kwargs)
    torch.manual_seed(0)
    return dt.DecisionTransformer(**args).eval()


def random_inputs(model, batch=3, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, steps, model.state_dim, generator=g)
    actions = torch.rand(batch, steps, model.action_dim, generator=g) * 2 - 1
    returns = torch.randn(batch, steps, generator=g)
    timesteps = torch.randint(0, model.episode_len, (batch, 1), generator=g) + torch.arange(steps)
    return states, actions, returns, timesteps


@pytest.mark.parametrize("step", [0, 2, 5])
def test_causality_later_tokens_never_change_earlier_predictions(step):
    model = small_model()
    states, actions, returns, timesteps = random_inputs(model)
    base = model(states, actions, returns, timesteps)
    for name in ("states", "actions", "returns"):
        s, a, r = states.clone(), actions.clone(), returns.clone()
        {"states": s, "actions": a, "returns": r}[name][:, step:] += 3.0
        out = model(s, a, r, timesteps)
        # a_t comes after s_t, so changing a_t may only affect predictions of later steps
        unchanged = step + 1 if name == "actions" else step
        torch.testing.assert_close(out[:, :unchanged], base[:, :unchanged], rtol=0, atol=1e-6)
        if unchanged < out.shape[1]:
            assert not torch.allclose(out[:, unchanged:], base[:, unchanged:], atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_inputs_never_change_real_predictions(side):
    model = small_model()
    states, actions, returns, timesteps = random_inputs(model)
    mask = torch.ones(3, 6, dtype=torch.bool)
    if side == "right":  # training's padding: causal attention alone already hides these keys
        mask[0, 4:] = False
        mask[1, 1:] = False
    else:  # real steps after padded ones: only padding_mask hides the padded keys from them
        mask[0, :2] = False
        mask[1, :5] = False
    base = model(states, actions, returns, timesteps, padding_mask=mask)
    s, a, r = states.clone(), actions.clone(), returns.clone()
    for x in (s, a, r):
        x[~mask] = 7.0
    out = model(s, a, r, timesteps, padding_mask=mask)
    assert not out.isnan().any()  # left padding gives fully masked query rows: no NaN may leak into real rows
    torch.testing.assert_close(out[mask], base[mask], rtol=0, atol=1e-6)
    assert not torch.allclose(out[~mask], base[~mask], atol=1e-4)  # padded positions do see their inputs
    if side == "left":  # the same change without the mask reaches the real predictions: the mask is what hides it
        unmasked = model(s, a, r, timesteps) - model(states, actions, returns, timesteps)
        assert unmasked[mask].abs().max() > 1e-3
    # with nothing padded the mask changes nothing
    full = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(model(states, actions, returns, timesteps, full),
                               model(states, actions, returns, timesteps), rtol=0, atol=1e-6)


def test_actions_bounded_by_max_action():
    model = small_model(max_action=2.5)
    with torch.no_grad():
        model.action_head[0].weight.mul_(500.0)  # saturate the tanh
    states, actions, returns, timesteps = random_inputs(model, batch=16)
    out = model(states * 10, actions, returns * 10, timesteps)
    assert out.abs().max() <= 2.5
    assert out.abs().max() > 2.4  # scaled by max_action, not clipped at 1


def test_parameter_count_of_default_hopper_model():
    model = dt.DecisionTransformer(state_dim=11, action_dim=3)  # E=128, 3 layers, K=20, episode_len=1000
    E, S, A, K, T, L = 128, 11, 3, 20, 1000, 3
    embeddings = (T + K) * E + (1 * E + E) + (S * E + E) + (A * E + E) + 2 * E  # time, R, s, a, LayerNorm
    block = 2 * E + (E * 3 * E + 3 * E) + (E * E + E) + 2 * E + (E * 4 * E + 4 * E) + (4 * E * E + E)
    head = 2 * E + (E * A + A)  # final LayerNorm, action Linear
    expected = embeddings + L * block + head
    assert expected == 728_579  # 133,120 embedding + 3 x 198,272 blocks + 643 head
    assert sum(p.numel() for p in model.parameters()) == expected


def corl_attention(embedding_dim: int, num_heads: int) -> torch.nn.MultiheadAttention:
    """CORL's attention layer as its DecisionTransformer initialises it: its _init_weights visits only Linear
    and Embedding modules, so out_proj gets N(0, 0.02) and the bare in_proj_weight keeps torch's own init."""
    attention = torch.nn.MultiheadAttention(embedding_dim, num_heads, dropout=0.1, batch_first=True)
    torch.nn.init.normal_(attention.out_proj.weight, mean=0.0, std=0.02)
    torch.nn.init.zeros_(attention.out_proj.bias)
    return attention


def test_default_init_is_corls_effective_init():
    torch.manual_seed(0)
    model = dt.DecisionTransformer(state_dim=11, action_dim=3)  # E=128, the default
    corl = corl_attention(128, 1)
    for block in model.blocks:
        ours, theirs = block.attention.qkv.weight, corl.in_proj_weight
        assert ours.shape == theirs.shape == (3 * 128, 128)
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.02)
        assert ours.std().item() == pytest.approx((1 / 256) ** 0.5, rel=0.02)  # xavier: 0.0625, not 0.02
        bound = (6 / (128 + 3 * 128)) ** 0.5  # uniform on [-bound, bound], as torch's MHA
        assert theirs.abs().max() <= bound and bound * 0.99 < ours.abs().max() <= bound
        assert (block.attention.qkv.bias == 0).all() and (corl.in_proj_bias == 0).all()
        assert block.attention.proj.weight.std().item() == pytest.approx(corl.out_proj.weight.std().item(), rel=0.05)
    # everything else as GPT-2: N(0, 0.02) weights, zero biases, unit LayerNorms
    weight = model.blocks[0].mlp[0].weight
    assert abs(weight.std().item() - 0.02) < 0.001 and abs(model.timestep_emb.weight.std().item() - 0.02) < 0.001
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 3 and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_normal_init_gives_the_qkv_projection_n_0_002_too():
    torch.manual_seed(0)
    model = dt.build_model(dt.TrainConfig(init="normal"), 11, 3)
    for block in model.blocks:
        qkv = block.attention.qkv.weight
        assert qkv.mean().item() == pytest.approx(0.0, abs=5e-4)
        assert qkv.std().item() == pytest.approx(0.02, rel=0.02)  # xavier would be 0.0625 at E=128
    assert model.timestep_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)


def authors_model(state_dim=11, action_dim=3, hidden=128, layers=3, max_ep_len=1000):
    """kzl/decision-transformer gym/'s model, built its way: a transformers GPT-2 (relu, 4E MLP) whose own init
    covers only its modules, and torch-default embeddings, embedding LayerNorm and action head around it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=1, n_embd=hidden, n_layer=layers, n_head=1, n_inner=4 * hidden, activation_function="relu",
        n_positions=1024, resid_pdrop=0.1, attn_pdrop=0.1))
    # their trajectory_gpt2.py is transformers 4.5.1's GPT-2 without wpe; transformers >= 4.12 scales c_proj's init
    # to 0.02 / sqrt(2 n_layer), 4.5.1 gives it N(0, 0.02) as every other weight
    for block in gpt2.h:
        for c_proj in (block.attn.c_proj, block.mlp.c_proj):
            torch.nn.init.normal_(c_proj.weight, std=0.02)
    outside = {"embed_timestep": torch.nn.Embedding(max_ep_len, hidden), "embed_return": torch.nn.Linear(1, hidden),
               "embed_state": torch.nn.Linear(state_dim, hidden), "embed_action": torch.nn.Linear(action_dim, hidden),
               "embed_ln": torch.nn.LayerNorm(hidden), "predict_action": torch.nn.Linear(hidden, action_dim)}
    return gpt2, outside


def assert_same_distribution(ours, theirs, name):
    """Same scale (std within 25%: the inits told apart differ 3x to 50x), same centre, same bound."""
    ours, theirs = ours.detach().float(), theirs.detach().float()
    spread = theirs.std().item()
    if theirs.numel() >= 30:
        assert ours.std().item() == pytest.approx(spread, rel=0.25, abs=1e-7), name
        assert abs(ours.mean().item() - theirs.mean().item()) <= 4 * spread * (2 / theirs.numel()) ** 0.5 + 1e-7, name
    assert ours.abs().max().item() <= 1.5 * theirs.abs().max().item() + 1e-7, name  # a uniform's bound, a normal's tail


def test_kzl_init_is_the_dt_authors_model():
    gpt2, outside = authors_model()
    torch.manual_seed(1)
    model = dt.build_model(dt.TrainConfig(init="kzl", activation="relu"), 11, 3)
    pairs = [(model.timestep_emb.weight, outside["embed_timestep"].weight, "timestep embedding: N(0, 1)"),
             (model.out_norm.weight, gpt2.ln_f.weight, "final LayerNorm"), (model.out_norm.bias, gpt2.ln_f.bias, "")]
    for name in ("return", "state", "action"):  # kaiming-uniform weights, uniform biases
        ours, theirs = getattr(model, f"{name}_emb"), outside[f"embed_{name}"]
        pairs += [(ours.weight, theirs.weight, f"{name} embedding"), (ours.bias, theirs.bias, f"{name} bias")]
    head = model.action_head[0]
    pairs += [(head.weight, outside["predict_action"].weight, "action head"),
              (head.bias, outside["predict_action"].bias, "action head bias"),
              (model.emb_norm.weight, outside["embed_ln"].weight, "embedding LayerNorm")]
    for block, theirs in zip(model.blocks, gpt2.h):  # GPT-2's Conv1D stores weights transposed
        pairs += [(block.attention.qkv.weight, theirs.attn.c_attn.weight.T, "q/k/v: N(0, 0.02)"),
                  (block.attention.qkv.bias, theirs.attn.c_attn.bias, "q/k/v bias: 0"),
                  (block.attention.proj.weight, theirs.attn.c_proj.weight.T, "attention output"),
                  (block.mlp[0].weight, theirs.mlp.c_fc.weight.T, "MLP in"), (block.mlp[2].weight, theirs.mlp.c_proj.weight.T, "MLP out"),
                  (block.norm1.weight, theirs.ln_1.weight, "LayerNorm 1"), (block.norm2.bias, theirs.ln_2.bias, "LayerNorm 2")]
        assert isinstance(block.mlp[1], torch.nn.ReLU)
    for ours, theirs, name in pairs:
        assert ours.shape == theirs.shape or name.startswith("timestep"), name
        assert_same_distribution(ours, theirs, name)
    assert model.timestep_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)  # not 0.02: torch's default
    assert model.action_head[0].bias.abs().min() > 0  # torch's uniform bias, not zeros
    # no positional embedding: only the timestep table, and a window's predictions do not depend on where it sits
    assert [name for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)] == ["timestep_emb"]
    states, actions, returns, timesteps = random_inputs(small_model(init="kzl"), batch=2)
    small = small_model(init="kzl")
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, :2] = False  # the last four steps moved two steps later in the window
    torch.testing.assert_close(small(states, actions, returns, timesteps, padding_mask=mask)[:, 2:],
                               small(states[:, 2:], actions[:, 2:], returns[:, 2:], timesteps[:, 2:]), rtol=1e-5, atol=1e-5)


def test_attention_init_still_loads_as_init(tmp_path, capsys):
    """YAMLs of the old field keep loading: attention_init xavier is init corl, normal is normal, with a warning."""
    for old, new in (("xavier", "corl"), ("normal", "normal")):
        (tmp_path / "old.yaml").write_text(f"attention_init: {old}\n")
        config = dt.parse_config(["--config_path", str(tmp_path / "old.yaml")])
        dt.validate_config(config)
        assert (config.init, config.attention_init) == (new, None)
        assert f"attention_init was renamed init: attention_init {old} is read as init {new}" in capsys.readouterr().err


def test_masked_mse_is_mean_over_real_entries():
    pred = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, True, False]])
    assert dt.masked_mse(pred, target, mask).item() == pytest.approx((1 + 1 + 4 + 4) / 4)


def test_a_few_hundred_steps_on_a_fixed_batch_drive_the_loss_down():
    model = small_model(embedding_dim=32, num_layers=1, num_heads=1, attention_dropout=0.0,
                        residual_dropout=0.0, embedding_dropout=0.0).train()
    states, _, returns, timesteps = random_inputs(model, batch=16)
    target_actions = torch.tanh(states[..., :2] + 0.5 * returns[..., None])  # a learnable target
    mask = torch.ones(16, 6, dtype=torch.bool)
    mask[:4, 3:] = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(300):
        loss = dt.masked_mse(model(states, target_actions * mask[..., None], returns, timesteps, mask), target_actions, mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert np.isfinite(losses).all()


def untrimmed_forward(model, states, actions, returns, timesteps, padding_mask):
    """The textbook forward: all 3T tokens through every block, predictions read at the s_t tokens."""
    batch, steps = states.shape[:2]
    time_emb = model.timestep_emb(timesteps)
    tokens = torch.stack([model.return_emb(returns[..., None]) + time_emb, model.state_emb(states) + time_emb,
                          model.action_emb(actions) + time_emb], dim=2).reshape(batch, 3 * steps, -1)
    x = model.emb_norm(tokens)
    allowed = torch.ones(3 * steps, 3 * steps, dtype=torch.bool).tril() & padding_mask.repeat_interleave(3, 1)[:, None, :]
    for block in model.blocks:
        x = block(x, allowed[:, None])
    return model.action_head(model.out_norm(x))[:, 1::3] * model.max_action


def test_trimmed_forward_predicts_what_the_untrimmed_one_does():
    """Dropping a_T and giving the last block only the state tokens' queries changes no prediction."""
    model = small_model(num_layers=3, max_action=2.0)
    states, actions, returns, timesteps = random_inputs(model, batch=4)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False  # right padding, as the sampler makes
    torch.testing.assert_close(model(states, actions, returns, timesteps, padding_mask=mask),
                               untrimmed_forward(model, states, actions, returns, timesteps, mask), rtol=1e-5, atol=1e-6)
    no_padding = torch.ones(4, 6, dtype=torch.bool)
    torch.testing.assert_close(model(states, actions, returns, timesteps),
                               untrimmed_forward(model, states, actions, returns, timesteps, no_padding), rtol=1e-5, atol=1e-6)


def test_last_only_equals_last_step_of_full_forward():
    model = small_model(num_layers=3)
    states, actions, returns, timesteps = random_inputs(model, batch=4)
    full = model(states, actions, returns, timesteps)
    for steps in (1, 2, 6):
        last = model(states[:, :steps], actions[:, :steps], returns[:, :steps], timesteps[:, :steps], last_only=True)
        torch.testing.assert_close(last, model(states[:, :steps], actions[:, :steps], returns[:, :steps],
                                               timesteps[:, :steps])[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(states, actions, returns, timesteps, last_only=True), full[:, -1], rtol=1e-5, atol=1e-6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, :2] = False  # left padding, as an evaluation with a mask would use
    padded = model(states, actions, returns, timesteps, padding_mask=mask, last_only=True)
    alone = model(states[:, 2:], actions[:, 2:], returns[:, 2:], timesteps[:, 2:], last_only=True)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def explicit_attention(module, x, allowed):
    """softmax(Q K^T / sqrt(d)) V with disallowed scores at -inf, heads split and merged by hand."""
    batch, length, dim = x.shape
    heads = module.num_heads
    q, k, v = (x @ module.qkv.weight.T + module.qkv.bias).split(dim, dim=-1)
    split = lambda t: t.reshape(batch, length, heads, dim // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = (weights @ split(v)).transpose(1, 2).reshape(batch, length, dim)
    return y @ module.proj.weight.T + module.proj.bias


def test_fused_attention_matches_explicit_reference():
    torch.manual_seed(0)
    attention = dt.CausalSelfAttention(16, num_heads=2, attention_dropout=0.0).eval()
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 9, 16)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(x, None), explicit_attention(attention, x, causal), rtol=1e-5, atol=1e-5)
    keys = torch.ones(3, 9, dtype=torch.bool)
    keys[0, 6:] = False
    keys[2, 2:] = False
    allowed = (causal & keys[:, None, :])[:, None]  # [B, 1, L, L]
    torch.testing.assert_close(attention(x, allowed), explicit_attention(attention, x, allowed), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(x, allowed[:, :, -1:], queries=slice(-1, None))[:, 0],
                               explicit_attention(attention, x, allowed)[:, -1], rtol=1e-5, atol=1e-5)
    every_third = slice(1, None, 3)  # the state tokens, as the last block of a training forward asks
    torch.testing.assert_close(attention(x, allowed[:, :, every_third], queries=every_third),
                               explicit_attention(attention, x, allowed)[:, every_third], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(x, causal[every_third], queries=every_third),
                               explicit_attention(attention, x, causal)[:, every_third], rtol=1e-5, atol=1e-5)


def test_attention_dropout_acts_on_attention_weights_in_training_only():
    torch.manual_seed(0)
    attention = dt.CausalSelfAttention(16, num_heads=1, attention_dropout=0.5)
    x = torch.randn(2, 7, 16)
    assert not torch.allclose(attention.train()(x, None), attention(x, None))  # random masks differ
    torch.testing.assert_close(attention.eval()(x, None), attention(x, None))


def test_train_gives_the_loss_curve_of_a_plain_loop(tmp_path, hopper_file, monkeypatch):
    """train() (compile and autocast off) computes exactly what a plain sample/forward/backward/step loop does."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = dt.TrainConfig(env_name="hopper-medium-v2", dataset_dir=str(hopper_file.parent), update_steps=12,
                            eval_every=12, log_every=1, batch_size=8, seq_len=5, episode_len=100, embedding_dim=32,
                            num_layers=2, warmup_steps=4, learning_rate=1e-3, eval_episodes=1, target_returns=(100.0,),
                            runs_dir=str(tmp_path), device="cpu", eval_workers=0)
    dt.train(config)
    (metrics_file,) = tmp_path.glob("*/metrics.jsonl")
    logged = [json.loads(line)["train_loss"] for line in metrics_file.read_text().splitlines() if "train_loss" in line]

    data = dt.prepare_data(dt.load_d4rl_hdf5(hopper_file), config.reward_scale)
    dt.set_seed(config.train_seed)
    sampler = dt.WindowSampler(data, config.seq_len, torch.device("cpu"), seed=config.train_seed)
    model = dt.DecisionTransformer(11, 3, seq_len=5, episode_len=100, embedding_dim=32, num_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / 4, 1.0))
    plain = []
    for _ in range(12):
        states, actions, returns, timesteps, mask = sampler.sample(8)
        loss = dt.masked_mse(model(states, actions, returns, timesteps, mask), actions, mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        scheduler.step()
        plain.append(loss.item())
    np.testing.assert_allclose(logged, plain, rtol=1e-6)
    assert plain[-1] < plain[0]


def test_micro_batches_give_the_full_batch_loss_and_gradient():
    model = small_model(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0).train()
    states, actions, returns, timesteps = random_inputs(model, batch=10)
    mask = torch.ones(10, 6, dtype=torch.bool)
    mask[3, 2:] = False
    mask[7, 4:] = False
    batch = (states, actions, returns, timesteps, mask)
    full = dt.masked_mse(model(states, actions, returns, timesteps, mask), actions, mask)
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = dt.forward_backward(model, batch, micro_batch=3, bf16=False)  # chunks of 3, 3, 3, 1
    torch.testing.assert_close(loss, full.detach(), rtol=1e-6, atol=1e-7)
    for grad, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
