"""Tests for jaxrl_fp16.rl.losses against an independent float64 reference written sequence by sequence."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.rl.losses import AGGREGATIONS, DIAG_NAMES, LOSSES, LossConfig, LossInputs, compute_loss

ALGORITHMS = ["pg", "grpo", "grpo_token_tis", "grpo_seq_tis", "grpo_seq_mis", "pg_seq_is", "pg_seq_tis",
              "pg_seq_mis", "gspo"]
AGGREGATION_NAMES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MAX_LEN = 11

# Defaults, and one setting where clipping, clamping, truncation, masking and the KL term are all often active.
SETTINGS = {
    "defaults": {},
    "active": dict(eps_low=0.1, eps_high=0.15, gspo_eps_low=0.02, gspo_eps_high=0.03, is_cap=1.5,
                   log_ratio_clamp=1.2, kl_coef=0.1),
}


def _config(algorithm, aggregation="token-mean", **kw):
    return LossConfig(algorithm=algorithm, aggregation=aggregation, max_response_len=MAX_LEN, **kw)


# --- the reference ---------------------------------------------------------------------------------------------

def _reference(cfg, logp, old, mu, adv, mask, ref=None, weight_logp=None):
    """Loss, d loss / d logp and diagnostics in float64, one sequence at a time in plain Python.

    `weight_logp` is the logp the pg_seq_* weights are computed from (they are constants of the gradient);
    by default `logp` itself.
    """
    weight_logp = logp if weight_logp is None else weight_logp
    c, cap, alg = cfg.log_ratio_clamp, cfg.is_cap, cfg.algorithm
    B, T = mask.shape

    def clamp(v):
        return min(max(v, -c), c)

    def dclamp(v):
        return 1.0 if -c < v < c else 0.0

    def ppo(x, a, lo, hi):
        """min(x a, clip(x) a), its derivative in x, and whether the clipped branch is taken."""
        clipped = min(max(x, 1.0 - lo), 1.0 + hi) * a
        if clipped < x * a:  # only possible with x outside [1 - lo, 1 + hi], where clip(x) is flat
            return clipped, 0.0, True
        return x * a, a, False

    seqs = []  # per non-empty sequence: (b, tokens, S = sum_t j_t, {t: dS/dlogp_t}, K = sum_t k3_t, {t: dK/dlogp_t})
    ratios, token_clipped, token_weights, seq_weights, seq_masked, seq_clipped = [], [], [], [], [], []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        if not toks:
            continue
        a, n = float(adv[b]), len(toks)
        S, dS = 0.0, {}
        for t in toks:
            ratios.append(math.exp(clamp(logp[b, t] - old[b, t])))
        if alg == "pg":
            for t in toks:
                S += a * logp[b, t]
                dS[t] = a
        elif alg.startswith("grpo"):
            w_seq = 1.0
            if alg in ("grpo_seq_tis", "grpo_seq_mis"):
                rho = math.exp(clamp(sum(old[b, t] - mu[b, t] for t in toks)))
                if alg == "grpo_seq_tis":
                    w_seq = min(rho, cap)
                else:
                    seq_masked.append(rho > cap)
                    w_seq = 0.0 if rho > cap else rho
                seq_weights.append(w_seq)
            for t in toks:
                log_r = logp[b, t] - old[b, t]
                r = math.exp(clamp(log_r))
                value, dvalue, clipped = ppo(r, a, cfg.eps_low, cfg.eps_high)
                token_clipped.append(clipped)
                w = w_seq
                if alg == "grpo_token_tis":
                    w = min(math.exp(clamp(old[b, t] - mu[b, t])), cap)
                    token_weights.append(w)
                S += w * value
                dS[t] = w * dvalue * r * dclamp(log_r)
        elif alg.startswith("pg_seq"):
            w = math.exp(clamp(sum(weight_logp[b, t] - mu[b, t] for t in toks)))
            if alg == "pg_seq_tis":
                w = min(w, cap)
            elif alg == "pg_seq_mis":
                seq_masked.append(w > cap)
                w = 0.0 if w > cap else w
            seq_weights.append(w)
            for t in toks:
                S += w * a * logp[b, t]
                dS[t] = w * a
        else:
            assert alg == "gspo"
            log_s = sum(logp[b, t] - old[b, t] for t in toks) / n
            s = math.exp(clamp(log_s))
            value, dvalue, clipped = ppo(s, a, cfg.gspo_eps_low, cfg.gspo_eps_high)
            seq_clipped.append(clipped)
            S = n * value  # every token carries the sequence objective
            for t in toks:
                dS[t] = n * dvalue * s * dclamp(log_s) / n
        K, dK = 0.0, {}
        if cfg.kl_coef > 0:
            for t in toks:
                d = ref[b, t] - logp[b, t]
                K += math.exp(clamp(d)) - clamp(d) - 1.0
                dK[t] = -(math.exp(clamp(d)) - 1.0) * dclamp(d)
        seqs.append((b, toks, S, dS, K, dK))

    num_tokens, num_seqs = sum(len(s[1]) for s in seqs), len(seqs)
    policy_loss, kl, grad = 0.0, 0.0, np.zeros((B, T))
    for b, toks, S, dS, K, dK in seqs:
        coef = {"token-mean": 1.0 / num_tokens,
                "seq-mean-token-mean": 1.0 / (num_seqs * len(toks)),
                "seq-mean-token-sum-norm": 1.0 / (num_seqs * cfg.max_response_len)}[cfg.aggregation]
        policy_loss -= coef * S
        kl += coef * K
        for t in toks:
            grad[b, t] = -coef * dS[t] + (cfg.kl_coef * coef * dK[t] if cfg.kl_coef > 0 else 0.0)

    def mean(v, empty):
        return sum(v) / len(v) if v else empty

    diag = {
        "policy_loss": policy_loss,
        "clip_frac": mean(token_clipped, 0.0) if alg.startswith("grpo") else mean(seq_clipped, 0.0),
        "is_weight_mean": mean(token_weights or seq_weights, 1.0),
        "is_weight_max": max(token_weights or seq_weights or [1.0]),
        "masked_frac": mean(seq_masked, 0.0),
        "ratio_mean": mean(ratios, 1.0),
    }
    if cfg.kl_coef > 0:
        diag["kl_ref"] = kl
    return policy_loss + cfg.kl_coef * kl, grad, diag


def _random_batch(seed, B=7, T=9, ratio_scale=0.4, mismatch_scale=0.4, full=False):
    """Random float64 inputs with a ragged mask and garbage (NaN/inf) at the masked-out positions."""
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(size=(B, T))) - 0.05
    logp = old + rng.normal(size=(B, T)) * ratio_scale
    mu = old + rng.normal(size=(B, T)) * mismatch_scale
    ref = old + rng.normal(size=(B, T)) * 0.5
    adv = rng.normal(size=B)
    mask = rng.random((B, T)) < 0.7
    mask[0, :] = True
    mask[1, :] = False
    mask[1, 0] = True  # a single-token sequence
    if full:
        mask[:] = True
    for x in (logp, old, mu, ref):
        x[~mask] = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=int((~mask).sum()))
    return dict(logp=logp, old=old, mu=mu, adv=adv, mask=mask, ref=ref)


def _inputs(batch):
    return LossInputs(logp_BxT=jnp.asarray(batch["logp"], jnp.float32),
                      old_logp_BxT=jnp.asarray(batch["old"], jnp.float32),
                      sampler_logp_BxT=jnp.asarray(batch["mu"], jnp.float32),
                      advantages_B=jnp.asarray(batch["adv"], jnp.float32),
                      mask_BxT=jnp.asarray(batch["mask"]),
                      ref_logp_BxT=None if batch.get("ref") is None else jnp.asarray(batch["ref"], jnp.float32))


_PAD_B, _PAD_T = 9, 12


def _pad(batch):
    """The batch padded with masked-out NaN rows and columns to one [_PAD_B, _PAD_T] shape."""
    B, T = batch["mask"].shape
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
        elif key == "adv":
            out[key] = np.concatenate([value, np.full(_PAD_B - B, np.nan)])
        else:
            fill = False if key == "mask" else np.nan
            out[key] = np.pad(value, ((0, _PAD_B - B), (0, _PAD_T - T)), constant_values=fill)
    return out


def _loss_and_grad(cfg, batch):
    """(loss, diag) and d loss / d logp_BxT of the library.

    Op by op rather than jitted (one compilation per config would cost more than the test), on the batch padded
    to one shape so that the op cache is shared by every test; the padding must not change anything.
    """
    B, T = batch["mask"].shape
    inputs = _inputs(_pad(batch))

    def f(logp_BxT):
        return compute_loss(cfg, dataclasses.replace(inputs, logp_BxT=logp_BxT))

    (loss, diag), grad = jax.value_and_grad(f, has_aux=True)(inputs.logp_BxT)
    grad = np.asarray(grad, np.float64)
    assert np.all(grad[B:] == 0.0) and np.all(grad[:, T:] == 0.0)
    return float(loss), {k: float(v) for k, v in diag.items()}, grad[:B, :T]


def _ref_of(cfg, batch, **kw):
    # The reference reads float32-rounded inputs, as the library does.
    f32 = {k: np.asarray(np.asarray(v, np.float32), np.float64) if k != "mask" else v for k, v in batch.items()}
    return _reference(cfg, f32["logp"], f32["old"], f32["mu"], f32["adv"], f32["mask"], f32["ref"], **kw)


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# --- value, gradient and diagnostics against the reference --------------------------------------------------------

@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_reference(algorithm, aggregation, setting):
    cfg = _config(algorithm, aggregation, **SETTINGS[setting])
    scale = 0.6 if setting == "active" else 0.4
    seed = 100 * ALGORITHMS.index(algorithm) + 10 * AGGREGATION_NAMES.index(aggregation) + list(SETTINGS).index(setting)
    batch = _random_batch(seed=seed, ratio_scale=scale, mismatch_scale=scale)
    loss, diag, grad = _loss_and_grad(cfg, batch)
    want_loss, want_grad, want_diag = _ref_of(cfg, batch)
    _assert_close(loss, want_loss)
    _assert_close(grad, want_grad)
    assert set(diag) == set(want_diag)
    for name, value in want_diag.items():
        _assert_close(diag[name], value, atol=1e-5)
    assert np.all(grad[~batch["mask"]] == 0.0)


def test_random_settings_exercise_every_branch():
    """The reference comparison above is only as strong as its data: it must clip, clamp, truncate and mask."""
    batch = _random_batch(seed=0, ratio_scale=0.6, mismatch_scale=0.6)
    seen = {}
    for algorithm in ("grpo", "grpo_seq_tis", "grpo_seq_mis", "pg_seq_mis", "gspo"):
        _, diag, _ = _loss_and_grad(_config(algorithm, **SETTINGS["active"]), batch)
        seen[algorithm] = diag
    assert 0 < seen["grpo"]["clip_frac"] < 1 and 0 < seen["gspo"]["clip_frac"] < 1
    assert 0 < seen["grpo_seq_mis"]["masked_frac"] < 1 and 0 < seen["pg_seq_mis"]["masked_frac"] < 1
    assert seen["grpo_seq_tis"]["is_weight_max"] == pytest.approx(1.5)
    mask = batch["mask"]
    assert np.any(np.abs(batch["logp"][mask] - batch["old"][mask]) > 1.2)  # token log-ratios beyond the clamp


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reference_gradient_matches_finite_differences(algorithm, aggregation):
    """The reference's analytic gradient against central differences of its own value, in float64."""
    cfg = _config(algorithm, aggregation, **SETTINGS["active"])
    batch = _random_batch(seed=1, B=4, T=5, ratio_scale=0.6, mismatch_scale=0.6)
    batch = {k: np.asarray(np.asarray(v, np.float32), np.float64) if k != "mask" else v for k, v in batch.items()}
    _, grad, _ = _ref_of(cfg, batch)
    h = 1e-6
    for b, t in zip(*np.nonzero(batch["mask"])):
        up, down = batch["logp"].copy(), batch["logp"].copy()
        up[b, t] += h
        down[b, t] -= h
        args = (batch["old"], batch["mu"], batch["adv"], batch["mask"], batch["ref"])
        # The pg_seq_* weights are constants of the gradient: hold them at the unperturbed logp.
        value_up = _reference(cfg, up, *args, weight_logp=batch["logp"])[0]
        value_down = _reference(cfg, down, *args, weight_logp=batch["logp"])[0]
        np.testing.assert_allclose((value_up - value_down) / (2 * h), grad[b, t], rtol=1e-5, atol=1e-7)


