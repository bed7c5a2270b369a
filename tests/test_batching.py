"""Batch shapes: widths bucketed from the rollout (few compiles, same numbers), a scorer batch bounded by memory
(same numbers at any split), and a train step that donates its state (updated in place, same numbers)."""

import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.loss_scale import DynamicLossScale
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.rl import trainer as trainer_module
from jaxrl_fp16.rl.trainer import Trainer, rollout_arrays, rollout_span
from jaxrl_fp16.sampling.base import Rollout
from jaxrl_fp16.scoring import (MIN_BUCKET_WIDTH, MIN_SCORE_ROWS, Scorer, _score, bucket_width, bucket_widths,
                                filled_batches, score_row_bytes, score_rows)
from jaxrl_fp16.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
GIB = 1024 ** 3


# ----- the one bucketing rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("max_width", [1, 15, 16, 17, 100, 512, 1000, 5120])
def test_every_length_gets_a_bounded_bucket_that_holds_it(max_width):
    widths = set()
    for longest in range(1, max_width + 1):
        w = bucket_width(longest, max_width)
        assert longest <= w <= max_width
        assert w < 2 * max(longest, MIN_BUCKET_WIDTH) or w == max_width  # short rows cost short compute
        assert bucket_width(w, max_width) == w  # an already bucketed batch keeps its width (the scorer's case)
        widths.add(w)
    assert sorted(widths) == bucket_widths(max_width)
    expected = 1 if max_width <= MIN_BUCKET_WIDTH else math.ceil(math.log2(max_width / MIN_BUCKET_WIDTH)) + 1
    assert len(widths) == expected  # e.g. 10 compiled widths for 5120 tokens (16, 32, ..., 4096, 5120)


def test_a_row_wider_than_the_fixed_width_is_refused():
    assert bucket_width(300) == 512 and bucket_width(3, floor=4) == 4
    with pytest.raises(ValueError, match="65 tokens is wider than the fixed width 64"):
        bucket_width(65, 64)
    with pytest.raises(ValueError, match="longest=0"):
        bucket_width(0, 64)


def _rollout(prompt_lens, response_lens, prompt_width, new_tokens, seed=0):
    """A rollout in the samplers' layout: left-padded prompts, right-padded responses, distinct token ids."""
    rng = np.random.default_rng(seed)
    n, t = len(prompt_lens), prompt_width + new_tokens
    tokens = np.zeros((n, t), np.int32)
    attn, resp, logp = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32), np.zeros((n, t), np.float32)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        cols = slice(prompt_width - p, prompt_width + r)
        tokens[i, cols] = rng.integers(3, 300, p + r)
        attn[i, cols] = 1
        resp[i, prompt_width:prompt_width + r] = 1
        logp[i, prompt_width:prompt_width + r] = -rng.random(r)
    return Rollout(tokens=tokens, attention_mask=attn, response_mask=resp, logprobs=logp,
                   prompt_index=np.arange(n), prompt_width=prompt_width, finish_reasons=["stop"] * n)


def test_filled_batches_pad_columns_and_top_up_rows():
    tokens = np.arange(1, 16, dtype=np.int32).reshape(5, 3)
    mask = np.ones((5, 3), np.int32)
    mask[1, 0] = 0
    got = list(filled_batches(tokens, mask, 2, 4))
    assert [n for n, _, _ in got] == [2, 2, 1]
    tok = np.concatenate([t for _, t, _ in got])
    msk = np.concatenate([m for _, _, m in got])
    assert tok.shape == msk.shape == (6, 4) and tok.dtype == msk.dtype == np.int32
    np.testing.assert_array_equal(tok[:5, :3], tokens)
    np.testing.assert_array_equal(msk[:5, :3], mask)
    assert not tok[:, 3].any() and not msk[:, 3].any()  # the padded column
    assert msk[5].tolist() == [1, 0, 0, 0] and not tok[5].any()  # the filler row: one real token
    with pytest.raises(ValueError, match="cannot hold rows of width 3"):
        next(filled_batches(tokens, mask, 2, 2))
    with pytest.raises(ValueError, match="0 rows"):
        next(filled_batches(tokens, mask, 0, 4))


