"""The precision sweep (`jaxrl-fp16 sweep`): the sanity experiment's RL run once per float format and seed, the
sampler and the trainer's compute in that format, and what the format did to the sampler-trainer mismatch and
to training.

A format is a real dtype (`float32`, `bfloat16`, `float16`: precision fp32 / bf16-mixed / fp16-mixed) or an
emulated one ("e8m3", "e5m10", ...: precision fp32 with `model.emulate`, every op's output and every weight
rounded to it in both the JAX sampler and the trainer; `jaxrl_fp16.emulation`). Every run starts from the same
cached warm start and trains on the same prompts (the perfectible set is chosen in FP32).

The two engines differ as an inference engine and a trainer do: the sanity preset's `sampler.fp32_ops` keeps the
rotary embedding and the attention scores unrounded in the sampler (fused kernels), where the trainer rounds them
op by op. In a real dtype or an emulated one alike, the mismatch is then one rounding of the format at those ops,
and falls with the mantissa bits. Without it (`sampler.fp32_ops=[]`) both engines round every op the same way
and differ only where their FP32 sums straddle a rounding boundary: a few rare jumps, not a dose-response.

Each run keeps its own folder `<out>/<format>-s<seed>/` (metrics.jsonl, checkpoints): a second call with the same
output folder skips the runs that finished and continues those that stopped (from their latest checkpoint).
Rows (`sweep.json`) come from `sanity.summarize_arm`, plus:
    kl_k3       mean `mismatch/kl_k3` over the run's iterations
    collapsed   the loss was not finite at some iteration, or the final accuracy (last 5 iterations) ended
                COLLAPSE_MARGIN below the start (first 3 iterations) or below half the peak
    degraded    the final accuracy is more than DEGRADED_MARGIN below the float32 row's of the same seed
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Sequence

import numpy as np

from jaxrl_fp16.emulation import FloatFormat
from jaxrl_fp16.tools.sanity import (EDGE, SMOOTH, Arm, arm_configs, engine_sentence, preset_path, read_metrics,
                               reproducibility, run_status, summarize_arm, train_arm, warm_start_phrase,
                               warm_start_setup)

__all__ = ["SweepFormat", "parse_formats", "QUICK_FORMATS", "FULL_FORMATS", "LONG_FORMATS", "sweep_row",
           "run_sweep", "write_sweep_report", "is_collapsed"]

REAL_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}
QUICK_FORMATS = ("float32", "bfloat16", "float16", "e8m3", "e8m5", "e8m7", "e8m10", "e5m10", "e4m3", "e5m2")
FULL_FORMATS = ("float32", "bfloat16", "float16", "e8m2", "e8m3", "e8m4", "e8m5", "e8m6", "e8m7", "e8m10",
                "e8m13", "e5m10", "e5m7", "e4m3", "e5m2")
LONG_FORMATS = ("float16", "bfloat16")
QUICK_ITERATIONS = 30  # the sanity preset's 60 do not fit 30 minutes on 2 cores with 7 emulated formats
FULL_SEEDS = 3
COLLAPSE_MARGIN = 0.05
DEGRADED_MARGIN = 0.05
ROW_KEYS = ("format", "seed", "kl_k3", "accuracy_final", "accuracy_peak", "collapsed", "mantissa_bits",
            "exponent_bits", "emulated")
# Every run of the sweep: no Hugging Face export (the checkpoints keep the run resumable).
SWEEP_OVERRIDES = ("checkpoint.export_hf=false",)
PROMPT_STATS_FILE = "prompt_stats.json"  # in each run's folder: the training prompts' stats, for the report


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepFormat:
    """One column of the sweep: a real dtype (`emulated=False`) or an emulated eXmY format."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    emulated: bool

    @property
    def precision(self) -> str:
        return REAL_PRECISIONS[self.name] if not self.emulated else "fp32"

    def overrides(self) -> list[str]:
        """The run-config overrides that put a run in this format."""
        return [f"precision={self.precision}"] + ([f"model.emulate={self.name}"] if self.emulated else [])


