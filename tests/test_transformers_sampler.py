"""TransformersSampler against real transformers models and the JAX trainer on tiny sharp Qwen2 (tied head) and
Llama (untied head) models: FP32 mu equals the trainer's pi, weight pushes, seeds, stops, errors, the CLI and
the trainer loop."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.cli import main
from jaxrl_fp16.config import load_config
from jaxrl_fp16.mismatch import METRIC_NAMES, mismatch_metrics, summarize
from jaxrl_fp16.models.hf import CheckpointError, load_hf_params
from jaxrl_fp16.models.hf_table import hf_state_dict
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.rl.trainer import Trainer
from jaxrl_fp16.sampling import SAMPLERS, Sampler, SamplingSettings, TransformersOptions, create_sampler
from jaxrl_fp16.sampling.transformers_sampler import TransformersSampler, response_lengths
from jaxrl_fp16.scoring import Scorer
from sampler_references import filtered_logprob, perturbed, trainer_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 64
FP32_TOL = 1e-4
ARCHS = {"qwen2": {"tie_word_embeddings": True}, "llama": {"tie_word_embeddings": False}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (model dir, cfg, FP32 params)."""
    out = {}
    for arch, kw in ARCHS.items():
        path = make_tiny(tmp_path_factory.mktemp(arch) / "tiny", arch, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, sharp=8.0, seed=3,
                         max_position_embeddings=MAX_LEN, **kw)
        out[arch] = (path, *load_hf_params(path))
    return out


@pytest.fixture(scope="module")
def samplers(models):
    """arch -> an FP32 TransformersSampler loaded with the trainer's params."""
    out = {arch: create_sampler("transformers", cfg=cfg, params=params, model_dir=path, dtype="float32",
                                trainer_dtype="float32")
           for arch, (path, cfg, params) in models.items()}
    yield out
    for sampler in out.values():
        sampler.close()


def prompts_for(cfg, n=6, seed=0, lo=2, hi=12):
    """Uneven prompt lengths in [lo, hi), avoiding the special tokens."""
    rs = np.random.RandomState(seed)
    return [rs.randint(10, 200, rs.randint(lo, hi)).tolist() for _ in range(n)]


def score(cfg, params, rollout, temperature=1.0, dtype="float32"):
    """The trainer's teacher-forced log pi of the rollout (one batch shape for every test: fewer compiles)."""
    return Scorer(cfg, dtype=dtype, batch_size=8)(params, rollout.tokens, rollout.attention_mask, temperature)


# ----- no model -----

