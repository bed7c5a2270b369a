"""PPO with a critic: GAE against a numpy loop, the policy loss with per-token advantages and the clipped value
loss against numpy closed forms (values and gradients), the value model's layout, one optimizer over both
groups, and a tiny PPO run that learns in FP16 and BF16 with the critic in the same jitted step."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.loss_scale import DynamicLossScale
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.rl import ppo
from jaxrl_fp16.rl.advantages import gae_advantages, masked_whiten
from jaxrl_fp16.rl.losses import LOSSES, LossConfig, LossInputs, compute_loss
from jaxrl_fp16.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO_CONFIG = os.path.join(ROOT, "configs", "matrix", "tiny_ppo.yaml")
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MAX_LEN = 11


# --- references ----------------------------------------------------------------------------------------------

def _rollout_mask(rng, B=6, prompt=3, max_response=6):
    """The trainer's layout: left-padded prompt, then the response, right-padded; one row without a response."""
    mask = np.zeros((B, prompt + max_response), bool)
    lengths = rng.integers(1, max_response + 1, size=B)
    lengths[1] = 0
    lengths[2] = max_response
    for b, n in enumerate(lengths):
        mask[b, prompt:prompt + n] = True
    return mask


def _garbage(rng, x, mask):
    x = np.array(x, np.float64)
    x[~mask] = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=int((~mask).sum()))
    return x