def parse_format(spec: str) -> SweepFormat:
    """"float32" / "bfloat16" / "float16": the real dtype; anything else `FloatFormat.parse` takes, emulated
    (an alias such as "float8_e4m3" becomes its eXmY name)."""
    name = spec.strip().lower()
    if name in REAL_PRECISIONS:
        fmt = FloatFormat.parse(name)
        return SweepFormat(name=name, exponent_bits=fmt.exponent_bits, mantissa_bits=fmt.mantissa_bits,
                           emulated=False)
    fmt = FloatFormat.parse(name)
    if fmt.is_float32:
        raise ValueError(f"format {spec!r} is float32 itself (nothing to emulate): use the real row 'float32'")
    return SweepFormat(name=fmt.name, exponent_bits=fmt.exponent_bits, mantissa_bits=fmt.mantissa_bits,
                       emulated=True)


def parse_formats(spec: "str | Sequence[str]") -> list[SweepFormat]:
    """A comma list (or a sequence) of formats, in order; empty items and repeats are refused naming them."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if any(not str(i).strip() for i in items) or not items:
        raise ValueError(f"--formats {spec!r}: an empty item; give a comma list such as float16,bfloat16,e8m3")
    out: list[SweepFormat] = []
    for item in items:
        try:
            fmt = parse_format(str(item))
        except ValueError as e:
            raise ValueError(f"--formats: {e}") from None
        if fmt.name in [f.name for f in out]:
            raise ValueError(f"--formats: {fmt.name} given twice")
        out.append(fmt)
    return out


def is_collapsed(summary: dict[str, Any]) -> bool:
    """The module docstring's definition, on a `summarize_arm` row."""
    final = summary["accuracy_final"]
    return (not summary["loss_finite"] or final < summary["accuracy_start"] - COLLAPSE_MARGIN
            or final < 0.5 * summary["accuracy_peak"])


def sweep_row(fmt: SweepFormat, seed: int, lines: Sequence[dict[str, Any]], *, arm: str = "sanity",
              run_dir: str = "") -> dict[str, Any]:
    """One row of `sweep.json` from a run's metrics lines (`degraded` is set by `run_sweep`, which has the
    float32 row)."""
    summary = summarize_arm(lines)
    return {"format": fmt.name, "seed": int(seed), "kl_k3": summary["kl_k3_mean"],
            "accuracy_final": summary["accuracy_final"], "accuracy_peak": summary["accuracy_peak"],
            "collapsed": is_collapsed(summary), "mantissa_bits": fmt.mantissa_bits,
            "exponent_bits": fmt.exponent_bits, "emulated": fmt.emulated, "arm": arm, "precision": fmt.precision,
            "run_dir": run_dir, **summary}


def _seed_overrides(overrides: Sequence[str]) -> None:
    if any(o.partition("=")[0].strip() == "seed" for o in overrides):
        raise ValueError("sweep: seed=N is set per run; use --seeds N (seeds 0..N-1)")