def test_the_sampler_module_imports_no_torch_and_is_registered():
    code = ("import sys, jaxrl_fp16.sampling.transformers_sampler; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "transformers" in SAMPLERS


def test_response_lengths_end_after_the_first_stop():
    tokens = np.array([[5, 7, 2, 7], [5, 5, 5, 5], [2, 9, 9, 9]])
    lengths, stopped = response_lengths(tokens, [7, 2])
    assert lengths.tolist() == [2, 4, 1] and stopped.tolist() == [True, False, True]


def test_dtype_disagreement_is_refused_before_the_model_loads(models, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(torch_bridge, "load_causal_lm", no_model)
    path, cfg, params = models["qwen2"]
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        create_sampler("transformers", cfg=cfg, params=params, model_dir=path, dtype="float16",
                       trainer_dtype="bfloat16", options=TransformersOptions(max_batch_size=4))
    with pytest.raises(ValueError, match="float16.*float32"):
        create_sampler("transformers", cfg=cfg, params=params, model_dir=path, dtype="float16",
                       trainer_dtype="float32")
    with pytest.raises(ValueError, match="model directory"):
        create_sampler("transformers", cfg=cfg, params=params, model_dir=None, dtype="float32")


# ----- FP32: mu is the trainer's pi -----

def test_is_a_sampler_in_its_dtype(samplers):
    sampler = samplers["qwen2"]
    assert isinstance(sampler, Sampler) and sampler.compute_dtype == np.float32
    assert sampler.device == ("cuda:0" if torch_bridge.cuda_available() else "cpu")
    assert {str(p.dtype) for p in sampler._model.parameters()} == {"torch.float32"}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_logprobs_equal_the_trainers(samplers, models, arch, temperature):
    _, cfg, params = models[arch]
    prompts = prompts_for(cfg)
    settings = SamplingSettings(max_new_tokens=20, samples_per_prompt=3, temperature=temperature, ignore_eos=True,
                                seed=1)
    r = samplers[arch].generate(prompts, settings)
    pi = score(cfg, params, r, temperature)
    on = r.response_mask == 1
    assert on.sum() == len(prompts) * 3 * 20 and len({len(p) for p in prompts}) > 2
    err = np.abs(r.logprobs[on] - pi[on])
    print(f"\n{arch} T={temperature}: max |log mu - log pi| {err.max():.2e}")
    assert err.max() < FP32_TOL
    assert np.all(r.logprobs[~on] == 0) and np.all(r.logprobs[on] < 0)


def test_fp32_top_k_top_p_logprobs_are_the_renormalised_distribution(samplers, models):
    _, cfg, params = models["qwen2"]
    temperature, top_k, top_p = 0.8, 40, 0.8
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2, temperature=temperature, top_k=top_k,
                                top_p=top_p, ignore_eos=True, seed=4)
    r = samplers["qwen2"].generate(prompts_for(cfg), settings)
    logits = trainer_logits(cfg, params, r)
    raw = score(cfg, params, r, temperature)
    raised = 0
    for row in range(r.num_rows):
        for t in np.nonzero(r.response_mask[row])[0]:
            want = filtered_logprob(logits[row, t - 1], r.tokens[row, t], temperature, top_k, top_p)
            assert abs(r.logprobs[row, t] - want) < FP32_TOL, (row, t)
            raised += want > raw[row, t] + 1e-3
    assert raised > 0  # the filter did renormalise: mu differs from the tempered distribution


def test_greedy_returns_the_argmax_and_the_untempered_logprob(samplers, models):
    _, cfg, params = models["llama"]
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0, top_p=0.5, ignore_eos=True)
    r = samplers["llama"].generate(prompts_for(cfg), settings)
    logits = trainer_logits(cfg, params, r)
    pi = score(cfg, params, r)
    on = r.response_mask == 1
    for row in range(r.num_rows):
        cols = np.nonzero(on[row])[0]
        assert np.array_equal(r.tokens[row, cols], logits[row, cols - 1].argmax(-1))
    np.testing.assert_allclose(r.logprobs[on], pi[on], atol=FP32_TOL, rtol=0)


# ----- layout, seeds, stops -----

