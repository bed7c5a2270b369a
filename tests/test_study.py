"""Precision study tools: the replayed inference path, per-layer drift, the op-class override table, mismatch
against the response position, and the written report, on a tiny random model with sharpened outputs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16 import mismatch
from jaxrl_fp16.tools import study
from jaxrl_fp16.tools.analysis import random_prompts
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.sampling import JaxSampler, SamplingSettings
from jaxrl_fp16.scoring import Scorer

# One shape everywhere (32 rows, prompt width 8 -> bucket 16, 32 new tokens), so every jitted program is compiled
# once and shared by run_study and the independent recomputations below.
STUDY = dict(num_prompts=16, prompt_len=8, max_new_tokens=32, samples_per_prompt=2, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelConfig(arch="qwen2", vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True, tie_word_embeddings=True,
                      max_position_embeddings=256, eos_token_ids=(256,), pad_token_id=257)
    tok = jnp.zeros((1, 4), jnp.int32)
    params = CausalLM(cfg).init(jax.random.PRNGKey(0), tok, *causal_inputs(tok, None, None))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)])
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * 8.0  # peaked outputs: mismatch is visible
    return save_hf_params(jax.tree_util.tree_map(np.asarray, params), cfg, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_hf_params(model_dir)


@pytest.fixture(scope="module")
def rollout(model):
    """The BF16 rollout run_study samples (same prompts, same settings)."""
    cfg, params = model
    specials = [*cfg.eos_token_ids, cfg.pad_token_id]
    prompts = random_prompts(STUDY["num_prompts"], STUDY["prompt_len"], cfg.vocab_size, specials, STUDY["seed"])
    settings = SamplingSettings(max_new_tokens=STUDY["max_new_tokens"],
                                samples_per_prompt=STUDY["samples_per_prompt"], seed=STUDY["seed"])
    return JaxSampler(cfg, params, dtype="bfloat16").generate(prompts, settings)


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study.run_study(model_dir, out, dtypes=("bfloat16",), **STUDY)


def test_inference_replay_reproduces_the_samplers_logprobs(model, rollout):
    cfg, params = model
    mu = study.inference_logprobs(cfg, params, rollout, "bfloat16")
    on = rollout.response_mask == 1
    assert on.sum() > 50
    np.testing.assert_array_equal(mu[on], rollout.logprobs[on])  # bit for bit: the same engine, teacher-forced
    assert np.all(mu[~on] == 0)


def test_layer_drift_zero_in_fp32_rounding_larger_in_bf16_than_fp16(model, rollout, report):
    cfg, params = model
    bf16_study = report[1]["dtypes"]["bfloat16"]
    bf16 = bf16_study["layer_drift"]
    fp16_study = study.layer_drift(cfg, params, rollout, "float16")  # the same tokens as the BF16 rows
    fp16 = fp16_study.rows
    assert [r["layer"] for r in bf16] == [r["layer"] for r in fp16] == list(range(1, cfg.num_layers + 1))
    for row in bf16 + fp16:
        assert row["fp32_inf_vs_train_max"] < 1e-5  # in FP32 the two paths compute the same function
    floor = max(r["fp32_inf_vs_train_max"] for r in bf16 + fp16)
    # Each path's drift from its FP32 self: BF16 rounds 8x coarser than FP16, and both grow with depth.
    for key in ("inf_vs_fp32_mean", "inf_vs_fp32_max", "train_vs_fp32_mean", "train_vs_fp32_max"):
        assert bf16[-1][key] > 4 * fp16[-1][key] > 100 * floor, key
        assert bf16[-1][key] > bf16[0][key] and fp16[-1][key] > fp16[0][key], key
    # The two paths against each other. Whether they differ at all depends on the CPU's code: where XLA emits
    # the same summation order for the KV-cache decode and the teacher-forced forward, the hidden states are
    # bit-identical (seen in FP16 on an AVX2 CPU). So no lower bound here, only what holds by construction:
    # no farther apart than their two roundings (the triangle inequality through the FP32 paths; 10% for the
    # norms' different denominators), and the three summaries consistent with each other.
    for row in bf16 + fp16:
        assert 0 <= row["inf_vs_train_mean"] <= row["inf_vs_train_max"]
        assert row["inf_vs_train_mean"] < 1.5 * row["train_vs_fp32_mean"]
        assert row["inf_vs_train_max"] <= 1.1 * (row["inf_vs_fp32_max"] + row["train_vs_fp32_max"]
                                                 + row["fp32_inf_vs_train_max"])
        assert 0 <= row["inf_vs_train_nonzero"] <= 1
        assert (row["inf_vs_train_max"] == 0) == (row["inf_vs_train_nonzero"] == 0)
    print("inf_vs_train_max at the last layer: bf16 %.2e, fp16 %.2e" % (bf16[-1]["inf_vs_train_max"],
                                                                       fp16[-1]["inf_vs_train_max"]))
    # The final log-probs: run_study's two measurements (the sampler's mu, the replayed mu) agree.
    assert bf16_study["layer_drift_mismatch"]["kl_k3"] == pytest.approx(bf16_study["mismatch"]["kl_k3"], rel=1e-6)
    for result in (bf16_study["layer_drift_mismatch"], fp16_study.mismatch):
        assert np.isfinite(result["kl_k3"]) and result["kl_k3"] >= 0


def test_override_table_rows_and_baseline_consistency(model, rollout, report):
    cfg, params = model
    rows = report[1]["dtypes"]["bfloat16"]["overrides"]
    assert sorted(r["override"] for r in rows) == sorted(["baseline", "none", "all", "scale_q", *study.OP_CLASSES])
    for row in rows:
        for key in ("kl_k3", "prob_abs_diff_mean", "kl_k3_gap_closed", "prob_abs_diff_mean_gap_closed"):
            assert np.isfinite(row[key]), (row["override"], key)
    by = {r["override"]: r for r in rows}
    # The baseline row is the plain mismatch: the sampler's own mu against the Scorer's pi on the same tokens.
    pi = Scorer(cfg, dtype="bfloat16")(params, rollout.tokens, rollout.attention_mask)
    plain = mismatch.summarize(mismatch.mismatch_metrics(rollout.logprobs, pi, rollout.response_mask))
    assert by["baseline"]["kl_k3"] == pytest.approx(plain["mismatch/kl_k3"], rel=1e-6)
    assert by["baseline"]["prob_abs_diff_mean"] == pytest.approx(plain["mismatch/prob_abs_diff_mean"], rel=1e-6)
    assert by["baseline"]["kl_k3_gap_closed"] == 0.0
    # Classes the default numerics already run in FP32 change nothing; the rest are real variants.
    for name in ("norm", "softmax"):
        assert by[name]["kl_k3"] == by["baseline"]["kl_k3"]
    assert by["all"]["fp32_ops"] == ",".join(study.OP_CLASSES) and by["none"]["fp32_ops"] == "-"
    assert by["all"]["kl_k3"] < by["none"]["kl_k3"]  # only matmul and weight rounding remain in "all"
    # scale_q reorders the scaling (both paths): no op class moves to FP32.
    assert by["scale_q"]["fp32_ops"] == by["baseline"]["fp32_ops"]
    assert "scale_q" not in study.override_variants(dataclasses.replace(Numerics(), scale_q=True))
    for row in rows:
        assert row["kl_k3_gap_closed"] == pytest.approx(1 - row["kl_k3"] / by["baseline"]["kl_k3"])
    assert [r["kl_k3_gap_closed"] for r in rows] == sorted((r["kl_k3_gap_closed"] for r in rows), reverse=True)
    best = report[1]["dtypes"]["bfloat16"]["best_override"]
    assert best in study.OP_CLASSES
    assert by[best]["kl_k3_gap_closed"] == max(by[c]["kl_k3_gap_closed"] for c in study.OP_CLASSES)


def test_override_variants():
    variants = study.override_variants()
    assert list(variants) == ["baseline", "none", *study.OP_CLASSES, "all", "scale_q"]
    for name in study.OP_CLASSES:
        assert variants[name] == Numerics.from_overrides(name)
    assert variants["all"] == Numerics.all_f32() and variants["baseline"] == Numerics()
    assert variants["scale_q"] == dataclasses.replace(Numerics(), scale_q=True)
    assert study.fp32_ops(variants["none"]) == "-"
    assert list(study.override_variants(op_classes=["lm_head"])) == ["baseline", "none", "lm_head", "all", "scale_q"]
    with pytest.raises(ValueError, match="unknown op class"):
        study.override_variants(op_classes=["matmul"])


def test_mismatch_vs_length_against_numpy():
    rng = np.random.default_rng(0)
    N, T = 7, 20
    lmu, lpi = rng.normal(-1, 0.5, (N, T)), rng.normal(-1, 0.5, (N, T))
    mask = np.zeros((N, T), np.int32)
    for i, (start, length) in enumerate([(3, 17), (5, 4), (3, 1), (0, 0), (8, 12), (2, 9), (3, 15)]):
        mask[i, start:start + length] = 1
    mask[6, 7] = 0  # a hole: the k-th response token is the k-th set entry
    lmu[mask == 0] = np.nan  # garbage off the response must not leak
    res = study.mismatch_vs_length(lmu, lpi, mask, num_bins=5)
    # Reference: one sequence at a time.
    seqs = [lpi[i][mask[i] == 1] - lmu[i][mask[i] == 1] for i in range(N)]
    K = max(len(s) for s in seqs)
    tok = [[abs(s[k]) for s in seqs if len(s) > k] for k in range(K)]
    pre = [[abs(np.sum(s[:k + 1])) for s in seqs if len(s) > k] for k in range(K)]
    np.testing.assert_array_equal(res["k"], np.arange(1, K + 1))
    np.testing.assert_array_equal(res["count"], [len(t) for t in tok])
    np.testing.assert_allclose(res["token_abs_mean"], [np.mean(t) for t in tok], rtol=1e-12)
    np.testing.assert_allclose(res["prefix_abs_mean"], [np.mean(p) for p in pre], rtol=1e-12)
    assert res["bin_start"][0] == 1 and res["bin_stop"][-1] == K + 1 and len(res["bin_start"]) == 5
    np.testing.assert_array_equal(res["bin_start"][1:], res["bin_stop"][:-1])
    for a, b, n, t, p in zip(res["bin_start"], res["bin_stop"], res["bin_count"], res["bin_token_abs_mean"],
                             res["bin_prefix_abs_mean"]):
        pooled_t = [v for k in range(a - 1, b - 1) for v in tok[k]]
        pooled_p = [v for k in range(a - 1, b - 1) for v in pre[k]]
        assert n == len(pooled_t)
        assert t == pytest.approx(np.mean(pooled_t), rel=1e-12)
        assert p == pytest.approx(np.mean(pooled_p), rel=1e-12)


def test_run_study_writes_the_report(report):
    out, result = report
    for name in study.STUDY_FILES:
        assert os.path.getsize(out / name) > 0, name
    for name in ("layer_drift.png", "override_gap.png", "mismatch_vs_length.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "study.json").read_text())
    assert list(saved["dtypes"]) == ["bfloat16"]
    assert saved["dtypes"]["bfloat16"]["best_override"] == result["dtypes"]["bfloat16"]["best_override"]
    assert len(saved["dtypes"]["bfloat16"]["layer_drift"]) == 4
    md = (out / "study.md").read_text()
    for heading in ("## Mismatch", "## Per-layer drift", "## Op-class overrides", "## Mismatch vs response length"):
        assert heading in md
    assert "| layer | inf_vs_train_mean |" in md and "| override | fp32_ops |" in md
    assert f"**{result['dtypes']['bfloat16']['best_override']}**" in md


def test_to_markdown():
    rows = [{"name": "a", "x": 0.000123456, "n": 3, "kl_k3_gap_closed": 0.5}, {"name": "b", "x": float("nan")}]
    assert study.to_markdown(rows).splitlines() == [
        "| name | x | n | kl_k3_gap_closed |", "|---|---|---|---|", "| a | 0.000123 | 3 | 50.0% |",
        "| b | nan |  |  |"]
    assert study.to_markdown(rows, ["n"]).splitlines()[2] == "| 3 |"