# --- edge cases ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_masked_sequence_contributes_nothing(algorithm, aggregation):
    cfg = _config(algorithm, aggregation, kl_coef=0.05)
    batch = _random_batch(seed=2)
    loss, diag, grad = _loss_and_grad(cfg, batch)
    padded = {k: np.concatenate([v, np.full_like(v[:1], np.nan)]) for k, v in batch.items() if k != "mask"}
    padded["mask"] = np.concatenate([batch["mask"], np.zeros_like(batch["mask"][:1])])  # NaN advantage too
    padded_loss, padded_diag, padded_grad = _loss_and_grad(cfg, padded)
    assert np.isfinite(padded_loss) and np.all(np.isfinite(padded_grad))
    _assert_close(padded_loss, loss, rtol=1e-6, atol=0)
    _assert_close(padded_grad[:-1], grad, rtol=1e-6, atol=0)
    assert np.all(padded_grad[-1] == 0.0)
    for name, value in diag.items():
        _assert_close(padded_diag[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_response_token_gives_zero_loss_and_grad(algorithm, aggregation):
    batch = _random_batch(seed=3)
    batch["mask"] = np.zeros_like(batch["mask"])
    loss, diag, grad = _loss_and_grad(_config(algorithm, aggregation, kl_coef=0.1), batch)
    assert loss == 0.0 and np.all(grad == 0.0)
    assert all(np.isfinite(v) for v in diag.values())
    assert diag["clip_frac"] == 0.0 and diag["masked_frac"] == 0.0 and diag["is_weight_max"] == 1.0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_advantages_give_zero_loss_and_grad(algorithm):
    batch = _random_batch(seed=4)
    batch["adv"] = np.zeros_like(batch["adv"])
    for logp in (batch["old"], batch["logp"]):  # at r = 1, and away from it
        loss, _, grad = _loss_and_grad(_config(algorithm), dict(batch, logp=logp))
        assert loss == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
def test_without_mismatch_every_algorithm_has_the_pg_gradient(aggregation):
    """logp == old_logp == mu: every ratio and weight is 1 and all the algorithms coincide with vanilla PG."""
    batch = _random_batch(seed=5)
    batch["mu"] = batch["old"]
    batch["logp"] = batch["old"]
    _, _, pg_grad = _loss_and_grad(_config("pg", aggregation), batch)
    assert np.any(pg_grad != 0.0)
    for algorithm in ALGORITHMS:
        _, diag, grad = _loss_and_grad(_config(algorithm, aggregation), batch)
        _assert_close(grad, pg_grad, rtol=1e-6, atol=1e-9)
        assert diag["clip_frac"] == 0.0 and diag["masked_frac"] == 0.0
        assert diag["ratio_mean"] == 1.0 and diag["is_weight_max"] == 1.0


def _two_sequences(log_rho_0, log_rho_1, T=3):
    """Two full sequences whose sum_t (old - mu) is log_rho_0 and log_rho_1, with pi_theta = pi_theta'."""
    old = np.full((2, T), -1.0)
    mu = old - np.array([[log_rho_0], [log_rho_1]]) / T
    return dict(logp=old.copy(), old=old, mu=mu, adv=np.array([1.0, -2.0]), mask=np.ones((2, T), bool), ref=None)


def test_sequence_weights_above_cap_are_truncated_or_masked():
    batch = _two_sequences(math.log(5.0), math.log(1.5))  # rho = 5 > C = 2, and 1.5 <= C
    _, _, grpo_grad = _loss_and_grad(_config("grpo"), batch)
    _, tis_diag, tis_grad = _loss_and_grad(_config("grpo_seq_tis"), batch)
    _assert_close(tis_grad[0], 2.0 * grpo_grad[0])  # truncated at C
    _assert_close(tis_grad[1], 1.5 * grpo_grad[1])
    assert tis_diag["is_weight_max"] == pytest.approx(2.0) and tis_diag["masked_frac"] == 0.0
    assert tis_diag["is_weight_mean"] == pytest.approx(1.75)
    _, mis_diag, mis_grad = _loss_and_grad(_config("grpo_seq_mis"), batch)
    assert np.all(mis_grad[0] == 0.0)  # masked out
    _assert_close(mis_grad[1], 1.5 * grpo_grad[1])
    assert mis_diag["masked_frac"] == 0.5
    assert mis_diag["is_weight_max"] == pytest.approx(1.5) and mis_diag["is_weight_mean"] == pytest.approx(0.75)

    # pg_seq_*: the weight is pi_theta(y) / mu(y), here equal to rho.
    _, _, pg_grad = _loss_and_grad(_config("pg"), batch)
    for algorithm, w0 in (("pg_seq_is", 5.0), ("pg_seq_tis", 2.0), ("pg_seq_mis", 0.0)):
        _, diag, grad = _loss_and_grad(_config(algorithm), batch)
        _assert_close(grad[0], w0 * pg_grad[0])
        _assert_close(grad[1], 1.5 * pg_grad[1])
        assert diag["masked_frac"] == (0.5 if algorithm == "pg_seq_mis" else 0.0)

    # Token TIS: only the tokens whose own ratio exceeds C are truncated.
    token_batch = dict(batch, mu=batch["old"] - np.array([[math.log(3.0), 0.0, 0.0], [0.0, 0.0, math.log(1.25)]]))
    _, diag, grad = _loss_and_grad(_config("grpo_token_tis"), token_batch)
    _assert_close(grad, np.array([[2.0, 1.0, 1.0], [1.0, 1.0, 1.25]]) * grpo_grad)
    assert diag["is_weight_max"] == pytest.approx(2.0)
    assert diag["is_weight_mean"] == pytest.approx((2.0 + 4 * 1.0 + 1.25) / 6)


def test_mis_keeps_a_weight_exactly_at_the_cap():
    _, diag, grad = _loss_and_grad(_config("grpo_seq_mis", is_cap=4.0), _two_sequences(math.log(4.0), 0.0, T=1))
    assert diag["masked_frac"] == 0.0 and np.all(grad != 0.0)


@pytest.mark.parametrize("big", [50.0, 1000.0])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_log_ratios_are_clamped(algorithm, big):
    """A log-ratio of 50 (or 1000) acts as 20: finite values equal to the clamped reference."""
    batch = _random_batch(seed=6, B=3, T=4, full=True)
    batch["logp"][0, 0] = batch["old"][0, 0] + big  # pi_theta / pi_theta'
    batch["mu"][1, 1] = batch["old"][1, 1] - big  # pi_theta' / mu, and pi_theta / mu
    batch["ref"][2, 2] = batch["logp"][2, 2] + big  # reference / pi_theta, in the KL term
    batch["adv"][:] = [-1.0, 0.5, 1.0]
    cfg = _config(algorithm, kl_coef=0.01)
    loss, diag, grad = _loss_and_grad(cfg, batch)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and all(np.isfinite(v) for v in diag.values())
    want_loss, want_grad, want_diag = _ref_of(cfg, batch)
    _assert_close(loss, want_loss)
    _assert_close(grad, want_grad, atol=1e-5)
    for name, value in want_diag.items():
        _assert_close(diag[name], value, atol=1e-5)
    assert diag["kl_ref"] > math.exp(20.0) / 12 / 2  # the k3 of the clamped token dominates


def test_clamp_closed_form():
    """One token, log-ratio 50, A = -1: the PPO min takes r A = -exp(20); the clamp makes its gradient 0."""
    one = dict(logp=np.array([[49.0]]), old=np.array([[-1.0]]), mu=np.array([[-1.0]]), adv=np.array([-1.0]),
               mask=np.ones((1, 1), bool), ref=None)
    loss, diag, grad = _loss_and_grad(_config("grpo"), one)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-6) and grad[0, 0] == 0.0
    assert diag["ratio_mean"] == pytest.approx(math.exp(20.0), rel=1e-6) and diag["clip_frac"] == 0.0
    one_is = dict(one, logp=np.array([[-1.0]]), mu=np.array([[-51.0]]), adv=np.array([1.0]))
    loss, diag, grad = _loss_and_grad(_config("pg_seq_is"), one_is)
    assert diag["is_weight_max"] == pytest.approx(math.exp(20.0), rel=1e-6)
    assert grad[0, 0] == pytest.approx(-math.exp(20.0), rel=1e-6)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-6)  # -w A logp with logp = -1


