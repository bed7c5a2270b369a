"""LoRA: adapters in the nn.scan layout, the merge against a numpy reference, the frozen base as an
argument of the one step, gradients (closed form through the merge), checkpoint size, and a tiny LoRA-GRPO run
that learns in FP16 and BF16."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.lora import LORA_TARGETS, LoRA, LoRASpec, adapter_count, export_params, init_adapters, target_paths
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.hf_table import hf_state_dict
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.rl.trainer import Trainer
from jaxrl_fp16.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_CONFIG = os.path.join(ROOT, "configs", "matrix", "tiny_lora_grpo.yaml")
HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
             "down_proj": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 (4 layers, hidden 128, sharp logits) and its FP32 params."""
    path = make_tiny(tmp_path_factory.mktemp("tiny") / "model", "qwen2", num_layers=4, sharp=8.0, seed=3)
    cfg, params = load_hf_params(path)
    return path, cfg, jax.tree_util.tree_map(jnp.asarray, params)


def _tokens(cfg, batch=4, length=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 200, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, :5] = 0  # a left-padded row
    return jnp.asarray(tokens), jnp.asarray(mask)


def _with_random_b(adapters, seed=1, std=0.05):
    """Adapters whose B is non-zero (as after training)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, std, x.shape).astype(np.float32))
        if jax.tree_util.keystr(path).endswith("['lora_b']") else x, adapters)


# ----- config -----

def test_lora_config_validates_targets_rank_and_alpha():
    run = load_config(LORA_CONFIG)
    assert run.lora.spec() == LoRASpec(8, 16.0, LORA_TARGETS) and run.lora.spec().scale == 2.0
    assert load_config(None).lora is None  # full fine-tuning by default
    with pytest.raises(ConfigError, match=r"lora.targets: unknown module\(s\) 'qv_proj'; valid: q_proj"):
        load_config(LORA_CONFIG, ["lora.targets=[q_proj,qv_proj]"])
    with pytest.raises(ConfigError, match="lora.targets is empty"):
        load_config(LORA_CONFIG, ["lora.targets=[]"])
    with pytest.raises(ConfigError, match="lora.rank must be an integer >= 1"):
        load_config(LORA_CONFIG, ["lora.rank=0"])
    with pytest.raises(ConfigError, match="lora.alpha must be > 0"):
        load_config(LORA_CONFIG, ["lora.alpha=-1"])
    with pytest.raises(ConfigError, match="lora.targets names a module twice"):
        load_config(LORA_CONFIG, ["lora.targets=[v_proj,v_proj]"])
    with pytest.raises(ConfigError, match="unknown config key 'lora.rnk'; valid keys here: alpha, rank, targets"):
        load_config(None, ["lora.rnk=4"])


# ----- adapters and the merge -----

def test_adapters_follow_the_scan_layout(tiny):
    _, cfg, params = tiny
    spec = LoRASpec(4, 8.0, ("q_proj", "v_proj", "down_proj"))
    adapters = init_adapters(cfg, spec, seed=0)
    for name, path in target_paths(spec.targets).items():
        kernel = params[path[0]][path[1]][path[2]][path[3]]
        module = adapters[path[0]][path[1]][path[2]]
        L, fan_in, fan_out = kernel.shape
        assert module["lora_a"].shape == (L, fan_in, 4) and module["lora_b"].shape == (L, 4, fan_out), name
        assert module["lora_a"].dtype == jnp.float32 and not np.any(np.asarray(module["lora_b"]))
        a = np.asarray(module["lora_a"])
        assert 0 < np.abs(a).max() <= 1 / np.sqrt(fan_in)
        assert not np.array_equal(a[0], a[1])  # one adapter per layer
    assert adapter_count(adapters) == sum(4 * L * (i + o) for L, i, o in (
        (4, 128, 128), (4, 128, 64), (4, 256, 128)))
    again, other = init_adapters(cfg, spec, seed=0), init_adapters(cfg, spec, seed=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, again)
    assert not np.array_equal(adapters["layers"]["attn"]["q_proj"]["lora_a"],
                              other["layers"]["attn"]["q_proj"]["lora_a"])
    # A target's A does not depend on which other modules are targeted.
    alone = init_adapters(cfg, LoRASpec(4, 8.0, ("v_proj",)), seed=0)
    np.testing.assert_array_equal(alone["layers"]["attn"]["v_proj"]["lora_a"],
                                  adapters["layers"]["attn"]["v_proj"]["lora_a"])


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed", "fp32"])
def test_zero_b_gives_the_base_logprobs_exactly(tiny, precision):
    _, cfg, params = tiny
    policy = get_policy(precision)
    lora = LoRA(LoRASpec(8, 16.0, LORA_TARGETS), cfg, params, policy, seed=0)
    model = CausalLM(cfg, dtype=policy.compute_dtype)
    tokens, mask = _tokens(cfg)

    def logprobs(p, batch):
        return token_logprobs(model, p, *batch)

    adapters = lora.init_adapters()
    assert np.any(np.asarray(adapters["layers"]["attn"]["q_proj"]["lora_a"]))  # A is random, B is zero
    wrapped = jax.jit(lora.wrap_loss(logprobs))(policy.cast_to_compute(adapters), (tokens, mask), lora.frozen)
    base = jax.jit(logprobs)(policy.cast_to_compute(params), (tokens, mask))
    np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(base))
    # The sampler's merged weights round to the base's compute-dtype weights too.
    pushed = policy.cast_to_compute(lora.policy_params(adapters))
    jax.tree_util.tree_map(np.testing.assert_array_equal, pushed, policy.cast_to_compute(params))


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_the_sampler_gets_the_weights_the_step_trains_with(tiny, precision):
    """With B != 0: the merge inside the (jitted) loss, in the compute dtype, equals the pushed FP32 merge once
    the sampler rounds it, bit for bit; and it is not the base."""
    _, cfg, params = tiny
    policy = get_policy(precision)
    lora = LoRA(LoRASpec(8, 12.0, LORA_TARGETS), cfg, params, policy, seed=0)
    adapters = _with_random_b(lora.init_adapters())
    in_loss = jax.jit(lora.wrap_loss(lambda p, batch: p))(policy.cast_to_compute(adapters), None, lora.frozen)
    pushed = lora.policy_params(adapters)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(pushed))
    jax.tree_util.tree_map(np.testing.assert_array_equal, in_loss, policy.cast_to_compute(pushed))
    q = in_loss["layers"]["attn"]["q_proj"]["kernel"]
    assert q.dtype == policy.compute_dtype
    base_q = policy.cast_to_compute(params)["layers"]["attn"]["q_proj"]["kernel"]
    assert np.mean(np.asarray(q) != np.asarray(base_q)) > 0.5


# ----- the step: the frozen base is an argument, gradients reach the adapters only -----

def test_gradients_flow_only_to_the_adapters_through_the_merge(tiny):
    """The adapters' gradients are the chain rule through W + A (s B) of the full weight's gradient (closed
    form, numpy); the state holds the adapters only; the base passes as an argument, not a constant."""
    _, cfg, params = tiny
    policy = get_policy("fp32")
    spec = LoRASpec(4, 6.0, ("q_proj", "up_proj"))
    lora = LoRA(spec, cfg, params, policy, seed=0)
    model = CausalLM(cfg, dtype=jnp.float32)
    tokens, mask = _tokens(cfg)

    def nll(p, batch):
        return -jnp.mean(token_logprobs(model, p, *batch)), {}

    adapters = _with_random_b(lora.init_adapters())
    loss = lora.wrap_loss(nll)
    # The base's gradient, taken here only as the reference: d loss / d W_merged (the merge adds W unscaled).
    g_adapters, g_frozen = jax.grad(lambda a, f: loss(a, (tokens, mask), f)[0], argnums=(0, 1))(adapters,
                                                                                              lora.frozen)
    for name, path in target_paths(spec.targets).items():
        a = np.asarray(adapters[path[0]][path[1]][path[2]]["lora_a"], np.float64)
        b = np.asarray(adapters[path[0]][path[1]][path[2]]["lora_b"], np.float64)
        g_w = np.asarray(g_frozen[path[0]][path[1]][path[2]]["kernel"], np.float64)  # [L, in, out]
        assert np.abs(g_w).max() > 0
        got = g_adapters[path[0]][path[1]][path[2]]
        np.testing.assert_allclose(got["lora_a"], spec.scale * g_w @ b.transpose(0, 2, 1), rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(got["lora_b"], spec.scale * a.transpose(0, 2, 1) @ g_w, rtol=2e-4, atol=1e-7)

    optimizer = optax.adam(1e-2)
    step = make_train_step(loss, optimizer, policy, max_grad_norm=1.0)
    state = TrainState.create(lora.init_adapters(), optimizer, NoOpLossScale())
    state, _ = step(state, (tokens, mask), lora.frozen)
    b_q = state.params["layers"]["attn"]["q_proj"]["lora_b"]
    a_q = state.params["layers"]["attn"]["q_proj"]["lora_a"]
    assert np.any(np.asarray(b_q))  # B moves on the first step
    np.testing.assert_array_equal(a_q, lora.init_adapters()["layers"]["attn"]["q_proj"]["lora_a"])  # dA = 0 at B=0
    state, _ = step(state, (tokens, mask), lora.frozen)
    assert not np.array_equal(state.params["layers"]["attn"]["q_proj"]["lora_a"], a_q)
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(lora.init_adapters())
    # The base is an argument of the compiled step: another base gives another loss, without a recompile.
    other = jax.tree_util.tree_map(lambda x: x * 1.01, lora.frozen)
    _, m1 = step(state, (tokens, mask), lora.frozen)
    _, m2 = step(state, (tokens, mask), other)
    assert float(m1["loss"]) != float(m2["loss"])
    assert step._cache_size() == 1


def test_the_step_without_frozen_is_unchanged(tiny):
    """Old callers: step(state, batch) still calls loss_fn(params, batch), with micro-batches too."""
    _, cfg, params = tiny
    model = CausalLM(cfg, dtype=jnp.float16)
    tokens, mask = _tokens(cfg)

    def nll(p, batch):
        return -jnp.mean(token_logprobs(model, p, *batch)), {}

    spec = LoRASpec(4, 8.0, ("v_proj",))
    lora = LoRA(spec, cfg, params, get_policy("fp16-mixed"), seed=0)
    optimizer = optax.sgd(0.1)
    full = make_train_step(nll, optimizer, "fp16-mixed", num_microbatches=2)
    state = TrainState.create(params, optimizer, DynamicLossScale(2.0 ** 10))
    _, m_full = full(state, (tokens, mask))
    adapted = make_train_step(lora.wrap_loss(nll), optimizer, "fp16-mixed", num_microbatches=2)
    lstate = TrainState.create(lora.init_adapters(), optimizer, DynamicLossScale(2.0 ** 10))
    _, m_lora = adapted(lstate, (tokens, mask), lora.frozen)
    assert float(m_lora["loss"]) == float(m_full["loss"])  # B = 0: the same forward, micro-batched alike
    assert int(m_lora["skipped"]) == 0 and float(m_lora["grad_norm"]) > 0


# ----- checkpoint size -----

def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _trained_like(state, seed=0):
    """`state` with every float array of params and optimizer state random: orbax compresses the zeros of a fresh
    state (B, Adam moments), which would flatter whichever side is fresher."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0:
            return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
        return x

    return state.replace(params=jax.tree_util.tree_map(fill, state.params),
                         opt_state=jax.tree_util.tree_map(fill, state.opt_state))


