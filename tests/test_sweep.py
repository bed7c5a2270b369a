"""The precision sweep: format parsing, the row schema and its `collapsed` rule, a tiny sweep end to end (files,
resume, emulated FP16 against real FP16), the auto loss scale of emulated formats, the long-response task."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.config import load_config
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs, token_logprobs
from jaxrl_fp16.rl.tasks import OptionError, Problem, make_task
from jaxrl_fp16.rl.trainer import make_loss_scale, resolved_loss_scale_kind
from jaxrl_fp16.tools.sanity import preset_path
from jaxrl_fp16.tools.sweep import QUICK_FORMATS, ROW_KEYS, _kept_phrase, parse_formats, sweep_row

NOISE = 1e-11
TINY = ["model.warm_start.steps=300", "model.warm_start.max_rounds=1", "task.num_problems=64",
        "perfectible.enabled=false", "train.iterations=2", "train.prompts_per_iteration=8",
        "train.minibatches_per_iteration=2", "log.tensorboard=false"]


def _line(acc, kl=1e-6, loss=0.1, reward=None):
    return {"reward/accuracy": acc, "reward/mean": acc if reward is None else reward, "mismatch/kl_k3": kl,
            "mismatch/prob_abs_diff_mean": 1e-4, "loss": loss, "skipped_steps": 0, "time/iteration": 1.0}


def test_parse_formats():
    fmts = parse_formats("float32, bfloat16,float16,e8m3,float8_e4m3,E5M2")
    assert [(f.name, f.exponent_bits, f.mantissa_bits, f.emulated) for f in fmts] == [
        ("float32", 8, 23, False), ("bfloat16", 8, 7, False), ("float16", 5, 10, False), ("e8m3", 8, 3, True),
        ("e4m3", 4, 3, True), ("e5m2", 5, 2, True)]
    assert fmts[1].overrides() == ["precision=bf16-mixed"]
    assert fmts[3].overrides() == ["precision=fp32", "model.emulate=e8m3"]
    assert {f.name for f in parse_formats(QUICK_FORMATS)} >= {"float32", "bfloat16", "float16", "e8m3", "e8m5",
                                                               "e8m7", "e8m10", "e5m10", "e4m3", "e5m2"}
    with pytest.raises(ValueError, match="e8m3 given twice"):
        parse_formats("e8m3,e8m3")
    with pytest.raises(ValueError, match="empty item"):
        parse_formats("e8m3,,float16")
    with pytest.raises(ValueError, match="unknown float format 'e9m1x'"):
        parse_formats("e9m1x")
    with pytest.raises(ValueError, match="float32 itself"):
        parse_formats("e8m23")


def test_row_schema_and_collapsed_rule():
    fmt = parse_formats("e8m5")[0]
    steady = [_line(0.6, kl=1e-6), _line(0.8, kl=3e-6), *[_line(0.9, kl=2e-6)] * 6]
    row = sweep_row(fmt, 0, steady)
    assert set(ROW_KEYS) <= set(row)
    assert (row["format"], row["seed"], row["mantissa_bits"], row["exponent_bits"], row["emulated"]) == (
        "e8m5", 0, 5, 8, True)
    assert row["kl_k3"] == pytest.approx((1e-6 + 3e-6 + 6 * 2e-6) / 8)
    assert row["accuracy_final"] == pytest.approx(0.9) and row["collapsed"] is False
    json.dumps(row)  # plain JSON types
    dropped = [*[_line(0.9)] * 6, *[_line(0.3)] * 5]  # below half the peak and below the start
    assert sweep_row(fmt, 0, dropped)["collapsed"] is True
    below_start = [*[_line(0.7)] * 3, *[_line(0.6)] * 5]  # 0.1 below the start, above half the peak
    assert sweep_row(fmt, 0, below_start)["collapsed"] is True
    blown = [*[_line(0.9)] * 7, _line(0.9, loss=math.nan)]
    assert sweep_row(fmt, 0, blown)["collapsed"] is True


def test_the_report_counts_each_seeds_prompt_set():
    """Each seed has its own base model and prompt set: the report gives every seed's count, not the last run's."""
    def setup(*kept):
        return {"prompt_stats": {str(seed): {"prompts/kept": n} for seed, n in kept}}

    assert _kept_phrase(setup((0, 12), (1, 12))) == "12"
    assert _kept_phrase(setup((1, 14), (0, 12))) == "12 and 14 (seeds 0 and 1)"
    assert _kept_phrase(setup((10, 15), (2, 14), (0, 12))) == "12, 14 and 15 (seeds 0, 2 and 10)"
    assert _kept_phrase({}) == "?"
    assert _kept_phrase({"prompt_stats": {"0": {}}}) == "?"


@pytest.mark.parametrize("overrides,kind", [
    (["precision=fp32", "model.emulate=e5m10"], "dynamic"), (["precision=fp32", "model.emulate=e5m2"], "dynamic"),
    (["precision=fp32", "model.emulate=e4m3"], "dynamic"), (["precision=fp32", "model.emulate=e8m7"], "none"),
    (["precision=fp32", "model.emulate=e8m3"], "none"), (["precision=fp16-mixed"], "dynamic"),
    (["precision=bf16-mixed"], "none"), (["precision=fp32"], "none"),
    (["precision=fp32", "model.emulate=e8m7", "loss_scale.kind=static"], "static")])
def test_auto_loss_scale_follows_the_exponent_bits(overrides, kind):
    run = load_config(preset_path(), overrides)
    assert resolved_loss_scale_kind(run) == kind
    if kind in ("dynamic", "none"):
        assert isinstance(make_loss_scale(run), DynamicLossScale if kind == "dynamic" else NoOpLossScale)


def test_digit_string_partial_credit():
    copy = make_task("digit_string", mode="copy", min_len=5, max_len=5, partial_credit=True)
    p = copy.generate(1, 0)[0]
    s = p.metadata["input"]
    assert p.prompt == f"copy {s}=" and p.answer == s and len(s) == 5
    assert copy.reward(p, s) == 1.0 and copy.reward(p, f" {s}\n") == 1.0
    wrong_last = s[:4] + str((int(s[4]) + 1) % 10)
    assert copy.reward(p, wrong_last) == pytest.approx(4 / 5)
    assert copy.reward(p, s + "7") == pytest.approx(5 / 6)  # an extra character costs as a wrong one
    assert copy.reward(p, s[:2]) == pytest.approx(2 / 5)
    assert copy.reward(p, "") == 0.0 and copy.reward(p, s, truncated=True) == 0.0

    rev = make_task("digit_string", mode="reverse", min_len=4, max_len=4, partial_credit=True)
    q = rev.generate(1, 3)[0]
    assert q.answer == q.metadata["input"][::-1] and rev.reward(q, q.answer) == 1.0

    run = make_task("digit_string", mode="running_sum", partial_credit=True)
    assert run.generate(1, 0)[0].prompt.startswith("running_sum ")
    r = Problem(prompt="running_sum 21453=", answer="23725", reference="23725", metadata={"input": "21453"})
    assert run.reward(r, "23725") == 1.0
    assert run.reward(r, "03725") == pytest.approx(3 / 5)  # digit 0 wrong, digit 1 wrong given its own previous
    assert run.reward(r, "24836") == pytest.approx(4 / 5)  # one slip at digit 1, the rest follow from it
    exact = make_task("digit_string", mode="copy", min_len=5, max_len=5)
    assert exact.reward(p, wrong_last) == 0.0
    with pytest.raises(OptionError, match="mode must be one of copy, reverse, running_sum"):
        make_task("digit_string", mode="sort")


def test_long_preset_fits_its_responses():
    run = load_config(preset_path("long"), ["precision=fp16-mixed"])
    task = make_task(run.task.name, **dict(run.task.options))
    longest = max(len(p.answer) for p in task.generate(16, run.task.seed))
    assert longest >= 100 and run.sampler.max_new_tokens > longest  # room for the EOS
    assert run.task.options["partial_credit"] is True


@pytest.fixture(scope="module")
def cache_dir(base_models, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return base_models.cache_dir(load_config(preset_path(), TINY), cache)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("sweep")
    code = main(["sweep", "--quick", "--formats", "float16,e5m10", "--seeds", "1", "--out", str(out),
                 "--no-progress", f"model.cache_dir={cache_dir}", *TINY])
    assert code == 0
    return out


@pytest.mark.slow
def test_tiny_sweep_writes_rows_report_and_plots(sweep_dir):
    rows = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert [(r["format"], r["seed"], r["emulated"]) for r in rows] == [("float16", 0, False), ("e5m10", 0, True)]
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["iterations"] == 2
        lines = [json.loads(x) for x in (sweep_dir / r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        assert r["kl_k3"] == pytest.approx(sum(m["mismatch/kl_k3"] for m in lines) / 2)
    for name in ("report.md", "accuracy_vs_bits.png", "kl_vs_bits.png", "accuracy_curves.png", "kl_curves.png"):
        assert (sweep_dir / name).stat().st_size > 500, name
    text = (sweep_dir / "report.md").read_text()
    assert "**collapsed**" in text
    assert "The JAX sampler keeps rope, attn_scores unrounded in FP32" in text  # the preset's engine model
    assert "| e5m10 | yes | 5 | 10 | 0 |" in text and "| float16 | no | 5 | 10 | 0 |" in text


@pytest.mark.slow
def test_emulated_fp16_mismatch_is_of_real_fp16s_order(sweep_dir):
    """One tiny run each (2 iterations, same prompts and seed): emulated e5m10 against real float16."""
    rows = {r["format"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["rows"]}
    real, emulated = rows["float16"]["kl_k3"], rows["e5m10"]["kl_k3"]
    assert math.isfinite(real) and math.isfinite(emulated)
    low, high = sorted((real, emulated))
    # Below NOISE both are no mismatch (a float32 run's kl_k3 is ~1e-13: the metric's own rounding); otherwise
    # the same order: within 10x.
    assert high < NOISE or (low > 0 and high / low <= 10), (emulated, real)
    # Dynamic loss scaling in both (auto: float16 compute, and e5m10's 5 exponent bits).
    for fmt in ("float16", "e5m10"):
        lines = (sweep_dir / rows[fmt]["run_dir"] / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["loss_scale"] == 65536.0


@pytest.mark.slow
def test_a_second_sweep_skips_finished_runs(sweep_dir, cache_dir):
    before = {r["format"]: (sweep_dir / r["run_dir"] / "metrics.jsonl").read_text()
              for r in json.loads((sweep_dir / "sweep.json").read_text())["rows"]}
    code = main(["sweep", "--quick", "--formats", "float16,e5m10", "--seeds", "1", "--out", str(sweep_dir),
                 "--no-progress", f"model.cache_dir={cache_dir}", *TINY])
    assert code == 0
    rows = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert [r["status_before"] for r in rows] == ["done", "done"]
    assert "? perfectible prompts" not in (sweep_dir / "report.md").read_text()  # the stats kept in the run folder
    for r in rows:
        assert (sweep_dir / r["run_dir"] / "metrics.jsonl").read_text() == before[r["format"]]


@functools.cache
def _random_model():
    """A random tiny model (weights x4, so that rounding moves the log-probs) and tokens to score."""
    cfg = ModelConfig(arch="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=256)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 48), 0, cfg.vocab_size)
    params = CausalLM(cfg).init(jax.random.PRNGKey(0), tokens, *causal_inputs(tokens, None, None))["params"]
    return cfg, tokens, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)


_token_logprobs = jax.jit(token_logprobs, static_argnums=0)  # one program per model (eagerly: many small ones)


def _engine_gap(fmt: str, run) -> float:
    """Mean |log p_sampler - log p_trainer| over the tokens of a random tiny model: the sampler with the preset's
    `sampler.fp32_ops`, the trainer op by op, both in `fmt` (a real dtype, or emulated in float32)."""
    cfg, tokens, params = _random_model()
    real = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    dtype, emulate = (real[fmt], None) if fmt in real else (jnp.float32, fmt)

    def logprobs(ops):
        model = CausalLM(cfg, dtype=dtype, numerics=Numerics.from_overrides(ops, emulate=emulate))
        return np.asarray(_token_logprobs(model, params, tokens))[:, 1:]

    return float(np.abs(logprobs(run.sampler.fp32_ops) - logprobs(run.model.fp32_ops)).mean())


def test_the_sweeps_engines_differ_by_one_rounding_of_the_format():
    """The sweep's sampler keeps rope and the attention scores unrounded (the preset's `sampler.fp32_ops`): the
    gap to the trainer falls with the mantissa bits (about 2x per bit), and each emulated format gives its real
    dtype's gap."""
    run = load_config(preset_path(), [])
    assert set(run.sampler.fp32_ops) == {"rope", "attn_scores"} and run.model.fp32_ops == []
    gaps = {fmt: _engine_gap(fmt, run) for fmt in ("e8m3", "e8m5", "e8m7", "e8m10", "float32", "bfloat16",
                                                    "float16", "e5m10")}
    assert gaps["float32"] == 0.0
    ladder = [gaps[f] for f in ("e8m3", "e8m5", "e8m7", "e8m10")]
    assert all(a > 2 * b > 0 for a, b in zip(ladder, ladder[1:])), gaps
    assert gaps["bfloat16"] == pytest.approx(gaps["e8m7"], rel=0.5), gaps
    assert gaps["float16"] == pytest.approx(gaps["e5m10"], rel=0.5), gaps


def test_sweep_refuses_a_seed_override(tmp_path, capsys):
    code = main(["sweep", "--quick", "--formats", "float16", "--out", str(tmp_path), "--no-progress", "seed=3"])
    assert code == 2 and "use --seeds N" in capsys.readouterr().err