def test_clip_frac_counts_clipped_tokens_and_sequences():
    # r = e^0.5 ~ 1.65 or e^-0.5 ~ 0.61, outside [0.8, 1.28]. The clipped branch binds for r > 1 + eps_high with
    # A > 0 and for r < 1 - eps_low with A < 0: tokens (0,0), (0,2), (1,1), (1,2), 4 of 8.
    old = np.full((2, 4), -1.0)
    logp = old + np.array([[0.5, -0.5, 0.5, 0.0], [0.5, -0.5, -0.5, 0.0]])
    batch = dict(logp=logp, old=old, mu=old, adv=np.array([1.0, -1.0]), mask=np.ones((2, 4), bool), ref=None)
    _, diag, grad = _loss_and_grad(_config("grpo"), batch)
    assert diag["clip_frac"] == 0.5
    assert np.all(grad[[0, 0, 1, 1], [0, 2, 1, 2]] == 0.0) and np.all(grad[[0, 1, 0, 1], [1, 0, 3, 3]] != 0.0)
    _, diag, _ = _loss_and_grad(_config("grpo"), dict(batch, mask=batch["mask"] & (np.arange(4) != 2)))
    assert diag["clip_frac"] == pytest.approx(2 / 6)  # masked-out tokens are not counted
    _, diag, _ = _loss_and_grad(_config("grpo", eps_high=1.0, eps_low=0.5), batch)
    assert diag["clip_frac"] == 0.0
    # GSPO counts sequences: sequence 0 has mean log-ratio 0.125 > log(1 + 4e-4) with A > 0, sequence 1 has
    # -0.125 < log(1 - 3e-4) with A < 0: both clipped, no gradient. With A = +1 for both only the first is.
    _, diag, grad = _loss_and_grad(_config("gspo"), batch)
    assert diag["clip_frac"] == 1.0 and np.all(grad == 0.0)
    _, diag, grad = _loss_and_grad(_config("gspo"), dict(batch, adv=np.array([1.0, 1.0])))
    assert diag["clip_frac"] == 0.5 and np.all(grad[0] == 0.0) and np.all(grad[1] != 0.0)
    for algorithm in ("pg", "pg_seq_is", "pg_seq_tis", "pg_seq_mis"):
        assert _loss_and_grad(_config(algorithm), batch)[1]["clip_frac"] == 0.0