def test_rollout_arrays_drop_padding_columns_and_keep_every_token():
    rollout = _rollout([5, 3, 7], [4, 1, 2], prompt_width=9, new_tokens=20)
    assert rollout_span(rollout.attention_mask) == (2, 13)  # longest prompt 7 (column 2) to 9 + 4 tokens
    for width in (11, 16, 40):
        arrays = rollout_arrays(rollout, width, pad_id=0)
        assert all(a.shape == (3, width) for a in arrays.values())
        assert arrays["response_mask"].dtype == arrays["sampler_logp"].dtype == np.float32
        for name, src in (("tokens", rollout.tokens), ("attention_mask", rollout.attention_mask),
                          ("response_mask", rollout.response_mask), ("sampler_logp", rollout.logprobs)):
            real = rollout.attention_mask > 0  # the same real entries, in the same order, per row
            got = arrays[name][arrays["attention_mask"] > 0].reshape(-1)
            np.testing.assert_array_equal(got, src[real].reshape(-1))
    with pytest.raises(ValueError, match="more than the fixed width 10"):
        rollout_arrays(rollout, 10, pad_id=0)


# ----- the scorer's memory-bounded batch ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny(str(tmp_path_factory.mktemp("tiny") / "m"), "qwen2", num_layers=2, hidden_size=64,
                     intermediate_size=128, num_heads=4, num_kv_heads=2)
    return load_hf_params(path)


def test_score_rows_respect_the_budget(tiny):
    cfg, _ = tiny
    for width in bucket_widths(5120):
        per_row = score_row_bytes(cfg, width, compute_bytes=2)
        for budget in (per_row - 1, per_row, 2 * per_row, 3.5 * per_row, 0.01 * GIB, 2.0 * GIB):
            rows = score_rows(cfg, width, budget, compute_bytes=2)
            if MIN_SCORE_ROWS * per_row <= budget:
                assert rows * per_row <= budget < (rows + 1) * per_row
            else:
                assert rows == MIN_SCORE_ROWS  # the smallest batch, even over the budget
    scorer = Scorer(cfg, dtype="float16", memory_gib=3 * score_row_bytes(cfg, 64, compute_bytes=2) / GIB)
    assert scorer.rows(64, 100) == 3 and scorer.rows(64, 2) == 2 and scorer.rows(64, 1) == MIN_SCORE_ROWS
    assert Scorer(cfg, batch_size=5).rows(64, 100) == 5
    with pytest.raises(ValueError, match="memory_gib must be > 0"):
        Scorer(cfg, memory_gib=0.0)


def test_score_memory_key_is_validated():
    assert load_config(TINY, ["train.score_memory_gib=4"]).train.score_memory_gib == 4
    with pytest.raises(ConfigError, match="train.score_memory_gib must be > 0"):
        load_config(TINY, ["train.score_memory_gib=0"])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_row_estimate_bounds_what_xla_allocates(tiny, dtype):
    """The per-row estimate against XLA:CPU's temporary bytes of the compiled scoring program (dense attention):
    an upper bound at every shape tried, so a batch within the budget allocates within it."""
    cfg, params = tiny
    scorer = Scorer(cfg, dtype=dtype)
    compute = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    for rows, width in ((16, 32), (4, 256), (2, 512), (1, 1024)):
        tok, mask = jnp.zeros((rows, width), jnp.int32), jnp.ones((rows, width), jnp.int32)
        compiled = _score.lower(scorer.model, compute, tok, mask, jnp.float32(1.0), scorer.chunk_size).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        estimate = rows * score_row_bytes(cfg, width, compute_bytes=np.dtype(dtype).itemsize)
        assert temp <= estimate, (rows, width, temp, estimate)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scores_do_not_depend_on_the_batch_split(tiny, dtype):
    cfg, params = tiny
    """Bitwise at any row count the scorer uses (>= MIN_SCORE_ROWS); a budget under two rows still gets two."""
    rollout = _rollout([5, 3, 7, 2, 6, 4, 1], [9, 1, 4, 12, 3, 6, 8], prompt_width=7, new_tokens=12, seed=1)
    row = score_row_bytes(cfg, bucket_width(19), compute_bytes=np.dtype(dtype).itemsize)
    outs = {}
    for rows in (2, 3, 7):
        scorer = Scorer(cfg, dtype=dtype, memory_gib=rows * row / GIB)
        assert scorer.rows(bucket_width(19), 7) == rows
        outs[rows] = scorer(params, rollout.tokens, rollout.attention_mask, 0.7)
    assert outs[2].shape == (7, 19) and np.all(outs[2][rollout.response_mask > 0] < 0)
    np.testing.assert_array_equal(outs[2], outs[3])  # bitwise: the same program width, any row count
    np.testing.assert_array_equal(outs[2], outs[7])
    assert Scorer(cfg, dtype=dtype, memory_gib=0.5 * row / GIB).rows(bucket_width(19), 7) == 2
    single = Scorer(cfg, dtype=dtype)(params, rollout.tokens[3:4], rollout.attention_mask[3:4], 0.7)
    np.testing.assert_array_equal(single, outs[2][3:4])  # one row is scored beside a filler row


# ----- the donating step --------------------------------------------------------------------------------------