def _gae_loop(rewards, values, mask, gamma, lam):
    """GAE one row and one response token at a time, backwards, in float64."""
    B, T = mask.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        if not toks:
            continue
        if rewards.ndim == 1:
            r = {t: 0.0 for t in toks}
            r[toks[-1]] = float(rewards[b])
        else:
            r = {t: float(rewards[b, t]) for t in toks}
        next_value, next_adv = 0.0, 0.0
        for t in reversed(toks):
            delta = r[t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
    return adv, ret


def _coefs(mask, aggregation):
    """d agg(x) / d x_bt of each aggregation (0 off the mask)."""
    n_B = mask.sum(-1)
    num_seqs = max(int((n_B > 0).sum()), 1)
    if aggregation == "token-mean":
        coef = np.full(mask.shape, 1.0 / max(mask.sum(), 1))
    elif aggregation == "seq-mean-token-mean":
        coef = np.broadcast_to((1.0 / (num_seqs * np.maximum(n_B, 1)))[:, None], mask.shape)
    else:
        coef = np.full(mask.shape, 1.0 / (num_seqs * MAX_LEN))
    return np.where(mask, coef, 0.0)


def _policy_reference(algorithm, logp, old, mu, adv_BxT, mask, aggregation, cfg):
    """-agg(j) and d/d logp for pg, grpo and grpo_token_tis with per-token advantages, numpy closed form."""
    c = cfg.log_ratio_clamp
    log_r = np.where(mask, logp - old, 0.0)
    r = np.exp(np.clip(log_r, -c, c))
    dclamp = (np.abs(log_r) < c).astype(np.float64)
    a = np.where(mask, adv_BxT, 0.0)
    if algorithm == "pg":
        terms, dterms = a * np.where(mask, logp, 0.0), a
    else:
        clipped = np.clip(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a
        took_clip = clipped < r * a
        terms = np.where(took_clip, clipped, r * a)
        dterms = np.where(took_clip, 0.0, a * r * dclamp)
        if algorithm == "grpo_token_tis":
            w = np.minimum(np.exp(np.clip(np.where(mask, old - mu, 0.0), -c, c)), cfg.is_cap)
            terms, dterms = terms * w, dterms * w
    coef = _coefs(mask, aggregation)
    return -np.sum(coef * terms), -coef * dterms


def _value_reference(v, v_old, ret, mask, clip, aggregation):
    """0.5 agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) and d/dV, numpy closed form."""
    err = (v - ret) ** 2
    if clip is None:
        terms, took_clip = err, np.zeros_like(mask)
    else:
        err_clipped = (np.clip(v, v_old - clip, v_old + clip) - ret) ** 2
        took_clip = err_clipped > err  # only possible with V outside the range, where clip(V) is flat
        terms = np.maximum(err, err_clipped)
    coef = _coefs(mask, aggregation)
    grad = np.where(took_clip, 0.0, coef * (v - ret))
    return 0.5 * np.sum(np.where(mask, coef * terms, 0.0)), grad, took_clip[mask].mean()


def _f32(x):
    return np.asarray(np.asarray(x, np.float32), np.float64)


# --- GAE -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.97, 0.0)])
@pytest.mark.parametrize("per_token", [False, True])
def test_gae_matches_the_numpy_loop(gamma, lam, per_token):
    rng = np.random.default_rng(int(gamma * 100 + lam * 10) + per_token)
    mask = _rollout_mask(rng)
    values = _f32(rng.normal(size=mask.shape))
    rewards = _f32(rng.normal(size=mask.shape) if per_token else rng.normal(size=mask.shape[0]))
    want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
    if per_token:
        rewards = _garbage(rng, rewards, mask)
    rewards[1] = np.nan  # the row without a response
    fn = jax.jit(lambda r, v, m: gae_advantages(r, v, m, gamma=gamma, lam=lam))
    adv, ret = fn(jnp.asarray(rewards, jnp.float32), jnp.asarray(_garbage(rng, values, mask), jnp.float32),
                  jnp.asarray(mask))
    assert adv.dtype == jnp.float32 and adv.shape == mask.shape
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[~mask] == 0.0) and np.all(np.asarray(ret)[~mask] == 0.0)


def test_gae_closed_forms_and_gaps():
    rng = np.random.default_rng(0)
    mask = _rollout_mask(rng)
    values = rng.normal(size=mask.shape)
    rewards = rng.normal(size=mask.shape[0])
    # gamma = lam = 1: A_t = R - V_t and every return is the terminal reward.
    adv, ret = map(np.asarray, gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0))
    np.testing.assert_allclose(adv[mask], (rewards[:, None] - values)[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[mask], np.broadcast_to(rewards[:, None], mask.shape)[mask], rtol=1e-6)
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t, V = 0 after the last response token.
    adv, _ = map(np.asarray, gae_advantages(rewards, values, mask, gamma=0.9, lam=0.0))
    nxt = np.where(np.roll(mask, -1, axis=1) & mask, np.roll(values, -1, axis=1), 0.0)
    last = mask & ~np.roll(mask, -1, axis=1)
    want = np.where(last, rewards[:, None], 0.0) + 0.9 * nxt - values
    np.testing.assert_allclose(adv[mask], want[mask], rtol=1e-5, atol=1e-6)
    # Positions off the mask inside a row are skipped, not treated as the end of the episode.
    gappy = np.array([[1, 1, 0, 1, 0, 1, 0]], bool)
    v = rng.normal(size=gappy.shape)
    adv, ret = map(np.asarray, gae_advantages(np.array([2.0]), v, gappy, gamma=0.8, lam=0.7))
    want_adv, want_ret = _gae_loop(np.array([2.0]), v, gappy, 0.8, 0.7)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_gae_rejects_bad_input():
    mask = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="rewards must be"):
        gae_advantages(np.zeros(3), np.zeros((2, 3)), mask)
    with pytest.raises(ValueError, match="values_BxT"):
        gae_advantages(np.zeros(2), np.zeros((2, 4)), mask)
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(np.zeros(2), np.zeros((2, 3)), mask, lam=1.5)


def test_masked_whiten():
    rng = np.random.default_rng(1)
    mask = _rollout_mask(rng)
    x = rng.normal(size=mask.shape) * 3 + 2
    got = np.asarray(masked_whiten(jnp.asarray(_garbage(rng, x, mask), jnp.float32), mask))
    want = (x[mask] - x[mask].mean()) / (x[mask].std() + 1e-8)
    np.testing.assert_allclose(got[mask], want, rtol=1e-5, atol=1e-6)
    assert np.all(got[~mask] == 0.0)


# --- the policy loss with per-token advantages -----------------------------------------------------------------

