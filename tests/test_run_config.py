"""The run config: every shipped config parses; bad configs fail before any work, naming the valid choices."""

import dataclasses
import glob
import os
import types
import typing

import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.config import (ConfigError, LoRASection, OptimSection, RunConfig, TaskSection, TrainSection,
                               load_config, to_yaml)
from jaxrl_fp16.loss_scale import DynamicLossScale
from jaxrl_fp16.rl.losses import LossConfig
from jaxrl_fp16.rl.trainer import make_loss_scale, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_are_shipped():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    assert {"tiny_fp16.yaml", "tiny_bf16.yaml"} <= names
    assert any(n.startswith("matrix/") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert load_config(None, []) is not None
    # The resolved config round-trips through YAML.
    out = os.path.join(os.path.dirname(path), ".roundtrip.yaml")
    try:
        with open(out, "w") as f:
            f.write(to_yaml(cfg))
        assert load_config(out) == cfg
    finally:
        os.remove(out)


def test_fp16_and_bf16_tiny_configs_differ_only_in_precision():
    a = load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"))
    b = load_config(os.path.join(ROOT, "configs", "tiny_bf16.yaml"))
    assert (a.precision, b.precision) == ("fp16-mixed", "bf16-mixed")
    import dataclasses

    assert dataclasses.replace(b, precision=a.precision) == a


def test_overrides_and_steps():
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"),
                      ["loss.algorithm=gspo", "train.iterations=3", "precision=bf16-mixed", "optim.lr=1e-5"])
    assert (cfg.loss.algorithm, cfg.train.iterations, cfg.precision, cfg.optim.lr) == ("gspo", 3, "bf16-mixed",
                                                                                      1e-5)
    assert str(cfg.policy) == "p=f32,c=bf16,o=f32"


@pytest.mark.parametrize("override, words", [
    ("train.iterationz=3", ["train.iterationz", "iterations", "prompts_per_iteration"]),
    ("train.iterations=many", ["train.iterations", "Integer"]),
    ("precision=fp17", ["fp17", "fp16-mixed", "bf16-mixed"]),
    ("loss.algorithm=grpoo", ["grpoo", "grpo_token_tis", "gspo", "pg_seq_mis"]),
    ("loss.aggregation=mean", ["mean", "token-mean", "seq-mean-token-sum-norm"]),
    ("sampler.name=sglang", ["sglang", "jax", "vllm"]),
    ("task.name=additon", ["additon", "addition", "count"]),
    ("loss_scale.kind=dynamc", ["dynamc", "dynamic", "static"]),
    ("model.fp32_ops=[lm_heads]", ["lm_heads", "lm_head"]),
    ("model.layer_loop=unroll", ["model.layer_loop", "scan", "unrolled"]),
    ("sampler.fp32_ops=[ropes]", ["sampler.fp32_ops", "ropes", "rope"]),
    ("optimm.lr=1", ["optimm", "optim", "loss_scale"]),
    ("train.minibatches_per_iteration=3", ["minibatches_per_iteration=3"]),
])
def test_bad_configs_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), [override])
    for w in words:
        assert w in str(e.value)