def _lm_step(tiny, donate):
    cfg, _ = tiny
    model = CausalLM(cfg, dtype=jnp.float16)

    def loss_fn(p, batch):
        lp = token_logprobs(model, p, batch["tokens"], batch["mask"])
        loss = -jnp.sum(lp * batch["mask"]) / jnp.sum(batch["mask"])
        return loss * jnp.where(batch["poison"] > 0, jnp.inf, 1.0), {}

    return make_train_step(loss_fn, optax.adamw(1e-3), "fp16-mixed", donate=donate)


def _lm_state(tiny):
    return TrainState.create(jax.tree_util.tree_map(jnp.asarray, tiny[1]), optax.adamw(1e-3),
                             DynamicLossScale(loss_scale=2.0 ** 15))


def _lm_batch(cfg, seed, poison=0.0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32),
            "mask": np.ones((4, 32), np.float32), "poison": np.float32(poison)}


def test_the_step_donates_its_whole_state(tiny):
    """Every state leaf is a donated input aliased to its output (XLA's input/output alias table), no donation
    warning, and the state passed in is deleted by the call."""
    cfg, _ = tiny
    state = _lm_state(tiny)
    leaves = jax.tree_util.tree_leaves(state)
    state_bytes = sum(x.nbytes for x in leaves)
    lowered = _lm_step(tiny, donate=True).lower(state, _lm_batch(cfg, 0))
    assert lowered.as_text().count("tf.aliasing_output") == len(leaves)
    assert lowered.compile().memory_analysis().alias_size_in_bytes >= state_bytes
    plain = _lm_step(tiny, donate=False).lower(state, _lm_batch(cfg, 0))
    assert "tf.aliasing_output" not in plain.as_text() and plain.compile().memory_analysis().alias_size_in_bytes == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*donated buffers were not usable.*")
        new_state, _ = _lm_step(tiny, donate=True)(state, _lm_batch(cfg, 0))
    assert all(x.is_deleted() for x in leaves) and int(new_state.step) == 1


def test_donation_changes_no_bit(tiny):
    """Four FP16 steps with dynamic loss scaling, the third one overflowing (skipped, state kept in place)."""
    cfg, _ = tiny
    out = {}
    for donate in (False, True):
        step, state = _lm_step(tiny, donate), _lm_state(tiny)
        for i in range(4):
            state, metrics = step(state, _lm_batch(cfg, i, poison=float(i == 2)))
        assert int(state.skipped_steps) == 1
        out[donate] = jax.device_get(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, out[False], out[True])


# ----- the trainer: bucketed vs max-width batches, donation in the loop --------------------------------------

def quick(cache_dir, *extra):
    return [f"model.cache_dir={cache_dir}", "model.warm_start.steps=300", "task.num_problems=256",
            "train.prompts_per_iteration=16", "optim.lr=1e-4", "log.progress=false", "log.tensorboard=false",
            *extra]