def _policy_batch(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7
    mask[0], mask[1] = True, False
    old = -np.abs(rng.normal(size=(B, T))) - 0.05
    batch = dict(logp=old + rng.normal(size=(B, T)) * 0.6, old=old, mu=old + rng.normal(size=(B, T)) * 0.6,
                 adv=rng.normal(size=(B, T)), mask=mask)
    return {k: v if k == "mask" else _garbage(rng, _f32(v), mask) for k, v in batch.items()}


def _library(cfg, batch, adv_key="advantages_BxT", adv=None):
    adv = batch["adv"] if adv is None else adv
    inputs = LossInputs(logp_BxT=jnp.asarray(batch["logp"], jnp.float32),
                        old_logp_BxT=jnp.asarray(batch["old"], jnp.float32),
                        sampler_logp_BxT=jnp.asarray(batch["mu"], jnp.float32), mask_BxT=jnp.asarray(batch["mask"]),
                        **{adv_key: jnp.asarray(adv, jnp.float32)})
    f = jax.jit(jax.value_and_grad(lambda lp: compute_loss(cfg, dataclasses.replace(inputs, logp_BxT=lp)),
                                   has_aux=True))
    (loss, diag), grad = f(inputs.logp_BxT)
    return float(loss), {k: float(v) for k, v in diag.items()}, np.asarray(grad, np.float64)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("algorithm", ["grpo", "grpo_token_tis", "pg"])
def test_token_advantage_policy_loss_matches_numpy(algorithm, aggregation):
    cfg = LossConfig(algorithm=algorithm, aggregation=aggregation, max_response_len=MAX_LEN, eps_low=0.1,
                     eps_high=0.15, is_cap=1.5, log_ratio_clamp=1.2)
    batch = _policy_batch(seed=AGGREGATIONS.index(aggregation))
    loss, diag, grad = _library(cfg, batch)
    clean = {k: np.where(batch["mask"], v, 0.0) if k != "mask" else v for k, v in batch.items()}
    want_loss, want_grad = _policy_reference(algorithm, clean["logp"], clean["old"], clean["mu"], clean["adv"],
                                             batch["mask"], aggregation, cfg)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=2e-7)
    assert np.all(grad[~batch["mask"]] == 0.0) and np.any(grad[batch["mask"]] != 0.0)
    if algorithm != "pg":
        assert 0.0 < diag["clip_frac"] < 1.0  # the clipped branch is exercised


@pytest.mark.parametrize("algorithm", [a for a in LOSSES if a != "gspo"])
def test_constant_token_advantages_equal_sequence_advantages(algorithm):
    batch = _policy_batch(seed=7)
    adv_B = np.asarray(np.random.default_rng(7).normal(size=batch["mask"].shape[0]), np.float32)
    cfg = LossConfig(algorithm=algorithm, aggregation="seq-mean-token-mean")
    seq = _library(cfg, batch, "advantages_B", adv_B)
    tok = _library(cfg, batch, "advantages_BxT", np.broadcast_to(adv_B[:, None], batch["mask"].shape))
    np.testing.assert_allclose(tok[0], seq[0], rtol=1e-6)
    np.testing.assert_allclose(tok[2], seq[2], rtol=1e-6, atol=1e-9)
    assert tok[1] == pytest.approx(seq[1], rel=1e-6, abs=1e-9)


def test_advantage_inputs_are_checked():
    batch = _policy_batch(seed=8)
    with pytest.raises(ValueError, match="gspo takes one advantage per sequence"):
        _library(LossConfig(algorithm="gspo"), batch)
    with pytest.raises(ValueError, match="share one"):
        _library(LossConfig(), batch, adv=batch["adv"][:, :-1])
    inputs = LossInputs(logp_BxT=jnp.zeros((2, 3)), old_logp_BxT=jnp.zeros((2, 3)),
                        sampler_logp_BxT=jnp.zeros((2, 3)), mask_BxT=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="exactly one"):
        compute_loss(LossConfig(), inputs)