def test_a_lora_checkpoint_is_a_small_fraction_of_the_full_one(tiny, tmp_path):
    _, cfg, params = tiny
    optimizer = optax.adamw(1e-3)
    lora = LoRA(LoRASpec(8, 16.0, ("q_proj", "v_proj")), cfg, params, get_policy("fp16-mixed"), seed=0)
    sizes = {}
    for name, tree in (("full", params), ("lora", lora.init_adapters())):
        ckpt = Checkpointer(tmp_path / name)
        ckpt.save(1, _trained_like(TrainState.create(tree, optimizer, DynamicLossScale(2.0 ** 16))),
                  {"iteration": 1})
        ckpt.close()
        sizes[name] = _dir_bytes(tmp_path / name)
    param_ratio = adapter_count(lora.init_adapters()) / adapter_count(params)
    ratio = sizes["lora"] / sizes["full"]
    print(f"checkpoint bytes: full {sizes['full']}, lora {sizes['lora']} (ratio {ratio:.4f}; "
          f"parameter ratio {param_ratio:.4f})")
    assert param_ratio < 0.03
    assert ratio < 0.06


# ----- the trainer -----

ITERATIONS = 24
EVAL_SAMPLES = 16
EVAL_EVERY = 8


def quick(cache_dir, *extra):
    """The LoRA config, scaled down for tests (a shorter warm start, fewer prompts per iteration)."""
    return [f"model.cache_dir={cache_dir}", "model.warm_start.steps=300", "task.num_problems=256",
            "train.prompts_per_iteration=16", "log.progress=false", "log.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def arms(base_models, tmp_path_factory):
    """The same short LoRA-GRPO run in FP16 and in BF16, with accuracy on the prompt set before and after the run
    and every EVAL_EVERY iterations (`train.eval_every`), 16 samples per prompt (the base model is the session's
    shared one, see conftest.py)."""
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    base_models.cache_dir(load_config(LORA_CONFIG, quick(cache_dir)), cache_dir)
    out = {}
    for precision in ("fp16-mixed", "bf16-mixed"):
        run = load_config(LORA_CONFIG, quick(cache_dir, f"precision={precision}",
                                             f"train.iterations={ITERATIONS}", f"checkpoint.every={ITERATIONS // 2}",
                                             f"train.eval_every={EVAL_EVERY}",
                                             f"train.eval_samples_per_prompt={EVAL_SAMPLES}"))
        run_dir = str(tmp_path_factory.mktemp(precision))
        trainer = Trainer(run, run_dir)
        try:
            before = trainer.evaluate(EVAL_SAMPLES)
            history = trainer.run()
            after = trainer.evaluate(EVAL_SAMPLES)
            adapters = jax.device_get(trainer.state.params)
            base_dir = trainer.base_dir
        finally:
            trainer.close()
        evals = {m["step"]: m["eval/accuracy"] for m in history if "eval/accuracy" in m}
        out[precision] = {"before": before, "after": after, "evals": evals, "history": history, "run_dir": run_dir,
                          "adapters": adapters, "base_dir": base_dir, "run": run}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_a_tiny_lora_grpo_run_learns(arms, precision):
    """The prompt-set accuracy of the second half of the run (the mean of the evaluations after iterations 16 and
    24) against the base's, and the training accuracy (last 8 vs first 8 iterations).

    Measured on the suite's base model warm-started with `model.remat` `dots`, seeds 0-5 in both precisions, with
    XLA's code for the full ISA of an Intel Xeon (AVX-512 FP16, AMX) and for AVX2 (24 runs): the second half's mean
    gained 0.075-0.148 (the final evaluation alone 0.021-0.177: one run, AVX2 FP16 seed 0, peaked at +0.128 after
    iteration 16 and fell back to +0.021 at 24, as it also did with `remat: none`, +0.044). The margin below is
    about two thirds of the smallest gain; each evaluation reads about 1,300 samples (standard error about 0.014).

    The run evaluates itself every EVAL_EVERY iterations (`train.eval_every`): those evaluations are logged at
    their iterations, and the last is the evaluation of the final weights (the same sampling seed: the same
    accuracy to the bit)."""
    arm = arms[precision]
    acc = [m["reward/accuracy"] for m in arm["history"]]
    evals = arm["evals"]
    late = np.mean([evals[step] for step in evals if step > ITERATIONS // 2])
    print(f"{precision}: prompt-set accuracy {arm['before']:.3f} -> {arm['after']:.3f} (after iterations "
          f"{', '.join(f'{s}: {evals[s]:.3f}' for s in sorted(evals))}; second half {late:.3f}); training accuracy "
          f"first 8 {np.mean(acc[:8]):.3f}, last 8 {np.mean(acc[-8:]):.3f}")
    assert sorted(evals) == list(range(EVAL_EVERY, ITERATIONS + 1, EVAL_EVERY))
    assert evals[ITERATIONS] == arm["after"]
    assert late >= arm["before"] + 0.05
    assert np.mean(acc[-8:]) > np.mean(acc[:8])
    assert all(np.isfinite(m["mismatch/kl_k3"]) for m in arm["history"])


@pytest.mark.slow
def test_the_export_is_the_merge_of_the_trained_adapters(arms):
    """hf/ of the FP16 run: every targeted weight is base + (alpha / rank) * B @ A in FP32, every other tensor
    the base's; B moved away from 0 in training.

    To the bit against the library's merge (`lora.export_params`, the same compiled code) of the trained FP32
    adapters into the FP32 base. Against numpy's `base + scale * B @ A` within the error bound of a rank-r dot
    product in FP32, (r + 1) eps (|W| + scale |B| @ |A|): XLA's and OpenBLAS's matmul kernels sum in orders that
    depend on the CPU's instruction set, so equality to the bit with numpy holds on some CPUs and not others.
    """
    arm = arms["fp16-mixed"]
    spec = arm["run"].lora.spec()
    exported = load_file(os.path.join(arm["run_dir"], "hf", "model.safetensors"))
    base = load_file(os.path.join(arm["base_dir"], "model.safetensors"))
    assert set(exported) == set(base)
    cfg, base_params = load_hf_params(arm["base_dir"])
    merged = dict(hf_state_dict(export_params(arm["adapters"], base_params, spec), cfg))
    assert set(merged) == set(exported)
    for key in exported:
        np.testing.assert_array_equal(exported[key], merged[key])
    eps = np.finfo(np.float32).eps
    targeted = set()
    for name, path in target_paths(spec.targets).items():
        module = arm["adapters"][path[0]][path[1]][path[2]]
        assert np.abs(module["lora_b"]).max() > 0
        for i in range(module["lora_a"].shape[0]):
            key = f"model.layers.{i}.{HF_MODULE[name]}.weight"
            A_hf, B_hf = module["lora_a"][i].T, module["lora_b"][i].T  # (r, in), (out, r)
            scale = np.float32(spec.scale)
            reference = base[key] + scale * B_hf @ A_hf
            bound = (spec.rank + 1) * eps * (np.abs(base[key]) + scale * np.abs(B_hf) @ np.abs(A_hf))
            assert exported[key].dtype == np.float32
            assert np.all(np.abs(exported[key] - reference) <= bound), key
            assert not np.array_equal(exported[key], base[key])
            targeted.add(key)
    for key in set(base) - targeted:
        np.testing.assert_array_equal(exported[key], base[key])


@pytest.mark.slow
def test_export_of_a_lora_checkpoint_equals_the_final_export(arms, tmp_path):
    from jaxrl_fp16.cli import main

    run_dir = arms["bf16-mixed"]["run_dir"]
    assert main(["export", run_dir, str(tmp_path / "exported")]) == 0
    a = load_file(os.path.join(run_dir, "hf", "model.safetensors"))
    b = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_the_trainer_checkpoints_only_the_adapters(arms, tiny):
    arm = arms["fp16-mixed"]
    ckpt_dir = os.path.join(arm["run_dir"], "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert steps == [ITERATIONS // 2, ITERATIONS]
    lora_bytes = _dir_bytes(os.path.join(ckpt_dir, str(ITERATIONS)))
    params = load_hf_params(arm["base_dir"])[1]
    assert adapter_count(arm["adapters"]) / adapter_count(params) < 0.11  # rank 8 on all seven projections
    full = Checkpointer(os.path.join(os.path.dirname(ckpt_dir), "full-reference"))
    full.save(ITERATIONS, _trained_like(TrainState.create(jax.tree_util.tree_map(jnp.asarray, params),
                                                          optax.adamw(1e-3), DynamicLossScale(2.0 ** 16))),
              {"iteration": ITERATIONS})
    full.close()
    ratio = lora_bytes / _dir_bytes(os.path.join(os.path.dirname(ckpt_dir), "full-reference", str(ITERATIONS)))
    print(f"LoRA-GRPO checkpoint / full checkpoint on disk: {ratio:.4f}")
    assert ratio < 0.15


@pytest.mark.slow
def test_a_resumed_lora_run_restores_the_adapters_and_pushes_the_merge(arms):
    arm = arms["fp16-mixed"]
    trainer = Trainer(arm["run"], arm["run_dir"], resume=True)
    try:
        assert trainer.start_iteration == ITERATIONS
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(trainer.state.params),
                               arm["adapters"])
        pushed = trainer.sampler._params  # the JAX sampler's weights, in its compute dtype
        expected = trainer.policy.cast_to_compute(trainer.lora.policy_params(trainer.state.params))
        jax.tree_util.tree_map(np.testing.assert_array_equal, pushed, expected)
    finally:
        trainer.close()


def test_lora_composes_with_the_critic(tiny):
    """PPO's trainable tree {"policy", "critic"}: the adapters take the policy's place, the critic trains in
    full, and the loss sees the merged policy."""
    from jaxrl_fp16.rl.trainable import Trainable

    _, cfg, params = tiny
    run = load_config(LORA_CONFIG, ["critic.enabled=true", "lora.targets=[v_proj]"])
    trainable = Trainable.for_run(run, cfg, params)
    lora = trainable.lora
    assert trainable.critic and lora.part == "policy"
    tree = trainable.init(params)
    assert set(tree) == {"policy", "critic"} and set(tree["critic"]) == {"backbone", "value_head"}
    assert jax.tree_util.tree_structure(tree["policy"]) == jax.tree_util.tree_structure(lora.init_adapters())
    assert trainable.policy_params(tree) is tree["policy"] and trainable.critic_params(tree) is tree["critic"]

    policy = run.policy
    model = CausalLM(cfg, dtype=policy.compute_dtype)
    tokens, mask = _tokens(cfg)

    def loss_fn(p, batch):  # the policy's NLL plus a term on the critic's value head
        nll = -jnp.mean(token_logprobs(model, p["policy"], *batch))
        return nll + jnp.sum(jnp.square(p["critic"]["value_head"]["kernel"].astype(jnp.float32) - 1.0)), {}

    optimizer = optax.adam(1e-2)
    step = make_train_step(lora.wrap_loss(loss_fn), optimizer, policy)
    state = TrainState.create(tree, optimizer, DynamicLossScale(2.0 ** 10))
    new, metrics = step(state, (tokens, mask), lora.frozen)
    assert int(metrics["skipped"]) == 0
    assert np.any(np.asarray(new.params["policy"]["layers"]["attn"]["v_proj"]["lora_b"]))
    assert not np.array_equal(new.params["critic"]["value_head"]["kernel"], tree["critic"]["value_head"]["kernel"])
