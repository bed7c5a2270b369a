"""The sanity experiment: a miniature run writes its report, and the report's numbers come from metrics.jsonl."""

import json

import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.tools.sanity import arm_configs, arms_for, findings, preset_path, seed_overrides


QUICK = ["model.warm_start.steps=300", "model.warm_start.max_rounds=1", "task.num_problems=64",
         "perfectible.enabled=false", "train.iterations=6", "train.prompts_per_iteration=8",
         "train.minibatches_per_iteration=2", "log.tensorboard=false", "checkpoint.export_hf=false"]


@pytest.fixture(scope="module")
def cache_dir(base_models, tmp_path_factory):
    """This module's model cache, holding the session's shared base model of the quick run (conftest.py)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return base_models.cache_dir(load_config(preset_path(), QUICK), cache)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("sanity")
    code = main(["sanity", "--quick", "--out", str(out), "--no-progress", f"model.cache_dir={cache_dir}", *QUICK])
    assert code == 0
    return out


@pytest.mark.slow
def test_report_and_plots_are_written(report_dir):
    for name in ("report.md", "report.json", "accuracy.png", "mismatch_kl.png", "token_scatter.png"):
        assert (report_dir / name).stat().st_size > 500, name
    text = (report_dir / "report.md").read_text()
    assert "| fp16-grpo | fp16-mixed | grpo |" in text and "| bf16-grpo | bf16-mixed | grpo |" in text
    assert "## Findings" in text and ("REPRODUCED" in text or "NOT reproduced" in text)
    assert "Sanity criterion (grpo) MET" in text or "Sanity criterion (grpo) NOT met" in text
    assert "## Reproducibility" in text and "Seed 0:" in text and "bitwise" in text and "instruction set" in text
    assert "(300 steps; this base: 1 round(s), loss " in text  # the base model's warm start (one round here)


def test_seed_overrides():
    plain = load_config(preset_path())
    seeded = load_config(preset_path(), seed_overrides(["seed=5"]))
    assert (seeded.seed, seeded.model.tiny.seed, seeded.model.warm_start.seed) == (5, 5, 5)
    assert seeded.task.seed == plain.task.seed  # the candidate problems stay task.seed's
    explicit = load_config(preset_path(), seed_overrides(["model.tiny.seed=7", "seed=5"]))
    assert (explicit.model.tiny.seed, explicit.model.warm_start.seed) == (7, 5)
    assert seed_overrides(["optim.lr=1e-4"]) == ["optim.lr=1e-4"]
    with pytest.raises(ConfigError, match="'seed'"):
        load_config(preset_path(), seed_overrides(["seed=many"]))


def test_every_arm_gets_the_seed_and_the_overrides():
    configs = arm_configs(arms_for(quick=True), overrides=["seed=2", "train.iterations=7"])
    assert set(configs) == {"fp16-grpo", "bf16-grpo"}
    for name, run in configs.items():
        assert run.precision == ("fp16-mixed" if name.startswith("fp16") else "bf16-mixed")
        assert (run.seed, run.model.tiny.seed, run.model.warm_start.seed, run.train.iterations) == (2, 2, 2, 7)
    with pytest.raises(ConfigError, match="train.iterations"):
        arm_configs(arms_for(quick=True), overrides=["train.iterations=0"])


@pytest.mark.parametrize("sampler, fp32_ops", [("jax", ["rope", "attn_scores"]), ("transformers", []),
                                               ("vllm", [])])
def test_only_the_jax_sampler_models_fused_kernels(sampler, fp32_ops):
    for run in arm_configs(arms_for(quick=True), sampler=sampler).values():
        assert (run.sampler.name, run.sampler.fp32_ops) == (sampler, fp32_ops)


def test_the_preset_keeps_the_papers_setup():
    """Perfectible prompts (20-80%), GRPO, FP16 with dynamic loss scaling against BF16."""
    run = load_config(preset_path())
    assert (run.perfectible.enabled, run.perfectible.low, run.perfectible.high) == (True, 0.2, 0.8)
    assert run.loss.algorithm == "grpo" and run.loss_scale.kind == "auto" and run.model.path is None
    assert [(a.precision, a.algorithm) for a in arms_for(quick=True)] == [("fp16-mixed", "grpo"),
                                                                         ("bf16-mixed", "grpo")]


@pytest.mark.slow
def test_a_row_recomputed_from_metrics_jsonl(report_dir):
    """Recomputes the bf16 row with plain Python from the arm's metrics lines."""
    row = json.loads((report_dir / "report.json").read_text())["arms"]["bf16-grpo"]
    with open(report_dir / "bf16-grpo" / "metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    acc = [m["reward/accuracy"] for m in lines]
    trailing = [sum(acc[max(0, i - 4):i + 1]) / len(acc[max(0, i - 4):i + 1]) for i in range(len(acc))]
    assert row["iterations"] == 6
    assert row["accuracy_peak"] == pytest.approx(max(trailing), abs=1e-12)
    assert row["accuracy_final"] == pytest.approx(sum(acc[-5:]) / 5, abs=1e-12)
    kl = [m["mismatch/kl_k3"] for m in lines]
    assert row["kl_k3_start"] == pytest.approx(sum(kl[:3]) / 3, rel=1e-12)
    assert row["kl_k3_end"] == pytest.approx(sum(kl[-3:]) / 3, rel=1e-12)
    pad = [m["mismatch/prob_abs_diff_mean"] for m in lines]
    assert row["prob_abs_diff_mean_end"] == pytest.approx(sum(pad[-3:]) / 3, rel=1e-12)
    assert row["skipped_steps"] == lines[-1]["skipped_steps"]
    assert row["wall_seconds"] == pytest.approx(sum(m["time/iteration"] for m in lines))
    # And the markdown table shows that row's numbers.
    text = (report_dir / "report.md").read_text()
    assert f"| {row['accuracy_final']:.3f} | {row['kl_k3_start']:.2e} |" in text


@pytest.mark.slow
def test_mismatch_is_not_smaller_in_bf16(report_dir):
    """The JAX engine's two paths may be bit-identical on some CPUs (then both are 0): no lower bound."""
    rows = json.loads((report_dir / "report.json").read_text())["arms"]
    assert rows["bf16-grpo"]["kl_k3_start"] >= rows["fp16-grpo"]["kl_k3_start"] >= 0
    assert rows["bf16-grpo"]["prob_abs_diff_mean_end"] >= rows["fp16-grpo"]["prob_abs_diff_mean_end"] >= 0


def test_arms_and_findings_logic():
    full = arms_for(quick=False)
    assert len(full) == 1 + 2 * 9 and {a.precision for a in full} == {"fp32", "fp16-mixed", "bf16-mixed"}
    base = dict(algorithm="grpo", iterations=100, skipped_steps=0, prob_abs_diff_mean_start=0,
                prob_abs_diff_mean_end=0)
    rows = {"fp16-grpo": dict(base, precision="fp16-mixed", accuracy_peak=0.97, accuracy_final=0.96,
                              kl_k3_start=1e-6, kl_k3_end=2e-6),
            "bf16-grpo": dict(base, precision="bf16-mixed", accuracy_peak=0.90, accuracy_final=0.40,
                              kl_k3_start=1e-4, kl_k3_end=1e-1)}
    text = "\n".join(findings(rows))
    assert "REPRODUCED (grpo): BF16 training collapsed" in text and "100x" in text
    assert "Sanity criterion (grpo) MET: FP16 final training accuracy 0.960 >= 0.9" in text
    rows["bf16-grpo"].update(accuracy_peak=0.96, accuracy_final=0.95, kl_k3_start=2e-6, kl_k3_end=3e-6)
    text = "\n".join(findings(rows))
    assert "NOT reproduced (grpo, start)" in text and "NOT reproduced (grpo): training accuracy ended alike" in text
    rows["fp16-grpo"].update(kl_k3_start=0.0)
    rows["bf16-grpo"].update(kl_k3_start=0.0)
    text = "\n".join(findings(rows))
    assert "NOT reproduced (grpo, start): no sampler-trainer mismatch in either precision" in text
    assert "REPRODUCED (grpo, start)" not in text
    rows["fp16-grpo"].update(accuracy_peak=0.55, accuracy_final=0.5)
    assert "Sanity criterion (grpo) NOT met: FP16 final training accuracy 0.500 < 0.9" in "\n".join(findings(rows))


def test_the_warm_start_phrase_states_the_rule_and_the_base():
    from jaxrl_fp16.tools.sanity import warm_start_phrase

    rounds = {"warm_start_steps": 2000, "warm_start_target": 0.05, "warm_start_max_rounds": 3}
    recorded = {"warm_start/rounds": 2, "warm_start/loss": 0.00456}
    assert warm_start_phrase({**rounds, **recorded}) == ("2000 steps per round, until a round's last tenth has a "
                                                         "mean loss of at most 0.05 (at most 3 rounds); this base: "
                                                         "2 round(s), loss 0.005")
    assert warm_start_phrase({**rounds, **recorded}, result=False).endswith("(at most 3 rounds)")
    assert warm_start_phrase({"warm_start_steps": 300, "warm_start_target": 0.05, "warm_start_max_rounds": 1,
                              **recorded}) == "300 steps; this base: 2 round(s), loss 0.005"
    assert warm_start_phrase({"warm_start_steps": 300}) == "300 steps"