# --- the value loss --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_value_loss_matches_numpy(aggregation, clip):
    rng = np.random.default_rng(AGGREGATIONS.index(aggregation))
    mask = _rollout_mask(rng, B=7)
    v_old = _f32(rng.normal(size=mask.shape))
    v = _f32(v_old + rng.normal(size=mask.shape) * 0.3)
    ret = _f32(rng.normal(size=mask.shape))
    want_loss, want_grad, want_frac = _value_reference(v, v_old, ret, mask, clip, aggregation)
    f = jax.jit(jax.value_and_grad(lambda x, o, r, m: ppo.value_loss(
        x, o, r, m, value_clip=clip, aggregation=aggregation, max_response_len=MAX_LEN), has_aux=True))
    args = [jnp.asarray(_garbage(rng, x, mask), jnp.float32) for x in (v, v_old, ret)]
    (loss, diag), grad = f(*args, jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert float(diag["value_loss"]) == float(loss)
    assert float(diag["value_clip_frac"]) == pytest.approx(want_frac)
    if clip is not None:
        assert 0.0 < want_frac < 1.0  # both branches are exercised


def test_explained_variance():
    rng = np.random.default_rng(2)
    mask = _rollout_mask(rng)
    ret = rng.normal(size=mask.shape)
    v = ret + rng.normal(size=mask.shape) * 0.5
    got = float(ppo.explained_variance(_garbage(rng, v, mask), _garbage(rng, ret, mask), mask))
    assert got == pytest.approx(1.0 - np.var(ret[mask] - v[mask]) / np.var(ret[mask]), rel=1e-5)
    assert float(ppo.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    assert float(ppo.explained_variance(v, np.ones_like(v), mask)) == 0.0  # constant returns


# --- the value model and the one optimizer ---------------------------------------------------------------------

CFG = ModelConfig(arch="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True)


def _tiny_params(cfg=CFG, seed=0):
    tok = jnp.zeros((1, 4), jnp.int32)
    pos, mask = causal_inputs(tok, None, None)
    return CausalLM(cfg).init(jax.random.PRNGKey(seed), tok, pos, mask)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _final_hidden(model, params, tokens, attn):
    """The final-normed hidden states [B, T, H] of a forward (jitted: op by op is slow)."""
    pos, mask = causal_inputs(tokens, None, attn)
    return model.apply({"params": params}, tokens, pos, mask, return_logits=False)[0]


def test_critic_values_read_the_state_before_each_token():
    policy = _tiny_params()
    params = ppo.init_params(policy)
    critic = params["critic"]
    assert "lm_head" in policy and "lm_head" not in critic["backbone"]  # an untied head the critic never reads
    assert all(a is not b for a, b in zip(jax.tree_util.tree_leaves(policy),
                                          jax.tree_util.tree_leaves(critic["backbone"])))
    rng = np.random.default_rng(3)
    critic["value_head"] = {"kernel": jnp.asarray(rng.normal(size=32), jnp.float32), "bias": jnp.float32(0.25)}
    tokens = jnp.asarray(rng.integers(1, 61, size=(3, 7)), jnp.int32)
    attn = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 0]] * 3), jnp.int32)
    model = CausalLM(CFG)
    values = np.asarray(jax.jit(ppo.critic_values, static_argnums=0)(model, critic, tokens, attn))
    h = _final_hidden(model, critic["backbone"], tokens, attn)
    want = np.asarray(h, np.float64) @ np.asarray(critic["value_head"]["kernel"], np.float64) + 0.25
    assert values.dtype == np.float32 and values[:, 0].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(values[:, 1:], want[:, :-1], rtol=1e-5, atol=1e-5)
    # The critic runs the attention its model resolves, as the policy's log-probs do (here blockwise, blocks of
    # 2 keys: the causal mask is built per block, no [B, T, T] array); equal on the states of real tokens (a
    # padding query sees no key, and the two attentions fill such rows differently).
    blockwise = CausalLM(CFG, attention="blockwise", attention_block=2)
    got = np.asarray(jax.jit(ppo.critic_values, static_argnums=0)(blockwise, critic, tokens, attn))
    real = np.asarray(attn, bool)[:, :-1]  # value t reads the state after token t - 1
    np.testing.assert_allclose(got[:, 1:][real], values[:, 1:][real], rtol=1e-5, atol=1e-5)
    program = str(jax.make_jaxpr(ppo.critic_values, static_argnums=0)(blockwise, critic, tokens, attn))
    B, T = tokens.shape
    assert f"[{B},{T},{T}]" not in program
    # A fresh critic predicts 0 everywhere.
    fresh = ppo.init_params(policy)["critic"]
    assert np.all(np.asarray(jax.jit(ppo.critic_values, static_argnums=0)(model, fresh, tokens, attn)) == 0.0)