def test_layout_seeds_and_stops(samplers, models):
    sampler = samplers["qwen2"]
    prompts = prompts_for(models["qwen2"][1])
    k, new = 3, 16
    free = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k, ignore_eos=True,
                                                      seed=7))
    width = max(len(p) for p in prompts)
    assert free.tokens.shape == (len(prompts) * k, width + new) and free.prompt_width == width
    assert free.prompt_index.tolist() == np.repeat(np.arange(len(prompts)), k).tolist()
    for r in range(free.num_rows):
        prompt = prompts[free.prompt_index[r]]
        assert free.tokens[r, width - len(prompt):width].tolist() == prompt
        assert free.attention_mask[r].tolist() == [0] * (width - len(prompt)) + [1] * (len(prompt) + new)
    assert free.finish_reasons == ["length"] * free.num_rows and (free.response_mask[:, width:] == 1).all()

    # Same seed: the same rollout; another seed: another one; two samples of one prompt differ.
    again = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k, ignore_eos=True,
                                                       seed=7))
    np.testing.assert_array_equal(again.tokens, free.tokens)
    np.testing.assert_array_equal(again.logprobs, free.logprobs)
    other = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k, ignore_eos=True,
                                                       seed=8))
    assert not np.array_equal(other.tokens, free.tokens)
    assert not np.array_equal(free.tokens[0], free.tokens[1])

    # A stop token that some rows sample and others do not: the stopped rollout is the free one cut after the
    # first stop token (kept, finish 'stop'); the rest of the row is padding outside every mask.
    responses = free.responses()
    rows_with = sum(np.isin(np.arange(sampler.cfg.vocab_size), r) for r in responses)
    stop = int(np.argmin(np.abs(rows_with - free.num_rows / 2)))
    assert stop not in sampler.eos_token_ids
    stop_set = {stop, *sampler.eos_token_ids}  # ignore_eos=False: EOS ends a row too
    stopped = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k,
                                                         stop_token_ids=(stop,), seed=7))
    assert stopped.tokens.shape == free.tokens.shape
    for r, (full, cut) in enumerate(zip(responses, stopped.responses())):
        ends = [i for i, t in enumerate(full) if t in stop_set]
        n = ends[0] + 1 if ends else new
        assert cut == full[:n], r
        assert stopped.finish_reasons[r] == ("stop" if ends else "length"), r
        if ends:
            assert cut[-1] in stop_set and stopped.response_mask[r, width + n - 1] == 1  # the stop token is kept
        assert stopped.attention_mask[r, width + n:].sum() == 0
        assert (stopped.tokens[r, width + n:] == sampler.pad_token_id).all()
        np.testing.assert_array_equal(stopped.logprobs[r, width:width + n], free.logprobs[r, width:width + n])
    assert set(stopped.finish_reasons) == {"stop", "length"}

    # The model's EOS ids end rows the same way, unless ignore_eos.
    eos = sampler.eos_token_ids
    sampler.eos_token_ids = (stop, *eos)
    try:
        by_eos = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k, seed=7))
        ignored = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k,
                                                             ignore_eos=True, seed=7))
    finally:
        sampler.eos_token_ids = eos
    np.testing.assert_array_equal(by_eos.tokens, stopped.tokens)
    assert by_eos.finish_reasons == stopped.finish_reasons
    np.testing.assert_array_equal(ignored.tokens, free.tokens)


def test_batches_are_seeded_and_reproducible(models):
    path, cfg, params = models["llama"]
    prompts = prompts_for(cfg, n=5)
    settings = SamplingSettings(max_new_tokens=10, samples_per_prompt=2, ignore_eos=True, seed=3)
    with TransformersSampler(path, dtype="float32", max_batch_size=4) as small:
        a, b = small.generate(prompts, settings), small.generate(prompts, settings)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    pi = score(cfg, params, a)
    on = a.response_mask == 1
    np.testing.assert_allclose(a.logprobs[on], pi[on], atol=FP32_TOL, rtol=0)
    assert len({tuple(row) for row in a.tokens[:, a.prompt_width:]}) == a.num_rows  # batches draw differently


def test_bad_prompts_are_refused_before_any_work(samplers, monkeypatch):
    sampler = samplers["qwen2"]

    def no_work(*args, **kwargs):
        raise AssertionError("the model was asked to generate")

    monkeypatch.setattr(torch_bridge, "generate_with_logprobs", no_work)
    settings = SamplingSettings(max_new_tokens=16)
    with pytest.raises(ValueError, match=f"context length {MAX_LEN}"):
        sampler.generate([[11, 12, 13], [15] * (MAX_LEN - 15)], settings)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.generate([[11, sampler.cfg.vocab_size]], settings)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[11], []], settings)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([], settings)


# ----- weight pushes -----

@pytest.mark.parametrize("arch", list(ARCHS))
def test_weight_push_follows_the_new_weights_and_restores_bit_identical(samplers, models, arch):
    _, cfg, params = models[arch]
    sampler = samplers[arch]
    prompts = prompts_for(cfg, seed=2)
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2, ignore_eos=True, seed=5)
    before = sampler.generate(prompts, settings)
    new_params = perturbed(params)
    try:
        sampler.push_weights(new_params)
        after = sampler.generate(prompts, settings)
    finally:
        sampler.push_weights(params)
    on = after.response_mask == 1
    err_new = np.abs(after.logprobs - score(cfg, new_params, after))[on].max()
    err_old = np.abs(after.logprobs - score(cfg, params, after))[on].max()
    print(f"\n{arch} push: {sampler.last_push_seconds * 1e3:.1f} ms; max |log mu - log pi| {err_new:.2e} (new "
          f"weights), {err_old:.2e} (old)")
    assert err_new < FP32_TOL and err_old > 0.5
    restored = sampler.generate(prompts, settings)
    np.testing.assert_array_equal(restored.tokens, before.tokens)
    np.testing.assert_array_equal(restored.logprobs, before.logprobs)