# --- jit, dtypes, configs, shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_jit_matches_eager_and_does_not_retrace(algorithm):
    cfg = _config(algorithm, "seq-mean-token-mean", kl_coef=0.1)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(inputs):
        return jax.value_and_grad(lambda lp: compute_loss(cfg, dataclasses.replace(inputs, logp_BxT=lp)),
                                  has_aux=True)(inputs.logp_BxT)

    for seed in (7, 8):
        batch = _random_batch(seed)
        (loss, diag), grad = step(_inputs(batch))
        want_loss, want_diag, want_grad = _loss_and_grad(cfg, batch)
        _assert_close(float(loss), want_loss, rtol=1e-6)
        _assert_close(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-8)
        assert set(diag) == set(want_diag)


def test_static_config_under_jit():
    fn = jax.jit(compute_loss, static_argnums=0)
    batch = _random_batch(9)
    for algorithm in ("grpo", "gspo"):
        loss, _ = fn(_config(algorithm), _inputs(batch))
        _assert_close(float(loss), _loss_and_grad(_config(algorithm), batch)[0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_inputs_give_float32_loss(dtype):
    batch = _random_batch(10)
    for key in ("logp", "old", "mu", "ref"):
        batch[key][~batch["mask"]] = np.nan  # 1e30 garbage would overflow the cast
    inputs = jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, _inputs(batch))
    cfg = _config("grpo_token_tis", kl_coef=0.1)
    (loss, diag), grad = jax.jit(jax.value_and_grad(
        lambda lp: compute_loss(cfg, dataclasses.replace(inputs, logp_BxT=lp)), has_aux=True))(inputs.logp_BxT)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in diag.values())
    assert grad.dtype == dtype
    # Same value as float32 inputs that hold the same (rounded) numbers.
    rounded = {k: np.asarray(jnp.asarray(v, dtype), np.float64) if k != "mask" else v for k, v in batch.items()}
    _assert_close(float(loss), _ref_of(cfg, rounded)[0], rtol=1e-5)