def test_the_value_scorer_batches_rows_by_its_rule():
    """V_old scored in batches of the rule's rows (filler rows in the last batch) equals the critic's values of
    all rows at once; a rule that gives no rows is an error."""
    from jaxrl_fp16.precision import get_policy

    critic = ppo.init_params(_tiny_params())["critic"]
    rng = np.random.default_rng(5)
    critic["value_head"] = {"kernel": jnp.asarray(rng.normal(size=32), jnp.float32), "bias": jnp.float32(-0.5)}
    tokens = rng.integers(1, 61, size=(5, 6)).astype(np.int32)
    attn = np.ones((5, 6), np.int32)
    attn[1, :2] = 0
    model, policy = CausalLM(CFG), get_policy("fp32")
    want = np.asarray(jax.jit(ppo.critic_values, static_argnums=0)(model, critic, tokens, attn))
    seen = []

    def rule(width, num_rows):
        seen.append((width, num_rows))
        return 2

    got = ppo.ValueScorer(model, policy, rows=rule)(critic, tokens, attn)
    assert seen == [(6, 5)] and got.shape == (5, 6) and got.dtype == np.float32
    real = attn.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ppo.ValueScorer(model, policy)(critic, tokens, attn)[real], want[real], rtol=1e-6,
                               atol=1e-6)  # the default: up to 64 rows, here all 5 at once
    with pytest.raises(ValueError, match="0 rows"):
        ppo.ValueScorer(model, policy, rows=lambda width, num_rows: 0)(critic, tokens, attn)


def test_one_optimizer_clips_each_group_and_scales_the_critic():
    g = {"policy": {"w": jnp.full((4,), 3.0)}, "critic": {"w": jnp.full((9,), 0.1)}}
    params = jax.tree_util.tree_map(jnp.zeros_like, g)
    opt = ppo.make_optimizer(optax.sgd(1.0), ppo.CriticConfig(enabled=True, lr_scale=5.0), max_grad_norm=1.0)
    updates, _ = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(updates["policy"]["w"], -np.full(4, 3.0) / 6.0, rtol=1e-6)  # norm 6 -> 1
    np.testing.assert_allclose(updates["critic"]["w"], -5.0 * np.full(9, 0.1), rtol=1e-6)  # norm 0.3: kept
    with pytest.raises(ValueError, match="top-level keys"):
        opt.update({"policy": g["policy"]}, opt.init(params))
    # The state is element-wise over the whole tree, so optax.tree_map_params (used to shard it) sees through it.
    shapes = optax.tree_map_params(opt, lambda p: p.shape, opt.init(params))
    assert jax.tree_util.tree_leaves(shapes) == []  # plain SGD: no per-parameter state
    adam = ppo.make_optimizer(optax.adam(1e-3), ppo.CriticConfig(enabled=True, lr_scale=5.0), max_grad_norm=1.0)
    mapped = optax.tree_map_params(adam, lambda p: "param", adam.init(params),
                                   transform_non_params=lambda _: "other")
    assert jax.tree_util.tree_leaves(mapped).count("param") == 2 * len(jax.tree_util.tree_leaves(params))


