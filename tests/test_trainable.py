"""`rl.trainable.Trainable`: the four trained-tree variants (full, PPO, LoRA, LoRA + PPO) from one base model:
their trees, the policy's weights the sampler gets, the exported policy, and the loss the step differentiates."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.config import load_config
from jaxrl_fp16.lora import LoRA
from jaxrl_fp16.models.decoder import CausalLM
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.rl.trainable import Trainable, rl_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
LORA = os.path.join(ROOT, "configs", "matrix", "tiny_lora_grpo.yaml")
VARIANTS = {"full": (FULL, []), "ppo": (FULL, ["critic.enabled=true"]), "lora": (LORA, []),
            "lora+ppo": (LORA, ["critic.enabled=true"])}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 (2 layers) and its FP32 params."""
    path = make_tiny(tmp_path_factory.mktemp("tiny") / "model", "qwen2", num_layers=2, sharp=8.0, seed=5)
    cfg, params = load_hf_params(path)
    return cfg, jax.tree_util.tree_map(jnp.asarray, params)


def _variant(name, cfg, params):
    config, extra = VARIANTS[name]
    run = load_config(config, ["precision=fp32", *extra])  # FP32: LoRA's frozen base is the base itself
    return run, Trainable.for_run(run, cfg, params)


def _batch(cfg, critic, rows=4, width=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, width), np.int32)
    mask[0, :3] = 0  # a left-padded row
    response = np.zeros((rows, width), np.float32)
    response[:, -4:] = 1.0
    batch = {"tokens": rng.integers(0, cfg.vocab_size, size=(rows, width)).astype(np.int32), "attention_mask": mask,
             "response_mask": response, "old_logp": np.where(response > 0, -2.0, 0.0).astype(np.float32),
             "sampler_logp": np.where(response > 0, -2.1, 0.0).astype(np.float32)}
    if critic:
        batch.update(advantages=rng.standard_normal((rows, width)).astype(np.float32) * response,
                     old_values=np.zeros((rows, width), np.float32),
                     returns=rng.standard_normal((rows, width)).astype(np.float32) * response)
    else:
        batch["advantages"] = np.linspace(-1.0, 1.0, rows).astype(np.float32)
    return batch


def test_each_variant_trains_its_tree_and_samples_the_base_at_step_zero(tiny):
    cfg, params = tiny
    for name in VARIANTS:
        run, trainable = _variant(name, cfg, params)
        tree = trainable.init(params)
        assert trainable.critic == run.critic.enabled and (trainable.lora is None) == (run.lora is None), name
        policy = trainable.policy_params(tree)
        if trainable.critic:
            assert set(tree) == {"policy", "critic"} and policy is tree["policy"], name
            assert trainable.critic_params(tree) is tree["critic"], name
        else:
            assert trainable.critic_params(tree) is None and policy is tree, name
        if trainable.lora is None:
            assert policy is params and trainable.frozen is None, name
        else:
            assert jax.tree_util.tree_structure(policy) == jax.tree_util.tree_structure(
                trainable.lora.init_adapters()), name
        # B = 0: the merged policy is the base, for the sampler and for the export.
        for weights in (trainable.policy_weights(tree), trainable.exported(tree, params)):
            assert jax.tree_util.tree_structure(weights) == jax.tree_util.tree_structure(params), name
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                                   weights, params)


def test_the_step_loss_of_lora_at_step_zero_equals_full_fine_tuning(tiny):
    """The LoRA variants' loss (adapters merged into the frozen base, B = 0) equals the full variants' loss on the
    same batch, with and without PPO's value term."""
    cfg, params = tiny
    losses = {}
    for name in VARIANTS:
        run, trainable = _variant(name, cfg, params)
        model = CausalLM(cfg, dtype=run.policy.compute_dtype)
        batch = _batch(cfg, trainable.critic)
        loss_fn = trainable.step_loss(lambda p, b, t=trainable, r=run: rl_loss(t, r, model, p, b))
        extra = () if trainable.frozen is None else (trainable.frozen,)
        loss, diag = jax.jit(loss_fn)(trainable.init(params), batch, *extra)
        assert np.isfinite(float(loss)) and ("critic/value_loss" in diag) == trainable.critic, name
        if trainable.critic:  # V = 0 against non-zero returns: a value term that counts
            assert float(diag["critic/value_loss"]) > 0, name
        losses[name] = float(loss)
    assert losses["lora"] == pytest.approx(losses["full"], rel=1e-6)
    assert losses["lora+ppo"] == pytest.approx(losses["ppo"], rel=1e-6)


def test_a_lora_part_that_does_not_match_the_critic_is_refused(tiny):
    cfg, params = tiny
    run = load_config(LORA, ["precision=fp32"])
    lora = LoRA.for_run(run, cfg, params)  # part None: no critic
    with pytest.raises(ValueError, match="LoRA part None does not match critic=True"):
        Trainable(critic=True, lora=lora)
    with pytest.raises(ValueError, match="LoRA export needs the FP32 base"):
        Trainable(lora=lora).exported(Trainable(lora=lora).init(params))