def test_a_malformed_push_names_the_key_and_leaves_the_model_unchanged(samplers, models):
    _, cfg, params = models["llama"]
    sampler = samplers["llama"]
    prompts = prompts_for(cfg, n=3)
    settings = SamplingSettings(max_new_tokens=6, ignore_eos=True, seed=9)
    before = sampler.generate(prompts, settings)
    missing = jax.tree_util.tree_map(lambda x: x, params)
    del missing["layers"]["mlp"]["up_proj"]
    with pytest.raises(CheckpointError, match="layers/mlp/up_proj"):
        sampler.push_weights(missing)
    short = jax.tree_util.tree_map(lambda x: x, params)
    short["layers"]["mlp"]["down_proj"]["kernel"] = short["layers"]["mlp"]["down_proj"]["kernel"][:, :-1]
    with pytest.raises(CheckpointError, match="down_proj"):
        sampler.push_weights(short)
    extra = jax.tree_util.tree_map(lambda x: x, params)
    extra["layers"]["mlp"]["gate_proj"]["bias"] = np.zeros((cfg.num_layers, cfg.intermediate_size), np.float32)
    with pytest.raises(CheckpointError, match="gate_proj/bias"):
        sampler.push_weights(extra)
    after = sampler.generate(prompts, settings)
    np.testing.assert_array_equal(after.logprobs, before.logprobs)


