"""GPU benchmark: training-step MFU and tokens/s of ~0.5B and ~1.5B Qwen2 shapes (random weights, no network) in
FP16 and BF16, and the JAX sampler's decode throughput. Writes one JSON named after the card.

    python -m benchmarks.gpu --out bench            # on one H100 or H200: about 5-8 minutes
    python -m benchmarks.gpu --smoke --out /tmp/b   # tiny shapes, any backend (checks the script runs)

MFU = model FLOPs per step / (step time x the card's dense peak). Model FLOPs per trained token follow PaLM:
6 N + 12 L H T (N = matmul parameters including the LM head, L layers, H hidden size, T sequence length; the
attention term without a causal discount). Targets: FP16 step time within 5% of BF16 (ratio >= 0.95) and
MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

# Dense half-precision tensor-core peaks (FLOP/s), from the vendors' data sheets (without sparsity).
PEAK_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12}

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


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS.items():  # "H100 PCIe" before "H100"
        if name in device_kind:
            return flops
    return None


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (a check that it runs)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = jax.devices()[0]
    kind = device.device_kind
    peak = peak_flops(kind)
    plan = ([("smoke", 2, 64, 4, 16, 8)] if args.smoke else
            [("qwen2-0.5b", 8, 1024, 64, 128, 256), ("qwen2-1.5b", 4, 1024, 64, 128, 256)])
    out = {"device_kind": kind, "backend": jax.default_backend(), "device_count": jax.device_count(),
           "jax": jax.__version__, "peak_flops": peak, "date": time.strftime("%Y-%m-%d"), "models": {}}
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
    card = "".join(c if c.isalnum() else "_" for c in kind).strip("_").lower() or "unknown"
    path = os.path.join(args.out, f"gpu_{card}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    log.info("wrote %s", path)
    return out


if __name__ == "__main__":
    main()