def _train(arm: str, fmt: SweepFormat, seed: int, out: str, overrides: Sequence[str], preset: str,
           progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """Runs (or skips, or continues) one run; returns its row, its prompt stats (None when unknown) and config."""
    name = f"{fmt.name}-s{seed}" if arm == "sanity" else f"{arm}-{fmt.name}-s{seed}"
    run = arm_configs([Arm(name, fmt.precision, "grpo")], overrides=[*SWEEP_OVERRIDES, *overrides,
                                                                     *fmt.overrides()[1:], f"seed={seed}"],
                      progress=progress, preset=preset)[name]
    run_dir = os.path.join(out, name)
    status = run_status(run_dir, run.train.iterations)
    stats_file = os.path.join(run_dir, PROMPT_STATS_FILE)
    if status != "done":
        if status == "new" and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # no checkpoint: nothing to continue
        stats = train_arm(run, run_dir, resume=status == "partial")
        with open(stats_file, "w") as f:
            json.dump(stats, f)
    else:
        stats = None
        if os.path.isfile(stats_file):
            with open(stats_file) as f:
                stats = json.load(f)
    row = sweep_row(fmt, seed, read_metrics(os.path.join(run_dir, "metrics.jsonl")), arm=arm, run_dir=name)
    row["status_before"] = status
    return row, stats, run


def run_sweep(out: str, *, formats: Sequence[SweepFormat] | None = None, seeds: int | None = None,
              quick: bool = True, long: bool | None = None, main: bool = True, overrides: Sequence[str] = (),
              progress: bool = True) -> dict[str, Any]:
    """Trains every (format, seed) into `out/<format>-s<seed>/` and writes `out/sweep.json`, `out/report.md` and
    the plots. Quick: `QUICK_FORMATS`, 1 seed, `QUICK_ITERATIONS`; full: `FULL_FORMATS`, `FULL_SEEDS` seeds, the
    preset's iterations and the long-response arm (`long` decides that alone when given); `main=False` runs the
    long-response arm only."""
    from tqdm.auto import tqdm

    _seed_overrides(overrides)
    formats = list(formats) if formats is not None else parse_formats(QUICK_FORMATS if quick else FULL_FORMATS)
    seeds = seeds if seeds is not None else (1 if quick else FULL_SEEDS)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    long = (not quick) if long is None else long
    main_overrides = [*([f"train.iterations={QUICK_ITERATIONS}"] if quick else []), *overrides]
    jobs = [("sanity", f, s) for s in range(seeds) for f in formats] if main else []
    if long:
        jobs += [("long", f, 0) for f in parse_formats(LONG_FORMATS)]
    for arm, f, s in jobs:  # every config validated before any work
        arm_configs([Arm("check", f.precision, "grpo")], overrides=[*SWEEP_OVERRIDES, *(
            main_overrides if arm == "sanity" else overrides), *f.overrides()[1:], f"seed={s}"],
            preset=preset_path(arm))
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    rows, setups = [], {}
    for arm, f, s in tqdm(jobs, desc="sweep runs", disable=not progress):
        row, stats, run = _train(arm, f, s, out, main_overrides if arm == "sanity" else overrides,
                                 preset_path(arm), progress)
        rows.append(row)
        setups.setdefault(arm, _setup(run, quick))
        if stats:  # each seed has its own base model, hence its own prompt set
            setups[arm].setdefault("prompt_stats", {})[str(s)] = stats
        _write_json(out, rows, setups)  # a partial sweep leaves its rows too
    mark_degraded(rows)
    for setup in setups.values():
        setup["total_seconds"] = time.perf_counter() - started
    return write_sweep_report(out, rows, setups)


def _kept_phrase(setup: dict[str, Any]) -> str:
    """How many perfectible prompts the runs trained on: one number when every seed kept as many, else one per
    seed ("12, 14 and 15 (seeds 0, 1 and 2)"); '?' when no run recorded its prompt stats."""
    kept = {int(seed): stats.get("prompts/kept") for seed, stats in setup.get("prompt_stats", {}).items()}
    kept = {seed: n for seed, n in sorted(kept.items()) if n is not None}
    if not kept:
        return "?"
    if len(set(kept.values())) == 1:
        return str(next(iter(kept.values())))

    def listed(xs: list[Any]) -> str:
        return ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"

    return f"{listed(list(kept.values()))} (seeds {listed(list(kept))})"


def mark_degraded(rows: list[dict[str, Any]]) -> None:
    """Sets each row's `degraded` against the float32 row of the same arm and seed (None without one)."""
    reference = {(r["arm"], r["seed"]): r["accuracy_final"] for r in rows if r["format"] == "float32"}
    for r in rows:
        ref = reference.get((r["arm"], r["seed"]))
        r["degraded"] = None if ref is None else bool(r["accuracy_final"] < ref - DEGRADED_MARGIN)


def _setup(run: Any, quick: bool) -> dict[str, Any]:
    return {"quick": quick, "task": run.task.name, "task_options": dict(run.task.options),
            "task_seed": run.task.seed, **warm_start_setup(run.model.warm_start),
            "iterations": run.train.iterations, "prompts_per_iteration": run.train.prompts_per_iteration,
            "samples_per_prompt": run.train.samples_per_prompt, "max_new_tokens": run.sampler.max_new_tokens,
            "lr": run.optim.lr, "model": dataclasses.asdict(run.model.tiny),
            "sampler_fp32_ops": list(run.sampler.fp32_ops)}


def _write_json(out: str, rows: list[dict[str, Any]], setups: dict[str, Any]) -> None:
    tmp = os.path.join(out, "sweep.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"rows": rows, "setup": setups}, f, indent=2)
    os.replace(tmp, os.path.join(out, "sweep.json"))


def _ratio(rows: list[dict[str, Any]], a: str, b: str, key: str = "kl_k3") -> str:
    """"x.x" for mean(key of a) / mean(key of b) over the main arm's seeds, or why there is no ratio."""
    va = [r[key] for r in rows if r["format"] == a and r["arm"] == "sanity"]
    vb = [r[key] for r in rows if r["format"] == b and r["arm"] == "sanity"]
    if not va or not vb:
        return "n/a (not run)"
    ma, mb = float(np.mean(va)), float(np.mean(vb))
    if mb == 0:
        return "inf (the second is exactly 0)" if ma > 0 else "both exactly 0"
    return f"{ma / mb:.3g}"


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements of the dose-response, computed from the rows (main arm)."""
    main = [r for r in rows if r["arm"] == "sanity"]
    out = []
    if not main:
        return out
    family = [r for r in main if r["exponent_bits"] == 8 and (r["emulated"] or r["format"] == "float32")]
    fam = sorted({r["mantissa_bits"] for r in family})
    kl = {b: float(np.mean([r["kl_k3"] for r in family if r["mantissa_bits"] == b])) for b in fam}
    if len(fam) > 1:
        falls = all(kl[b1] >= kl[b2] for b1, b2 in zip(fam, fam[1:]))
        out.append("kl_k3 (mean over iterations) against mantissa bits, emulated eXmY with 8 exponent bits and "
                   "float32 (m23): "
                   + ", ".join(f"m{b} {kl[b]:.2e}" for b in fam)
                   + (": it falls monotonically as mantissa bits grow." if falls else
                      ": NOT monotonic in mantissa bits."))
    for emulated, real in (("e8m7", "bfloat16"), ("e5m10", "float16")):
        seconds = _ratio(main, emulated, real, "seconds_per_iteration")
        out.append(f"kl_k3 of emulated {emulated} / real {real}: {_ratio(main, emulated, real)}; "
                   f"seconds per iteration, emulated / real: {seconds}.")
    bad = [r for r in main if r["collapsed"] or r.get("degraded")]
    ok = [r for r in main if not r["collapsed"] and r.get("degraded") is False]
    if not any(r["format"] == "float32" for r in main):
        out.append("No float32 run: `degraded` is not defined (run the float32 row to compare against).")
    elif ok:
        fewest = min(ok, key=lambda r: (r["mantissa_bits"], r["exponent_bits"]))
        out.append(f"Fewest mantissa bits that trained as float32 did (not collapsed, final accuracy within "
                   f"{DEGRADED_MARGIN} of float32's): {fewest['format']} ({fewest['mantissa_bits']} bits, final "
                   f"accuracy {fewest['accuracy_final']:.3f}).")
    if bad:
        out.append("Degraded or collapsed: " + ", ".join(
            f"{r['format']} (seed {r['seed']}: final {r['accuracy_final']:.3f}, peak {r['accuracy_peak']:.3f}"
            f"{', collapsed' if r['collapsed'] else ''})" for r in bad) + ".")
    elif ok:
        out.append(f"No format degraded or collapsed: down to {min(r['mantissa_bits'] for r in main)} mantissa "
                   f"bits every run ended within {DEGRADED_MARGIN} of float32's final accuracy.")
    for name in ("bfloat16", "float16"):
        for r in (r for r in main if r["format"] == name):
            out.append(f"{name} (seed {r['seed']}): kl_k3 {r['kl_k3']:.2e}, final accuracy "
                       f"{r['accuracy_final']:.3f}, peak {r['accuracy_peak']:.3f}.")
    return out


def long_findings(rows: list[dict[str, Any]]) -> list[str]:
    """The long-response arm: kl_k3 and the mean (partial-credit) reward at the start and the end."""
    out = []
    for r in (r for r in rows if r["arm"] == "long"):
        out.append(f"{r['format']}: kl_k3 {r['kl_k3_start']:.2e} -> {r['kl_k3_end']:.2e} (first/last {EDGE} "
                   f"iterations), mean reward {r['reward_mean_start']:.3f} -> {r['reward_mean_end']:.3f}, exact "
                   f"accuracy {r['accuracy_start']:.3f} -> {r['accuracy_final']:.3f}, skipped steps "
                   f"{r['skipped_steps']}.")
    fp16 = [r for r in rows if r["arm"] == "long" and r["format"] == "float16"]
    bf16 = [r for r in rows if r["arm"] == "long" and r["format"] == "bfloat16"]
    if fp16 and bf16:
        a, b = fp16[0], bf16[0]
        gain = (a["reward_mean_end"] - a["reward_mean_start"], b["reward_mean_end"] - b["reward_mean_start"])
        verdict = ("BF16 gained less reward than FP16" if gain[1] < gain[0] - 0.02 else
                   "BF16 did not degrade against FP16 (reward gain within 0.02)")
        out.append(f"{verdict}: reward gain FP16 {gain[0]:+.3f}, BF16 {gain[1]:+.3f}; kl_k3 at the end BF16 / FP16 "
                   f"{_safe_ratio(b['kl_k3_end'], a['kl_k3_end'])}.")
    return out


def _safe_ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}" if b > 0 else ("inf (FP16 exactly 0)" if a > 0 else "both exactly 0")


def _curves(out: str, rows: list[dict[str, Any]], arm: str, key: str, file: str, ylabel: str, title: str,
            log: bool = False, smooth: int = 1) -> str:
    from jaxrl_fp16.tools import plots

    series = {f"{r['format']} s{r['seed']}": [m[key] for m in read_metrics(os.path.join(out, r["run_dir"],
                                                                                        "metrics.jsonl"))]
              for r in rows if r["arm"] == arm}
    plots.training_curves(series, os.path.join(out, file), ylabel=ylabel, title=title, log=log, smooth=smooth)
    return file


def write_sweep_report(out: str, rows: list[dict[str, Any]], setups: dict[str, Any]) -> dict[str, Any]:
    """`out/sweep.json`, `out/report.md` and its plots from the rows."""
    from jaxrl_fp16.tools import plots

    main = [r for r in rows if r["arm"] == "sanity"]
    images = []
    if main:
        plots.metric_vs_mantissa_bits(main, os.path.join(out, "accuracy_vs_bits.png"),
                                      keys={"accuracy_final": "final", "accuracy_peak": "peak"},
                                      ylabel="training accuracy (reward = 1)",
                                      title="Training accuracy against the format's mantissa bits")
        plots.metric_vs_mantissa_bits(main, os.path.join(out, "kl_vs_bits.png"), keys={"kl_k3": "kl_k3"},
                                      ylabel="KL(mu || pi), k3, mean over iterations", log=True,
                                      title="Sampler-trainer mismatch against the format's mantissa bits")
        images += ["accuracy_vs_bits.png", "kl_vs_bits.png",
                   _curves(out, rows, "sanity", "reward/accuracy", "accuracy_curves.png",
                           "training accuracy (reward = 1)", "Training accuracy per iteration, per format",
                           smooth=SMOOTH),
                   _curves(out, rows, "sanity", "mismatch/kl_k3", "kl_curves.png", "KL(mu || pi), k3, per token",
                           "Sampler-trainer mismatch per iteration, per format", log=True)]
    if any(r["arm"] == "long" for r in rows):
        images += [_curves(out, rows, "long", "reward/mean", "long_reward.png", "mean reward (partial credit)",
                           "Long-response arm: mean reward per iteration", smooth=SMOOTH),
                   _curves(out, rows, "long", "mismatch/kl_k3", "long_kl.png", "KL(mu || pi), k3, per token",
                           "Long-response arm: sampler-trainer mismatch", log=True)]
    statements, long_statements = findings(rows), long_findings(rows)
    setup = setups.get("sanity") or next(iter(setups.values()), {})
    lines = ["# Precision sweep", ""]
    if setup:
        m = setup["model"]
        lines += [f"Tiny {m['arch']} model ({m['num_layers']} layers, hidden {m['hidden_size']}) warm-started on "
                  f"`{setup['task']}` {setup['task_options']} ({warm_start_phrase(setup, result=False)}, FP32; one "
                  f"cached base model for every run of a seed); {_kept_phrase(setup)} perfectible prompts "
                  f"(chosen in FP32); GRPO, {setup['iterations']} iterations of {setup['prompts_per_iteration']} "
                  f"prompts x {setup['samples_per_prompt']} samples, lr {setup['lr']}. "
                  + ("Quick mode: " + f"{setup['iterations']} iterations instead of the sanity preset's 60 (7 "
                     "emulated formats at ~4 s per iteration would not fit 30 minutes on 2 cores). "
                     if setup.get("quick") else "")
                  + f"RL loop time summed over the runs: {sum(r['wall_seconds'] for r in rows):.0f} s; this "
                  f"invocation: {setup.get('total_seconds', float('nan')):.0f} s (finished runs are skipped).", "",
                  "Each run samples and trains in its format: a real dtype (float32, bfloat16, float16: precision "
                  "fp32, bf16-mixed, fp16-mixed) or an emulated eXmY format (precision fp32 with `model.emulate`: "
                  "every op's output and every weight rounded to the format in the JAX sampler and the trainer). "
                  + engine_sentence(setup.get("sampler_fp32_ops")) + " "
                  "`loss_scale.kind=auto`: dynamic for float16 and for emulated formats with at most 5 exponent "
                  "bits, none otherwise.", ""]
    lines += ["## Findings", "", *[f"- {s}" for s in statements], "", "## Runs", "",
              "| format | emulated | e bits | m bits | seed | kl_k3 (mean) | kl_k3 start | kl_k3 end | start acc | "
              "peak acc | final acc | collapsed | degraded | skipped steps | s/iteration |",
              "|" + "---|" * 15]
    for r in sorted(main, key=lambda r: (-r["exponent_bits"], r["mantissa_bits"], r["emulated"], r["seed"])):
        lines.append(f"| {r['format']} | {'yes' if r['emulated'] else 'no'} | {r['exponent_bits']} | "
                     f"{r['mantissa_bits']} | {r['seed']} | {r['kl_k3']:.2e} | {r['kl_k3_start']:.2e} | "
                     f"{r['kl_k3_end']:.2e} | {r['accuracy_start']:.3f} | {r['accuracy_peak']:.3f} | "
                     f"{r['accuracy_final']:.3f} | {'yes' if r['collapsed'] else 'no'} | "
                     f"{'-' if r.get('degraded') is None else ('yes' if r['degraded'] else 'no')} | "
                     f"{r['skipped_steps']} | {r['seconds_per_iteration']:.2f} |")
    lines += ["", "Definitions (every number from the run's `metrics.jsonl`): kl_k3 (mean): the mean of "
              "`mismatch/kl_k3` over all iterations; start/end: the mean of the first/last "
              f"{EDGE} iterations; peak accuracy: the highest trailing {SMOOTH}-iteration mean; final: the mean of "
              f"the last {SMOOTH} iterations. **collapsed**: a non-finite loss at some iteration, or a final "
              f"accuracy more than {COLLAPSE_MARGIN} below the start accuracy, or below half the peak. "
              f"**degraded**: a final accuracy more than {DEGRADED_MARGIN} below the float32 run's of the same seed. "
              "s/iteration: the median wall time of an iteration after the first (which compiles), on a shared "
              "machine.", ""]
    long_rows = [r for r in rows if r["arm"] == "long"]
    if long_rows:
        ls = setups.get("long", {})
        lines += ["## Long-response arm", "",
                  f"Task `{ls.get('task')}` {ls.get('task_options')}: responses of up to {ls.get('max_new_tokens')} "
                  f"tokens, reward = the fraction of correct characters (partial credit); warm start "
                  f"{warm_start_phrase(ls, result=False)}; {ls.get('iterations')} iterations of "
                  f"{ls.get('prompts_per_iteration')} prompts x {ls.get('samples_per_prompt')} samples.", "",
                  *[f"- {s}" for s in long_statements], ""]
    lines += [*reproducibility({**setup, "seed": "0..N-1 (one per row)"}), ""]
    lines += [f"![{i}]({i})" for i in images] + [""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _write_json(out, rows, setups)
    return {"rows": rows, "setup": setups, "findings": statements, "long_findings": long_statements,
            "images": images}
