"""GPU benchmark: training-step MFU and tokens/s of ~0.5B and ~1.5B Qwen2 shapes (random weights, no network) in
FP16 and BF16, the JAX sampler's decode throughput, and the vLLM engine beside JAX (FP16 generation throughput, the
weight push, the sampler-trainer mismatch). Writes one JSON named after the card.

    python -m benchmarks.gpu --out bench            # on one H100 or H200: about 5-8 minutes
    python -m benchmarks.gpu --smoke --out /tmp/b   # tiny shapes, any backend (checks the script runs)

MFU = model FLOPs per step / (step time x the card's dense peak). Model FLOPs per trained token follow PaLM:
6 N + 12 L H T (N = matmul parameters including the LM head, L layers, H hidden size, T sequence length; the
attention term without a causal discount). Targets: FP16 step time within 5% of BF16 (ratio >= 0.95) and
MFU >= 40%.

The vLLM rows (`bench_vllm`, the ~1.5B shape, FP16, the engine in this process beside JAX as in training: vLLM
takes ENGINE_SHARE of the GPU and JAX's pool is capped at the rest before JAX starts). The random model's final
norm is scaled (SHARPEN) so that its next-token distributions are peaked like a trained model's, not uniform.
Checked before timing: the trainer's FP16 log-probs of the engine's own tokens agree with the engine's (token
kl_k3 below MAX_KL) - the engine runs the same model; after a push of perturbed weights they agree with the new
weights and not with the old ones - the engine decodes with what was pushed. Rows: generation tokens/s (sampling
at temperature 1, EOS ignored), seconds and bytes per push (FP32 params -> FP16 -> `reload_weights`), and every
`mismatch/*` metric on one rollout. Without vllm, or (outside --smoke) without a GPU, the rows are skipped with a
message in the JSON.
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import nll_loss
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs
from jaxrl_fp16.sampling import JaxSampler, SamplingSettings
from jaxrl_fp16.step import TrainState, make_train_step

log = logging.getLogger(__name__)

# Dense FP16/BF16 tensor-core peaks (FLOP/s; the data sheets' figures "with sparsity" halved) and HBM bandwidth
# (bytes/s), from NVIDIA's data sheets: H100 SXM 989.4 TFLOPS / 3.35 TB/s, H100 PCIe 756 / 2.0 TB/s, H100 NVL
# 835 / 3.9 TB/s (per GPU), H200 SXM 989.4 / 4.8 TB/s, H200 NVL 835 / 4.8 TB/s, A100 312 / 2.0 TB/s (80 GB SXM;
# 1.555 TB/s for 40 GB), L40S 362.1 / 0.864 TB/s. Keys are matched against the device name by `card_spec`.
CARD_SPECS = {
    "H200 NVL": (835.0e12, 4.8e12),
    "H200": (989.4e12, 4.8e12),
    "H100 NVL": (835.0e12, 3.9e12),
    "H100 PCIe": (756.0e12, 2.0e12),
    "H100": (989.4e12, 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": (312.0e12, 2.0e12),
    "L40S": (362.1e12, 0.864e12),
}
PEAK_FLOPS = {name: spec[0] for name, spec in CARD_SPECS.items()}

ENGINE_SHARE = 0.35  # vLLM's gpu_memory_utilization beside the benchmark's JAX
SHARPEN = 24.0  # the final norm's scale in the vLLM rows' random model (peaked distributions)
MAX_KL = 1e-3  # the engine's and the trainer's FP16 log-probs of the same tokens: token kl_k3 below this

SHAPES = {  # the Qwen2 family's published shapes
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                       head_dim=64, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                       head_dim=128, vocab_size=151936),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                  vocab_size=512),
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(arch="qwen2", qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=4096,
                       rope_theta=1e6, eos_token_ids=(1,), pad_token_id=0, **SHAPES[name])


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.upper()).split()


def card_spec(device_kind: str) -> tuple[str, float, float] | None:
    """(card, dense FP16/BF16 FLOP/s, HBM bytes/s) of a device name as JAX or nvidia-smi report it ("NVIDIA H200
    NVL", "NVIDIA H100 80GB HBM3", "H100 PCIe"); None for a card not in CARD_SPECS. Pure.

    A key matches when its words appear in the name in order, as whole words (so "H100" is not "H1000"); the key
    with the most words wins ("H200 NVL" over "H200")."""
    words = _words(device_kind)
    best = None
    for name, (flops, bandwidth) in CARD_SPECS.items():
        key = _words(name)
        at = [i for i in range(len(words) - len(key) + 1) if words[i] == key[0]]
        if any(all(k in words[i + 1:] for k in key[1:]) for i in at):
            if best is None or len(key) > len(_words(best[0])):
                best = (name, flops, bandwidth)
    return best


def peak_flops(device_kind: str) -> float | None:
    spec = card_spec(device_kind)
    return None if spec is None else spec[1]


def peak_bandwidth(device_kind: str) -> float | None:
    spec = card_spec(device_kind)
    return None if spec is None else spec[2]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)  # norms are not matmuls
    if not cfg.tie_word_embeddings:
        matmul_params -= cfg.vocab_size * cfg.hidden_size  # the input embedding is a lookup
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def init_params(cfg: ModelConfig, seed: int = 0):
    model = CausalLM(cfg, dtype=jnp.float32)
    tokens = jnp.zeros((1, 8), jnp.int32)
    pos, mask = causal_inputs(tokens, None, None)
    return jax.jit(lambda k: model.init(k, tokens, pos, mask)["params"])(jax.random.PRNGKey(seed))


def bench_train(cfg: ModelConfig, params, dtype: str, rows: int, seq_len: int, steps: int) -> dict:
    policy = {"float16": "fp16-mixed", "bfloat16": "bf16-mixed"}[dtype]
    model = CausalLM(cfg, dtype=jnp.dtype(dtype))

    loss_fn = nll_loss(model)  # the CPU benchmark's loss
    optimizer = optax.adamw(1e-5, weight_decay=0.01)
    step = make_train_step(loss_fn, optimizer, policy, donate=True)
    scale = DynamicLossScale(loss_scale=2.0 ** 15) if dtype == "float16" else NoOpLossScale()
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer, scale)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(2, cfg.vocab_size, (rows, seq_len)), jnp.int32),
             "mask": jnp.ones((rows, seq_len), jnp.int32)}
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - start
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens = rows * seq_len
    return {"dtype": dtype, "rows": rows, "seq_len": seq_len, "step_s": step_s, "compile_s": compile_s,
            "tokens_per_s": tokens / step_s, "model_flops_per_step": flops_per_token(cfg, seq_len) * tokens,
            "losses": losses, "skipped_steps": int(state.skipped_steps)}


def bench_decode(cfg: ModelConfig, params, dtype: str, rows: int, prompt_len: int, new_tokens: int) -> dict:
    sampler = JaxSampler(cfg, params, dtype=dtype, max_batch_size=rows)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, prompt_len).tolist() for _ in range(rows)]
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    start = time.perf_counter()
    sampler.generate(prompts, settings)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter()
        sampler.generate(prompts, settings)
        times.append(time.perf_counter() - start)
    sampler.close()
    s = float(np.median(times))
    return {"dtype": dtype, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": s,
            "compile_s": compile_s, "tokens_per_s": rows * new_tokens / s}


def vllm_skip_reason(backend: str, smoke: bool) -> str | None:
    """Why the vLLM rows cannot run here (None: they can): no vllm installed, or JAX not on a GPU (outside
    --smoke, which runs them on any backend vLLM supports, to check the code)."""
    from jaxrl_fp16.sampling.vllm_api import installed_vllm

    if installed_vllm() is None:
        return "vllm is not installed (make install-gpu installs it with JAX for CUDA)"
    if backend != "gpu" and not smoke:
        return f"JAX runs on the {backend}, not a GPU (the vLLM rows measure the engine beside JAX on one GPU)"
    return None


def cap_jax_memory(environ, engine_share: float = ENGINE_SHARE) -> str | None:
    """Caps JAX's preallocated pool so that the vLLM engine finds its share free (`gpu_host.memory_split`); sets
    XLA_PYTHON_CLIENT_MEM_FRACTION unless the user did; returns what was set. Call before JAX starts."""
    from jaxrl_fp16.gpu_host import JAX_FRACTION_ENV, memory_split

    share = memory_split(engine_share, environ.get(JAX_FRACTION_ENV))
    if JAX_FRACTION_ENV in environ:
        return None
    environ[JAX_FRACTION_ENV] = f"{share:.4g}"
    return f"{JAX_FRACTION_ENV}={environ[JAX_FRACTION_ENV]}"


def sharpened(params, factor: float):
    """The params with the final norm's scale multiplied by `factor` (every logit scaled: peaked distributions)."""
    return {**params, "final_norm": jax.tree_util.tree_map(lambda x: x * factor, params["final_norm"])}


def _mismatch(engine, scorer, params, prompts, settings) -> dict:
    """The engine samples, the trainer rescores the same tokens in FP16: the `mismatch/*` metrics."""
    from jaxrl_fp16.tools.analysis import measure_mismatch

    return measure_mismatch(engine, scorer, params, prompts, settings).summary


def bench_vllm(cfg: ModelConfig, params, workdir: str, *, rows: int, prompt_len: int, new_tokens: int,
               repeats: int, engine_share: float = ENGINE_SHARE) -> dict:
    """The vLLM rows (see the module docstring): FP16 generation tokens/s, the weight push (seconds, bytes) and the
    sampler-trainer mismatch, each checked before it is timed. Raises RuntimeError when a check fails."""
    from benchmarks.weight_push import _perturbed
    from jaxrl_fp16.models.hf import save_hf_params
    from jaxrl_fp16.sampling.vllm_sampler import VLLMSampler
    from jaxrl_fp16.scoring import Scorer

    dtype = "float16"
    params = jax.device_get(sharpened(params, SHARPEN))
    model_dir = save_hf_params(params, cfg, os.path.join(workdir, "vllm_model"), dtype=dtype, overwrite=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, prompt_len).tolist() for _ in range(rows)]
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    scorer = Scorer(cfg, dtype=dtype)
    start = time.perf_counter()
    engine = VLLMSampler(model_dir, dtype=dtype, seed=0, gpu_memory_utilization=engine_share,
                         max_model_len=-(-(prompt_len + new_tokens) // 256) * 256)
    out: dict = {"dtype": dtype, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "engine_start_s": time.perf_counter() - start, "engine": dict(engine.engine_settings)}
    try:
        engine.push_weights(params)  # the FP32 params, as the trainer pushes them
        # Check: the trainer's log-probs of the engine's tokens are the engine's (the same model, FP16 rounding).
        metrics = _mismatch(engine, scorer, params, prompts, settings)
        if not (metrics["mismatch/num_tokens"] == rows * new_tokens and metrics["mismatch/kl_k3"] < MAX_KL):
            raise RuntimeError(f"vLLM {dtype}: the trainer does not score the engine's tokens as the engine does "
                               f"(kl_k3 {metrics['mismatch/kl_k3']:.3g}, {metrics['mismatch/num_tokens']:.0f} "
                               f"tokens): timing it would measure another model")
        out["mismatch"] = {k: v for k, v in metrics.items() if k.startswith("mismatch/")}
        out["mismatch"]["check"] = f"kl_k3 {metrics['mismatch/kl_k3']:.3g} < {MAX_KL} on the same tokens"
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            engine.generate(prompts, dataclasses.replace(settings, seed=i + 1))
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        out["generate"] = {"seconds": seconds, "tokens_per_s": rows * new_tokens / seconds,
                           "check": out["mismatch"]["check"]}
        # Check: after a push of perturbed weights the engine's log-probs follow them, not the old ones.
        new = _perturbed(params, 0.5, seed=1)
        engine.push_weights(new)
        follows = _mismatch(engine, scorer, new, prompts, settings)["mismatch/kl_k3"]
        stale = _mismatch(engine, scorer, params, prompts, settings)["mismatch/kl_k3"]
        if not (follows < MAX_KL and stale > 10 * follows):
            raise RuntimeError(f"vLLM push {dtype}: the engine does not decode with the pushed weights (kl_k3 "
                               f"{follows:.3g} against them, {stale:.3g} against the old ones)")
        pushes = []
        for i in range(repeats):
            engine.push_weights(params if i % 2 == 0 else new)
            pushes.append(engine.last_push_seconds)
        nbytes = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) * np.dtype(dtype).itemsize
        push_s = float(np.median(pushes))
        out["push"] = {"seconds": push_s, "bytes": nbytes, "bytes_per_s": nbytes / push_s,
                       "check": f"kl_k3 {follows:.3g} against the pushed weights, {stale:.3g} against the old"}
    finally:
        engine.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (a check that it runs)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from jaxrl_fp16.sampling.vllm_api import installed_vllm

    from jaxrl_fp16._xla_flags import started_backends

    capped = (cap_jax_memory(os.environ) if installed_vllm() is not None and not started_backends()
              else None)  # before JAX starts; a JAX already running keeps its pool
    device = jax.devices()[0]
    kind = device.device_kind
    peak = peak_flops(kind)
    plan = ([("smoke", 2, 64, 4, 16, 8)] if args.smoke else
            [("qwen2-0.5b", 8, 1024, 64, 128, 256), ("qwen2-1.5b", 4, 1024, 64, 128, 256)])
    out = {"device_kind": kind, "backend": jax.default_backend(), "device_count": jax.device_count(),
           "jax": jax.__version__, "card": (card_spec(kind) or (None,))[0], "peak_flops": peak,
           "peak_bandwidth": peak_bandwidth(kind), "jax_memory": capped, "date": time.strftime("%Y-%m-%d"),
           "models": {}}
    for name, rows, seq_len, d_rows, d_prompt, d_new in plan:
        cfg = model_config(name)
        params = init_params(cfg)
        entry = {"params": cfg.num_params(), "train": {}, "decode": {}}
        for dtype in ("bfloat16", "float16"):
            r = bench_train(cfg, params, dtype, rows, seq_len, args.steps)
            r["mfu"] = None if peak is None else r["model_flops_per_step"] / r["step_s"] / peak
            entry["train"][dtype] = r
            log.info("%s train %s: %.3f s/step, %.0f tokens/s, MFU %s", name, dtype, r["step_s"], r["tokens_per_s"],
                     "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}")
            d = bench_decode(cfg, params, dtype, d_rows, d_prompt, d_new)
            entry["decode"][dtype] = d
            log.info("%s decode %s: %.0f tokens/s", name, dtype, d["tokens_per_s"])
        bf, fp = entry["train"]["bfloat16"], entry["train"]["float16"]
        entry["fp16_vs_bf16_step_ratio"] = bf["step_s"] / fp["step_s"]
        entry["targets"] = {"fp16_step_within_5pct_of_bf16": entry["fp16_vs_bf16_step_ratio"] >= 0.95,
                            "mfu_at_least_40pct": None if peak is None else min(bf["mfu"], fp["mfu"]) >= 0.40}
        out["models"][name] = entry
        del params
    os.makedirs(args.out, exist_ok=True)
    skip = vllm_skip_reason(jax.default_backend(), args.smoke)
    if skip is not None:
        log.info("vLLM rows skipped: %s", skip)
        out["vllm"] = {"skipped": skip}
    else:
        name, rows, prompt_len, new_tokens = ("smoke", 4, 16, 16) if args.smoke else ("qwen2-1.5b", 64, 128, 512)
        cfg = model_config(name)
        with tempfile.TemporaryDirectory(dir=args.out) as workdir:
            v = bench_vllm(cfg, init_params(cfg), workdir, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens,
                           repeats=3)
        out["vllm"] = {"model": name, "params": cfg.num_params(), **v}
        log.info("%s vLLM %s: generation %.0f tokens/s; push %.3f s for %.2f GiB; mismatch kl_k3 %.3g", name,
                 v["dtype"], v["generate"]["tokens_per_s"], v["push"]["seconds"], v["push"]["bytes"] / 2 ** 30,
                 v["mismatch"]["mismatch/kl_k3"])
    card = "".join(c if c.isalnum() else "_" for c in kind).strip("_").lower() or "unknown"
    path = os.path.join(args.out, f"gpu_{card}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    log.info("wrote %s", path)
    return out


if __name__ == "__main__":
    main()
