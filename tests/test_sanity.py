"""The sanity experiment: a miniature run writes its report, and the report's numbers come from metrics.jsonl."""

import json

import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.sanity import arms_for, findings


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sanity")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["sanity", "--quick", "--out", str(out), "--no-progress", f"model.cache_dir={cache}",
                 "model.warm_start.steps=150", "task.num_problems=64", "perfectible.enabled=false",
                 "train.iterations=6", "train.prompts_per_iteration=8", "train.minibatches_per_iteration=2",
                 "log.tensorboard=false", "checkpoint.export_hf=false"])
    assert code == 0
    return out


def test_report_and_plots_are_written(report_dir):
    for name in ("report.md", "report.json", "accuracy.png", "mismatch_kl.png", "token_scatter.png"):
        assert (report_dir / name).stat().st_size > 500, name
    text = (report_dir / "report.md").read_text()
    assert "| fp16-grpo | fp16-mixed | grpo |" in text and "| bf16-grpo | bf16-mixed | grpo |" in text
    assert "## Findings" in text and ("REPRODUCED" in text or "NOT reproduced" in text)


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


def test_mismatch_is_larger_in_bf16(report_dir):
    rows = json.loads((report_dir / "report.json").read_text())["arms"]
    assert rows["bf16-grpo"]["kl_k3_start"] > rows["fp16-grpo"]["kl_k3_start"]
    assert rows["bf16-grpo"]["prob_abs_diff_mean_end"] > rows["fp16-grpo"]["prob_abs_diff_mean_end"]


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
    rows["bf16-grpo"].update(accuracy_peak=0.96, accuracy_final=0.95, kl_k3_start=2e-6, kl_k3_end=3e-6)
    text = "\n".join(findings(rows))
    assert "NOT reproduced (grpo, start)" in text and "NOT reproduced (grpo): training accuracy ended alike" in text