def test_diag_names():
    batch = _random_batch(11)
    for algorithm in ALGORITHMS:
        assert set(_loss_and_grad(_config(algorithm), batch)[1]) == set(DIAG_NAMES)
        assert set(_loss_and_grad(_config(algorithm, kl_coef=0.1), batch)[1]) == set(DIAG_NAMES) | {"kl_ref"}


def test_registry_holds_every_algorithm_of_the_paper():
    assert set(LOSSES) == set(ALGORITHMS)
    assert set(AGGREGATIONS) == set(AGGREGATION_NAMES)
    assert LossConfig().algorithm == "grpo" and LossConfig().aggregation == "token-mean"
    cfg = LossConfig()
    assert (cfg.eps_low, cfg.eps_high, cfg.gspo_eps_low, cfg.gspo_eps_high) == (0.2, 0.28, 3e-4, 4e-4)
    assert (cfg.is_cap, cfg.log_ratio_clamp, cfg.kl_coef) == (2.0, 20.0, 0.0)


def test_config_errors_list_the_valid_choices(monkeypatch):
    with pytest.raises(ValueError) as info:
        LossConfig(algorithm="ppo")
    assert "'ppo'" in str(info.value) and all(name in str(info.value) for name in LOSSES)
    with pytest.raises(ValueError) as info:
        LossConfig(aggregation="seq-sum")
    assert all(name in str(info.value) for name in AGGREGATIONS)
    # The valid list is the registry itself: a newly registered algorithm is accepted and listed.
    monkeypatch.setitem(LOSSES, "my_algo", LOSSES["pg"])
    assert LossConfig(algorithm="my_algo").algorithm == "my_algo"
    with pytest.raises(ValueError, match="my_algo"):
        LossConfig(algorithm="nope")