@pytest.fixture(scope="module")
def cache_dir(base_models, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return base_models.cache_dir(load_config(TINY, quick(cache)), cache)


# Per-token log-probs of one rollout at two widths: a different program width changes XLA's summation order
# over the (exactly zero) padded attention terms, and the shape of every projection's product (rows x width
# tokens are one axis of it), hence the matmul kernel's blocking. In FP32 that is FP32 rounding (measured on an
# Intel Xeon: half the tokens differ, 2 of 311 by more than 1e-5, at most 1.2e-5); in FP16 an accumulation that
# rounds to the other side flips one FP16 ulp of an activation, which moves a few log-probs by up to ~2 FP16 eps
# (measured: 0.03 of the response tokens by more than 1e-5, at most 2.0e-3; the others by FP32 rounding).
# The loss is a token mean of A x ratio with |A| <= 1 and the ratio exp(log pi - old log pi) ~ 1, so to first
# order two widths' losses differ by at most max |d log pi| x the share of tokens that differ: 4e-4 in FP16. In
# FP16 the losses measured 1.1e-5 apart with XLA's code for AVX2 on an Intel Xeon with AVX-512 FP16 (the former
# bound, 1.6e-6, held on an AMD EPYC and with that Xeon's full instruction set).
FP16_LOGP_ATOL, FP16_DIFFERING_FRAC = 4e-3, 0.1
TOLERANCE = {"fp32": dict(atol=4e-5, frac=0.02, loss=dict(rtol=1e-5, atol=1e-6)),
             "fp16-mixed": dict(atol=FP16_LOGP_ATOL, frac=FP16_DIFFERING_FRAC,
                                loss=dict(rtol=0.0, atol=FP16_LOGP_ATOL * FP16_DIFFERING_FRAC))}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16-mixed"])
def test_bucketed_and_max_width_batches_agree(cache_dir, tmp_path, precision):
    """One rollout padded to its bucket and to the run's fixed width (longest prompt + 40 new tokens): the
    log-probs agree within the precision's rounding, and so do the loss and its gradients. In FP32 one whole
    iteration each way also gives the same rewards, the same loss and mismatch within rounding."""
    run = load_config(TINY, quick(cache_dir, f"precision={precision}", "sampler.max_new_tokens=40",
                                  "train.iterations=1", "checkpoint.export_hf=false"))
    tol = TOLERANCE[precision]
    trainer = Trainer(run, str(tmp_path / "a"))
    try:
        settings = run.sampler.settings(run.train.samples_per_prompt, seed=3)
        idx = np.arange(run.train.prompts_per_iteration)
        rollout = trainer.sampler.generate([trainer.prompt_ids[i] for i in idx], settings)
        start, stop = rollout_span(rollout.attention_mask)
        short = bucket_width(stop - start, trainer.width)
        assert short < trainer.width / 2  # addition answers are a few tokens: most of the fixed width is padding
        params = trainer.policy_weights()
        batches, logps = {}, {}
        for width in (short, trainer.width):
            a = rollout_arrays(rollout, width, trainer.model_cfg.pad_token_id or 0)
            lp = trainer.scorer(params, a["tokens"], a["attention_mask"], run.sampler.temperature,
                                max_width=trainer.width)
            assert lp.shape == (len(idx) * run.train.samples_per_prompt, width)
            assert np.all(a["response_mask"][:, :-short] == 0)
            logps[width] = lp[:, -short:][a["response_mask"][:, -short:] > 0]
            old = np.where(a["response_mask"] > 0, lp, 0.0).astype(np.float32)
            batches[width] = {**a, "old_logp": old, "advantages": np.linspace(-1, 1, len(lp)).astype(np.float32),
                              "poison": np.zeros(len(lp), np.float32)}
        diff = np.abs(logps[short] - logps[trainer.width])
        print(f"{precision}: |d log pi| max {diff.max():.2e}; of {diff.size} tokens {np.mean(diff > 0):.3f} "
              f"differ, {np.mean(diff > 1e-5):.3f} by more than 1e-5")
        assert diff.max() <= tol["atol"] and np.mean(diff > 1e-5) <= tol["frac"]
        compute = trainer.policy.cast_to_compute(trainer.state.params)
        grad_fn = jax.value_and_grad(lambda p, b: trainer._loss_fn(p, b)[0])
        (loss_s, g_s), (loss_w, g_w) = (grad_fn(compute, batches[w]) for w in (short, trainer.width))
        np.testing.assert_allclose(float(loss_s), float(loss_w), **tol["loss"])
        norm = optax.tree.norm(g_w)
        assert float(optax.tree.norm(jax.tree_util.tree_map(lambda x, y: x.astype(jnp.float32) - y, g_s, g_w))) \
            <= 2 * tol["atol"] * float(norm)
        bucketed = trainer.iteration(0) if precision == "fp32" else None
    finally:
        trainer.close()
    if bucketed is None:
        return
    fixed = Trainer(run, str(tmp_path / "b"))
    try:
        original = trainer_module.bucket_width  # the previous rule: every batch padded to the fixed width
        trainer_module.bucket_width = lambda longest, max_width: max_width
        try:
            wide = fixed.iteration(0)
        finally:
            trainer_module.bucket_width = original
    finally:
        fixed.close()
    for key in ("reward/mean", "reward/accuracy", "response_length/mean", "mismatch/num_tokens"):
        assert bucketed[key] == wide[key], key
    for key in ("loss", "grad_norm", "mismatch/prob_abs_diff_mean", "clip_frac"):
        np.testing.assert_allclose(bucketed[key], wide[key], rtol=1e-4, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_the_loop_donates_its_state_and_keeps_sampling_fp32(cache_dir, tmp_path):
    """In FP32 the sampler's pushed weights could be the state's own buffers: they must survive the next step's
    donation. Two iterations and a checkpoint run; the state before an iteration is deleted after it."""
    run = load_config(TINY, quick(cache_dir, "precision=fp32", "train.iterations=2", "checkpoint.every=1",
                                  "checkpoint.export_hf=false"))
    trainer = Trainer(run, str(tmp_path / "run"))
    try:
        before = jax.tree_util.tree_leaves(trainer.state.params)
        history = trainer.run()
        assert all(x.is_deleted() for x in before)
        assert [m["step"] for m in history] == [1, 2] and np.isfinite(history[-1]["loss"])
        assert trainer.evaluate() >= 0.0  # the sampler still holds valid weights
        assert trainer.checkpointer.all() == [1, 2]
    finally:
        trainer.close()