def test_the_torch_copy_is_strict(samplers, models):
    """Every tensor of the torch model is given (a tied head through the embedding), no unknown name, no other
    shape; nothing is copied when one is wrong."""
    for arch in ARCHS:
        _, cfg, params = models[arch]
        model = samplers[arch]._model
        weights = dict(hf_state_dict(params, cfg, "float32"))
        assert ("lm_head.weight" in weights) == (arch == "llama")  # qwen2's head is tied to the embedding
        assert len(torch_bridge.copy_numpy_weights(model, weights.items())) == len(weights)
    norm = model.model.norm.weight.detach().clone()
    weights = dict(hf_state_dict(params, cfg, "float32"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    lacking = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lack lm_head.weight"):
        torch_bridge.copy_numpy_weights(model, lacking.items())
    with pytest.raises(ValueError, match="no tensor named model.layers.9.mlp.up_proj.weight"):
        torch_bridge.copy_numpy_weights(model, [*weights.items(), ("model.layers.9.mlp.up_proj.weight",
                                                                   weights["model.layers.0.mlp.up_proj.weight"])])
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"].T
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight has shape"):
        torch_bridge.copy_numpy_weights(model, weights.items())
    assert bool((model.model.norm.weight == norm).all())  # the doubled norm was never copied


# ----- 16-bit -----

def test_half_precision_pushes_and_the_bf16_gap(models):
    """The torch model holds its dtype after a push; BF16's mismatch against the trainer in BF16 dwarfs FP16's."""
    path, cfg, params = models["qwen2"]
    prompts = prompts_for(cfg, n=16, seed=3)
    settings = SamplingSettings(max_new_tokens=24, samples_per_prompt=4, ignore_eos=True, seed=0)
    metrics = {}
    for dtype in ("float16", "bfloat16"):
        with TransformersSampler(path, dtype=dtype) as sampler:
            sampler.push_weights(perturbed(params))
            sampler.push_weights(params)
            assert {str(p.dtype) for p in sampler._model.parameters()} == {f"torch.{dtype}"}
            r = sampler.generate(prompts, settings)
        pi = score(cfg, params, r, dtype=dtype)
        metrics[dtype] = summarize(mismatch_metrics(r.logprobs, pi, r.response_mask))
    fp16, bf16 = metrics["float16"], metrics["bfloat16"]
    print(f"\nkl_k3 fp16 {fp16['mismatch/kl_k3']:.2e} bf16 {bf16['mismatch/kl_k3']:.2e}; mean |pi - mu| fp16 "
          f"{fp16['mismatch/prob_abs_diff_mean']:.2e} bf16 {bf16['mismatch/prob_abs_diff_mean']:.2e}")
    assert fp16["mismatch/num_tokens"] == bf16["mismatch/num_tokens"] == 16 * 4 * 24
    assert bf16["mismatch/kl_k3"] >= 5 * fp16["mismatch/kl_k3"] > 0
    assert bf16["mismatch/prob_abs_diff_mean"] >= 5 * fp16["mismatch/prob_abs_diff_mean"] > 0


# ----- lifetime -----

def test_close_frees_the_model(models):
    path, cfg, params = models["qwen2"]
    sampler = TransformersSampler(path, dtype="float32")
    sampler.close()
    sampler.close()  # twice is fine
    assert sampler.closed
    with pytest.raises(RuntimeError, match="closed"):
        sampler.generate([[11, 12]], SamplingSettings(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="closed"):
        sampler.push_weights(params)


# ----- the CLI and the trainer -----

def test_mismatch_cli_with_the_transformers_sampler(models, tmp_path, capsys):
    path, cfg, _ = models["llama"]
    out = tmp_path / "mm"
    assert main(["mismatch", "--model", path, "--sampler", "transformers", "--dtype", "float32,bfloat16",
                 "--num-prompts", "4", "--prompt-len", "5", "--max-new-tokens", "10", "--samples-per-prompt", "2",
                 "--seed", "0", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| transformers | float32 | float32 |" in table and "| transformers | bfloat16 | bfloat16 |" in table
    rows = json.loads((out / "table.json").read_text())
    assert [r["sampler"] for r in rows] == ["transformers"] * 2
    assert rows[0]["mismatch/kl_k3"] < 1e-8 < rows[1]["mismatch/kl_k3"]
    for dtype in ("float32", "bfloat16"):
        summary = json.loads((out / dtype / "summary.json").read_text())
        assert set(METRIC_NAMES) <= set(summary) and summary["sampler_dtype"] == dtype
        z = np.load(out / dtype / "tokens.npz")
        assert z["sequences"].shape == z["sampler_logprobs"].shape == (8, 15)
        assert int(z["response_mask"].sum()) == summary["mismatch/num_tokens"] > 0
        assert (out / dtype / "token_probs.png").stat().st_size > 10_000
    z = np.load(out / "float32" / "tokens.npz")
    on = z["response_mask"] == 1
    np.testing.assert_allclose(z["sampler_logprobs"][on], z["trainer_logprobs"][on], atol=FP32_TOL, rtol=0)


def test_a_tiny_training_run_with_the_transformers_sampler(models, tmp_path):
    path, _, _ = models["qwen2"]
    run = load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"),
                      [f"model.path={path}", "sampler.name=transformers", "sampler.max_new_tokens=6",
                       "perfectible.enabled=false", "task.num_problems=32", "train.iterations=2",
                       "train.prompts_per_iteration=4", "train.samples_per_prompt=2",
                       "train.minibatches_per_iteration=1", "checkpoint.export_hf=false", "log.progress=false",
                       "log.tensorboard=false", f"model.cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(run, str(tmp_path / "run"))
    try:
        assert isinstance(trainer.sampler, TransformersSampler) and trainer.sampler.compute_dtype == np.float16
        history = trainer.run()
        pushed = trainer.sampler.last_push_seconds
    finally:
        trainer.close()
    assert trainer.sampler.closed
    assert [m["step"] for m in history] == [1, 2] and pushed is not None
    for m in history:
        assert m["mismatch/num_tokens"] > 0 and np.isfinite(m["loss"])
        assert 0 <= m["mismatch/kl_k3"] < 1e-4  # FP16 against FP16: the paper's small mismatch
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert len(f.readlines()) == 2