@pytest.mark.parametrize("kw, match", [
    (dict(aggregation="seq-mean-token-sum-norm"), "max_response_len"),
    (dict(max_response_len=0), "max_response_len"),
    (dict(max_response_len=3.5), "max_response_len"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"),
    (dict(gspo_eps_low=-1e-4), "gspo_eps_low"),
    (dict(is_cap=0.0), "is_cap"),
    (dict(log_ratio_clamp=-1.0), "log_ratio_clamp"),
    (dict(kl_coef=-0.1), "kl_coef"),
    (dict(kl_coef=float("nan")), "kl_coef"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


def test_config_is_frozen_kw_only_and_hashable():
    cfg = _config("grpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.is_cap = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        LossConfig("grpo")  # type: ignore[misc]
    assert hash(cfg) == hash(_config("grpo"))


def test_bad_shapes_raise():
    batch = _random_batch(12)
    inputs = _inputs(batch)
    with pytest.raises(ValueError, match="advantages_B"):
        compute_loss(_config("grpo"), dataclasses.replace(inputs, advantages_B=inputs.advantages_B[:-1]))
    with pytest.raises(ValueError, match="share one"):
        compute_loss(_config("grpo"), dataclasses.replace(inputs, old_logp_BxT=inputs.old_logp_BxT[:, :-1]))
    with pytest.raises(ValueError, match="share one"):
        compute_loss(_config("grpo"), dataclasses.replace(inputs, ref_logp_BxT=inputs.ref_logp_BxT[:-1]))
    with pytest.raises(ValueError, match="ref_logp_BxT"):
        compute_loss(_config("grpo", kl_coef=0.1), dataclasses.replace(inputs, ref_logp_BxT=None))
