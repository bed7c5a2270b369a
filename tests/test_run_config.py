"""The run config: every shipped config parses; bad configs fail before any work, naming the valid choices."""

import glob
import os

import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.config import ConfigError, RunConfig, load_config, to_yaml

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
    ("optimm.lr=1", ["optimm", "optim", "loss_scale"]),
    ("train.minibatches_per_iteration=3", ["minibatches_per_iteration=3"]),
])
def test_bad_configs_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny_fp16.yaml"), [override])
    for w in words:
        assert w in str(e.value)


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