def test_the_one_step_trains_policy_and_critic():
    """Policy loss + vf_coef * value loss through make_train_step in FP16 with loss scaling: both groups move
    (the critic at lr_scale times the policy's rate), and the value head's gradient is the closed form
    vf_coef * sum_t coef_t (V_t - R_t) h_{t-1}, here with V = 0."""
    cfg = ppo.CriticConfig(enabled=True, vf_coef=0.5, lr_scale=4.0)
    loss_cfg = LossConfig(algorithm="grpo")
    params = ppo.init_params(_tiny_params())
    model = CausalLM(CFG, dtype=jnp.float16)
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, 61, size=(4, 8)).astype(np.int32)
    attn = np.ones((4, 8), np.int32)
    resp = np.zeros((4, 8), np.float32)
    resp[:, 3:7] = 1
    returns = (rng.normal(size=(4, 8)) * resp).astype(np.float32)
    batch = {"tokens": tokens, "attention_mask": attn, "response_mask": resp,
             "old_logp": np.asarray(jax.jit(token_logprobs, static_argnums=0)(model, params["policy"], tokens,
                                                                              attn)) * resp,
             "advantages": (rng.normal(size=(4, 8)) * resp).astype(np.float32),
             "old_values": np.zeros((4, 8), np.float32), "returns": returns}

    def loss_fn(p, b):
        logp = token_logprobs(model, p["policy"], b["tokens"], b["attention_mask"])
        loss, diag = compute_loss(loss_cfg, LossInputs(logp_BxT=logp, old_logp_BxT=b["old_logp"],
                                                       sampler_logp_BxT=b["old_logp"], mask_BxT=b["response_mask"],
                                                       advantages_BxT=b["advantages"]))
        value_term, value_diag = ppo.value_loss_term(model, p["critic"], b, cfg, loss_cfg.aggregation, None)
        return loss + value_term, {**diag, **value_diag}

    lr = 0.01
    optimizer = ppo.make_optimizer(optax.sgd(lr), cfg, max_grad_norm=None)  # update = -lr (x lr_scale) grad
    step = make_train_step(loss_fn, optimizer, "fp16-mixed", max_grad_norm=None)
    state, metrics = step(TrainState.create(params, optimizer, DynamicLossScale(loss_scale=2.0 ** 15)), batch)
    assert int(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == 2.0 ** 15

    h_prev = np.asarray(_final_hidden(model, params["critic"]["backbone"], tokens, attn), np.float64)[:, :-1]
    coef = resp[:, 1:] / resp.sum()  # token-mean over the response tokens; V_t reads h_{t-1}
    want_grad = cfg.vf_coef * np.einsum("bt,bth->h", coef * (0.0 - returns[:, 1:]), h_prev)
    got_grad = -(np.asarray(state.params["critic"]["value_head"]["kernel"]) - 0.0) / (lr * cfg.lr_scale)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-3, atol=1e-6)  # the FP16 cast's cotangent rounds

    def moved(before, after):
        return [bool(np.any(np.asarray(a) != np.asarray(b))) for a, b in
                zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after))]

    assert all(moved(params["policy"], state.params["policy"]))
    # The zero head passes no gradient to the backbone on the first step; once it is not zero, it does.
    assert not any(moved(params["critic"]["backbone"], state.params["critic"]["backbone"]))
    state2, again = step(state, batch)
    assert all(moved(state.params["critic"]["backbone"], state2.params["critic"]["backbone"]))
    assert float(again["critic/value_loss"]) < float(metrics["critic/value_loss"])


# --- config ----------------------------------------------------------------------------------------------------

def test_config_section():
    run = load_config(PPO_CONFIG)
    assert run.critic.enabled and run.loss.algorithm == "grpo"
    assert not load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml")).critic.enabled
    for override, words in [("critic.lam=1.5", ["critic.lam"]), ("critic.vf_coef=0", ["critic.vf_coef"]),
                            ("critic.value_clip=-1", ["critic.value_clip"]),
                            ("loss.algorithm=gspo", ["gspo", "critic.enabled"]),
                            ("critic.gama=1", ["critic.gama", "gamma"])]:
        with pytest.raises(ConfigError) as e:
            load_config(PPO_CONFIG, [override])
        assert all(w in str(e.value) for w in words), (override, str(e.value))
    assert load_config(PPO_CONFIG, ["critic.value_clip=null"]).critic.value_clip is None


# --- a tiny PPO run --------------------------------------------------------------------------------------------

ITERATIONS = 16