def test_sampler_fp32_ops_reach_the_jax_sampler_only():
    path = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
    run = load_config(path, ["model.fp32_ops=[lm_head]", "sampler.fp32_ops=[rope,attn_scores]"])
    numerics = run.sampler_numerics()
    assert (numerics.lm_head_f32, numerics.rope_f32, numerics.attn_scores_f32) == (True, True, True)
    assert not run.model.numerics().rope_f32  # the trainer keeps its own
    with pytest.raises(ConfigError, match=r"sampler.fp32_ops=\['rope'\] needs sampler.name=jax"):
        load_config(path, ["sampler.name=transformers", "sampler.fp32_ops=[rope]"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(loop)
    scalar = tmp_path / "s.yaml"
    scalar.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_cli_fails_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", os.path.join(ROOT, "configs", "tiny_fp16.yaml"), "--run-dir", str(run_dir),
                 "loss.algorithm=ppo", f"model.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    assert "valid: pg, grpo" in capsys.readouterr().err
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_the_sanity_preset_parses():
    from jaxrl_fp16.tools.sanity import preset_path

    assert load_config(preset_path()).train.samples_per_prompt >= 2


# --- every float is finite --------------------------------------------------------------------------------------

def _float_keys(cls=RunConfig, prefix=""):
    """The dotted keys of every float (or optional float) field of the run config, found from the type hints."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
        elif tp is float:
            yield key


FLOAT_KEYS = sorted(_float_keys())


def test_float_keys_cover_every_section():
    assert {"optim.lr", "optim.eps", "loss_scale.max_scale", "loss_scale.factor", "sampler.temperature",
            "sampler.top_p", "loss.eps_high", "loss.is_cap", "loss.kl_coef", "critic.vf_coef", "critic.value_clip",
            "dpo.beta", "dpo.label_smoothing", "lora.alpha", "model.warm_start.lr", "perfectible.low",
            "perfectible.high", "optim.max_grad_norm"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", ".inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert key in str(e.value) and "finite" in str(e.value)


def test_null_still_switches_a_limit_off():
    run = load_config(None, ["optim.max_grad_norm=null", "critic.value_clip=null"])
    assert run.optim.max_grad_norm is None and run.critic.value_clip is None


def test_sections_built_directly_check_types_and_finiteness():
    with pytest.raises(ConfigError, match=r"optim\.lr=inf must be a finite number"):
        OptimSection(lr=float("inf"))
    with pytest.raises(ConfigError, match=r"train\.iterations must be an integer, got '3'"):
        TrainSection(iterations="3")
    with pytest.raises(ConfigError, match=r"train\.iterations must be an integer, got True"):
        TrainSection(iterations=True)
    with pytest.raises(ConfigError, match=r"lora\.targets must be a list of strings"):
        LoRASection(targets="q_proj")
    with pytest.raises(ValueError, match=r"loss\.eps_high must be a finite number"):
        LossConfig(eps_high=float("inf"))
    with pytest.raises(ConfigError, match=r"optim\.b1 must be in \[0, 1\)"):
        dataclasses.replace(load_config(None).optim, b1=1.0)


# --- cross-field checks run at load, before any work -------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["loss_scale.min_scale=1e9"], ["loss_scale.min_scale", "loss_scale.max_scale", "1000000000.0"]),
    (["loss_scale.init_scale=1e30"], ["loss_scale.init_scale", "loss_scale.max_scale"]),
    (["loss_scale.kind=dynamic", "loss_scale.init_scale=0.5"], ["loss_scale.min_scale", "loss_scale.init_scale"]),
    (["loss_scale.factor=1"], ["loss_scale.factor must be > 1"]),
    (["loss_scale.period=0"], ["loss_scale.period must be > 0"]),
    (["loss_scale.period=4294967296"], ["loss_scale.period", "int32"]),
    (["loss_scale.max_scale=1e39"], ["loss_scale.max_scale", "float32"]),
    (["loss_scale.min_scale=0"], ["loss_scale.min_scale must be > 0"]),
    (["optim.b1=1"], ["optim.b1 must be in [0, 1)"]),
    (["optim.b2=-0.1"], ["optim.b2 must be in [0, 1)"]),
    (["optim.eps=-1e-8"], ["optim.eps must be >= 0"]),
    (["optim.weight_decay=-0.01"], ["optim.weight_decay must be >= 0"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps must be >= 0"]),
    (["train.eval_every=-1"], ["train.eval_every must be >= 0"]),
    (["train.eval_samples_per_prompt=0"], ["train.eval_samples_per_prompt must be > 0"]),
    (["optim.max_grad_norm=0"], ["optim.max_grad_norm must be > 0"]),
    (["sampler.top_k=-1"], ["sampler.top_k must be >= 0"]),
    (["sampler.temperature=0"], ["sampler.temperature must be > 0"]),
    (["sampler.dtype=fp16-mixed"], ["sampler.dtype", "float16", "bfloat16"]),
    (["sampler.dtype=bfloat16"], ["sampler.dtype=bfloat16", "precision=fp16-mixed", "allow_dtype_mismatch"]),
    (["sampler.max_new_tokens=512"], ["sampler.max_new_tokens=512", "model.tiny.max_position_embeddings=512"]),
    (["checkpoint.export_dtype=int8"], ["checkpoint.export_dtype='int8'", "float32, float16, bfloat16"]),
    (["model.warm_start.warmup_steps=-1"], ["model.warm_start.warmup_steps must be >= 0"]),
    (["model.warm_start.lr=0"], ["model.warm_start.lr must be > 0"]),
    (["model.warm_start.target_loss=0"], ["model.warm_start.target_loss must be > 0"]),
    (["model.warm_start.max_rounds=0"], ["model.warm_start.max_rounds must be > 0"]),
    (["model.warm_start.max_rounds=3"], ["model.warm_start.max_rounds=3", "model.warm_start.target_loss"]),
    (["model.tiny.num_kv_heads=3"], ["model.tiny.num_heads=4", "model.tiny.num_kv_heads=3"]),
    (["model.tiny.hidden_size=100", "model.tiny.num_heads=8"], ["model.tiny.hidden_size=100", "num_heads=8"]),
    (["model.tiny.vocab_size=100"], ["model.tiny.vocab_size=100", "258"]),
    (["model.tiny.num_layers=0"], ["model.tiny.num_layers must be > 0"]),
    (["debug.inject_overflow_steps=[-1]"], ["debug.inject_overflow_steps"]),
    (["dpo.beta=0"], ["dpo.beta"]),
    (["perfectible.low=0.9"], ["perfectible.low/high"]),
    (["loss.aggregation=seq-mean-token-sum-norm"], ["loss.max_response_len"]),
])
def test_cross_field_checks_name_the_keys(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), overrides)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("min_scale, init_scale, max_scale, factor", [
    (1e9, 65536.0, 2.0**24, 2.0), (1.0, 2.0**30, 2.0**24, 2.0), (1.0, 65536.0, 2.0**24, 1.0),
])
def test_loss_scale_section_refuses_what_the_loss_scale_would(min_scale, init_scale, max_scale, factor):
    overrides = [f"loss_scale.min_scale={min_scale}", f"loss_scale.init_scale={init_scale}",
                 f"loss_scale.max_scale={max_scale}", f"loss_scale.factor={factor}"]
    with pytest.raises(ConfigError):
        load_config(None, ["loss_scale.kind=dynamic", *overrides])
    with pytest.raises(ValueError):  # what the trainer would have hit after its warm start
        DynamicLossScale(loss_scale=init_scale, min_loss_scale=min_scale, max_loss_scale=max_scale, factor=factor)
    # A static scale reads init_scale only, so the dynamic bounds do not apply to it.
    static = load_config(None, ["loss_scale.kind=static", *overrides])
    assert float(make_loss_scale(static).loss_scale) == init_scale


@pytest.mark.parametrize("overrides", [
    [], ["loss_scale.kind=dynamic", "loss_scale.min_scale=4", "loss_scale.init_scale=4", "loss_scale.max_scale=4"],
    ["optim.b1=0", "optim.b2=0.999", "optim.eps=0", "optim.warmup_steps=5", "critic.enabled=true",
     "critic.lr_scale=10"],
])
def test_what_validation_accepts_the_trainer_builds(overrides):
    run = load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), overrides)
    assert make_loss_scale(run) is not None
    import jax.numpy as jnp

    optimizer = make_optimizer(run)
    params = {"policy": {"w": jnp.ones(3)}, "critic": {"w": jnp.ones(3)}} if run.critic.enabled else {"w": jnp.ones(3)}
    assert optimizer.init(params) is not None


# --- group advantages need a group -------------------------------------------------------------------------------

def test_one_sample_per_prompt_is_refused_with_group_advantages():
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), ["train.samples_per_prompt=1"])
    assert "train.samples_per_prompt=1" in str(e.value) and "critic.enabled" in str(e.value)
    # PPO's GAE advantages need no group; pass rates are fine from one sample.
    ppo = load_config(os.path.join(ROOT, "configs", "matrix", "tiny_ppo.yaml"), ["train.samples_per_prompt=1"])
    assert ppo.train.samples_per_prompt == 1 and ppo.critic.enabled
    assert load_config(None, ["perfectible.samples_per_prompt=1"]).perfectible.samples_per_prompt == 1


# --- task options are validated at load ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["task.options.max_digits=abc"], ["task.options.max_digits", "integer", "'abc'"]),
    (["task.options.max_digits=2.5"], ["task.options.max_digits", "integer"]),
    (["task.options.truncated_reward=nan"], ["task.options.truncated_reward", "finite"]),
    (["task.options.truncated_reward=.nan"], ["task.options.truncated_reward", "finite"]),
    (["task.options.truncated_reward=.inf"], ["task.options.truncated_reward", "finite"]),
    (["task.options.partial_credit=maybe"], ["task.options.partial_credit", "true or false"]),
    (["task.options.min_digits=3"], ["task.options.min_digits", "task.options.max_digits"]),
    (["task.options.max_digit=3"], ["task.options.max_digit", "max_digits, min_digits"]),
    (["task.name=reverse", "task.options={alphabet: 'a b'}"], ["task.options.alphabet"]),
    (["task.name=math", "task.options={dataset: arc_1d}"], ["task.options.dataset", "gsm_symbolic"]),
    (["task.name=math", "task.options={use_math_verify: maybe}"], ["task.options.use_math_verify"]),
    (["task.name=math", "task.options={dataset_options: {difficulty: .inf}}"], ["task.options.dataset_options"]),
])
def test_task_options_are_validated_at_load(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_good_task_options_load():
    run = load_config(None, ["task.name=math", "task.options={dataset: chain_sum, dataset_options: {min_terms: 2}}"])
    assert run.task.options == {"dataset": "chain_sum", "dataset_options": {"min_terms": 2}}
    assert load_config(None, ["task.options.truncated_reward=-1"]).task.options == {"truncated_reward": -1}
    with pytest.raises(ConfigError, match=r"task\.options\.max_digits"):
        TaskSection(options={"max_digits": "2"})


# --- interpolation: references to keys yes, resolvers no -----------------------------------------------------------

def test_plain_references_resolve(tmp_path):
    cfg = tmp_path / "ref.yaml"
    cfg.write_text("train: {iterations: 7}\ncheckpoint: {every: '${train.iterations}'}\n"
                   "model: {cache_dir: cache, path: '${model.cache_dir}/base'}\n")
    run = load_config(cfg, ["log.progress=${log.tensorboard}", "log.tensorboard=false"])
    assert (run.checkpoint.every, run.model.path, run.log.progress) == (7, "cache/base", False)
    assert "${" not in to_yaml(run)


@pytest.mark.parametrize("value, resolver", [("${oc.env:HOME}", "oc.env"), ("${oc.env:HOME,x}", "oc.env"),
                                             ("a/${oc.env:HOME}/b", "oc.env"), ("${oc.decode:'1'}", "oc.decode"),
                                             ("${${model.cache_dir}:x}", "${model.cache_dir}")])
def test_resolvers_are_refused_naming_the_key(tmp_path, monkeypatch, value, resolver):
    monkeypatch.setenv("HOME", "secret-home")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.path={value}"])
    assert "model.path" in str(e.value) and repr(resolver) in str(e.value) and "secret-home" not in str(e.value)
    cfg = tmp_path / "env.yaml"
    cfg.write_text(f"model:\n  tiny: {{arch: qwen2}}\n  path: \"{value}\"\n")
    with pytest.raises(ConfigError, match=r"model\.path="):
        load_config(cfg)


def test_environment_secrets_never_reach_the_config(monkeypatch):
    monkeypatch.setenv("JAXRL_TEST_SECRET", "hunter2")
    with pytest.raises(ConfigError, match="oc.env"):
        load_config(None, ["task.options={truncated_reward: '${oc.env:JAXRL_TEST_SECRET}'}"])
    with pytest.raises(ConfigError, match=r"seed="):
        load_config(None, ["seed=${oc.env:JAXRL_TEST_SECRET,0}"])


def test_python_yaml_tags_are_refused(tmp_path):
    made = tmp_path / "made-by-yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  path: !!python/object/apply:os.mkdir ['{made}']\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML.*python/object/apply"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override .model.path=!!python"):
        load_config(None, [f"model.path=!!python/object/apply:os.mkdir ['{made}']"])
    assert not made.exists()


# --- wrong-typed overrides name the key ----------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "train.iterations=abc", "train.iterations=1.5", "train.iterations=true", "model.fp32_ops=norm",
    "lora.targets=q_proj", "mesh.data=x", "model.tiny=3", "model.tiny.arch=[qwen2]", "task.options=3",
    "debug.inject_overflow_steps=3", "debug.inject_overflow_steps=[a]", "optim.lr=true", "optim.lr=fast",
    "loss.max_response_len=abc", "sampler.top_p=abc", "log.progress=maybe", "seed=1.5", "lora.rank=x",
    "distributed.num_processes=x", "critic.gamma=abc", "task.num_problems=many", "dpo.beta=[1]",
    "perfectible.enabled=maybe", "loss_scale.period=1.5",
])
def test_wrong_typed_overrides_name_the_key(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), [override])
    assert key in str(e.value), str(e.value)


@pytest.mark.parametrize("override", ["optim.lr=inf", "loss_scale.min_scale=1e9", "train.samples_per_prompt=1",
                                      "task.options.max_digits=abc", "model.path=${oc.env:HOME}"])
def test_cli_refuses_hostile_overrides_before_any_work(tmp_path, capsys, override):
    run_dir = tmp_path / "run"
    code = main(["train", os.path.join(ROOT, "configs", "tiny_fp16.yaml"), "--run-dir", str(run_dir), override,
                 f"model.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert override.partition("=")[0] in err and err.count("\n") == 1
    assert not run_dir.exists() and not (tmp_path / "cache").exists()