def _quick(cache, *extra):
    """The PPO config scaled down for tests (a shorter warm start, fewer prompts per iteration)."""
    return [f"model.cache_dir={cache}", "model.warm_start.steps=300", "task.num_problems=256",
            "train.prompts_per_iteration=16", "optim.lr=1e-4", "critic.lr_scale=3", f"train.iterations={ITERATIONS}",
            "log.progress=false", "log.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def arms(base_models, tmp_path_factory):
    """The same short PPO run in FP16 and in BF16 (the base model is the session's shared one, see conftest.py)."""
    from jaxrl_fp16.rl.trainer import Trainer

    cache = str(tmp_path_factory.mktemp("cache"))
    base_models.cache_dir(load_config(PPO_CONFIG, _quick(cache)), cache)
    out = {}
    for precision in ("fp16-mixed", "bf16-mixed"):
        run = load_config(PPO_CONFIG, _quick(cache, f"precision={precision}"))
        run_dir = str(tmp_path_factory.mktemp(precision))
        trainer = Trainer(run, run_dir)
        try:
            history = trainer.run()
            policy = jax.device_get(trainer.state.params["policy"])
        finally:
            trainer.close()
        out[precision] = {"history": history, "run_dir": run_dir, "policy": policy}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_a_tiny_ppo_run_learns(arms, precision):
    history = arms[precision]["history"]
    acc = [m["reward/accuracy"] for m in history]
    gap = [abs(m["critic/value_mean"] - m["critic/return_mean"]) for m in history]
    explained = [m["critic/explained_variance"] for m in history]
    print(f"{precision}: accuracy first 4 {np.mean(acc[:4]):.3f} last 4 {np.mean(acc[-4:]):.3f}; |mean value - "
          f"mean return| {np.mean(gap[:4]):.3f} -> {np.mean(gap[-4:]):.3f}; explained variance {explained[0]:.3f}, "
          f"last 8 {np.mean(explained[-8:]):.3f}")
    assert np.mean(acc[-4:]) > np.mean(acc[:4]) + 0.03
    # The critic learns too: from its zero head (value 0, nothing explained) its mean value follows the mean return
    # and it explains part of the returns' variance. Its loss need not fall: the returns' variance grows as the
    # accuracy moves towards 0.5 (a 16-iteration run's value loss rose 0.095 -> 0.103 while it learned).
    assert history[0]["critic/value_mean"] == 0.0 and abs(explained[0]) < 1e-6
    assert history[-1]["critic/value_mean"] > 0.05
    assert np.mean(gap[-4:]) < np.mean(gap[:4])
    assert np.mean(explained[-8:]) > 0.02


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_metrics_carry_the_critic_and_the_mismatch(arms, precision):
    with open(os.path.join(arms[precision]["run_dir"], "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [m["step"] for m in lines] == list(range(1, ITERATIONS + 1))
    for m in lines:
        for key in ("critic/value_loss", "critic/value_clip_frac", "critic/value_mean", "critic/return_mean",
                    "critic/explained_variance", "mismatch/kl_k3", "clip_frac", "loss", "grad_norm"):
            assert np.isfinite(m[key]), key
        assert m["mismatch/num_tokens"] > 0


@pytest.mark.slow
def test_bf16_mismatch_is_at_least_three_times_fp16(arms):
    """As in test_trainer: the two paths of the JAX engine may be bit-identical (then both are 0)."""
    kl = {p: np.mean([m["mismatch/kl_k3"] for m in arms[p]["history"]]) for p in arms}
    assert np.isfinite(kl["bf16-mixed"]) and kl["fp16-mixed"] >= 0
    assert kl["bf16-mixed"] >= 3 * kl["fp16-mixed"]


@pytest.mark.slow
def test_export_writes_the_policy_only(arms, tmp_path):
    from jaxrl_fp16.cli import main

    arm = arms["fp16-mixed"]
    _, exported = load_hf_params(os.path.join(arm["run_dir"], "hf"))
    assert set(exported) == set(arm["policy"])
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(arm["policy"])):
        np.testing.assert_array_equal(a, b)
    # From the checkpoint (the whole PPO state restored): the same weights.
    assert main(["export", arm["run_dir"], str(tmp_path / "again")]) == 0
    _, again = load_hf_params(tmp_path / "again")
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(exported)):
        np.testing.assert_array_equal(a, b)
