"""`jaxrl-fp16 plan`: the per-device memory of a run, measured ahead of time by XLA before any work.

From the run config and the model's `config.json` alone (no weights, nothing allocated, no network), the plan
builds the trainer's real update step (`rl.trainable.make_rl_step`: `rl_loss` in `step.make_train_step`, the run's
optimizer, loss scale and mesh shardings) and its scorer (`scoring._score`) at the run's widest shapes, lowers and
compiles both with `jax.ShapeDtypeStruct` inputs, and reads `compiled.memory_analysis()`; `plan_verdict`
turns it into bytes per device by item (params, optimizer, gradients, activations, sampler, reserved) and the
verdict.

Shapes: a mini-batch's rows (`train.prompts_per_iteration x samples_per_prompt / minibatches_per_iteration`,
split into `train.microbatches` inside the step) at the widest width the trainer pads to (its fixed width:
the prompt bound, `sampler.max_model_len` or `default_max_model_len`, i.e. prompt + `sampler.max_new_tokens`,
at most the model's context); the scorer's rows per batch from `train.score_memory_gib` (`Scorer.rows`).

Devices: with the devices of this process (the trainer's own plan, and `plan` when N matches) the plan compiles
in-process for them; otherwise in a subprocess on N simulated CPU devices
(`--xla_force_host_platform_device_count=N`). A plan for a GPU compiled by XLA:CPU resolves `auto` attention
and remat as on a GPU and stands blockwise attention in for cuDNN's fused kernel (README "Memory plan").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_fp16.config import RunConfig
from jaxrl_fp16.gpu_host import JAX_DEFAULT_FRACTION, JAX_FRACTION_ENV, PREALLOCATE_ENV, host_memory
from jaxrl_fp16.memory import format_bytes
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.tools.plan_verdict import (ITEMS, Measured, MemoryPlan, PlanShapes, check_plan, format_plan,
                                          make_plan)

__all__ = ["PLAN_MIN_PARAMS", "model_config", "plan_width", "plan_shapes", "measure", "measure_in_subprocess",
           "plan_run", "plan_before_training", "MODEL_SHAPES", "write_config_json", "main"]

log = logging.getLogger(__name__)

PLAN_MIN_PARAMS = 50_000_000  # `train --plan auto`: smaller models train without the plan's compile
_WORKER_FLAG = "--xla_force_host_platform_device_count"
_GIB = 1024 ** 3


# ----- what is planned (pure) -----

def model_config(run: RunConfig) -> ModelConfig:
    """The run's architecture from `model.path`'s config.json (nothing else is read), or the tiny model's."""
    if run.model.path is not None:
        return ModelConfig.from_hf_dir(run.model.path)
    t = run.model.tiny
    return ModelConfig(arch=t.arch, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                       intermediate_size=t.intermediate_size, num_layers=t.num_layers, num_heads=t.num_heads,
                       num_kv_heads=t.num_kv_heads, head_dim=t.hidden_size // t.num_heads,
                       qkv_bias=t.arch == "qwen2", qk_norm=t.arch == "qwen3",
                       tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings)


def plan_width(run: RunConfig, cfg: ModelConfig) -> int:
    """The widest row the trainer pads to: the prompt bound plus `sampler.max_new_tokens` (`sampler.max_model_len`
    where set, else `default_max_model_len`), at most the model's context. The trainer's buckets are capped at its
    fixed width (longest prompt + max_new_tokens), which this bounds."""
    from jaxrl_fp16.sampling.options import default_max_model_len

    bound = run.sampler.max_model_len or default_max_model_len(run.sampler.max_new_tokens)
    return int(min(bound, cfg.max_position_embeddings))


def plan_shapes(run: RunConfig, cfg: ModelConfig, trainer_devices: int) -> PlanShapes:
    """The shapes of a run whose mesh spans `trainer_devices` devices; a ConfigError names the keys when the
    devices or the rows do not split."""
    from jaxrl_fp16.config import ConfigError
    from jaxrl_fp16.scoring import Scorer

    t = run.train
    mesh = run.mesh.shape(trainer_devices)
    rows = t.prompts_per_iteration * t.samples_per_prompt // t.minibatches_per_iteration
    split = mesh["data"] * mesh["fsdp"]
    if rows % split:  # the trainer's rule (`trainer.make_run_mesh`)
        raise ConfigError(f"a mini-batch of {rows} rows (train.prompts_per_iteration x train.samples_per_prompt / "
                          f"train.minibatches_per_iteration) does not split over mesh.data x mesh.fsdp = {split} "
                          f"devices")
    width = plan_width(run, cfg)
    scorer = Scorer(cfg, dtype=run.policy.compute_dtype, numerics=run.model.numerics(),
                    memory_gib=t.score_memory_gib, **run.model.forward_options())
    score_rows = scorer.rows(width, t.prompts_per_iteration * t.samples_per_prompt)
    return PlanShapes(mesh=mesh, step_rows=rows, microbatches=t.microbatches, width=width, score_rows=score_rows,
                      score_width=width)


# ----- the model as the trainer builds it -----

def _model_options(run: RunConfig, cfg: ModelConfig, width: int, backend: str) -> tuple[dict[str, Any], str]:
    """CausalLM's attention/remat fields for `backend` (None: where they do not exist yet), and a note."""
    from jaxrl_fp16.models.decoder import CausalLM

    fields = {f.name for f in dataclasses.fields(CausalLM)}
    if not {"attention", "remat"} <= fields:
        return {}, "attention dense, no remat (CausalLM has no attention/remat options)"
    from jaxrl_fp16.models import attention as attn

    m = run.model
    kind = attn.resolve_attention(m.attention, backend=backend, seq_len=width, dtype=run.policy.compute_dtype,
                                  numerics=run.model.numerics(), head_dim=cfg.head_dim)
    note = f"attention {m.attention} -> {kind}"
    if kind == "cudnn" and backend_of_host() != "gpu":
        kind = "blockwise"
        note += " (blockwise stands in for cuDNN's fused kernel on XLA:CPU)"
    remat = attn.resolve_remat(m.remat, backend=backend)
    options = {"attention": kind, "remat": remat}
    if "attention_block" in fields:
        options["attention_block"] = m.attention_block
    if "unroll" in fields:
        options["unroll"] = m.unroll
    return options, f"{note}; remat {m.remat} -> {remat} (as for backend {backend})"


def backend_of_host() -> str:
    import jax

    return jax.default_backend()


def _abstract_params(model: Any) -> Any:
    import jax
    import jax.numpy as jnp

    def init():
        tokens = jnp.zeros((1, 1), jnp.int32)
        return model.init(jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), jnp.bool_),
                          return_logits=False)["params"]

    return jax.eval_shape(init)


def _struct(x: Any, sharding: Any, dtype: Any = None) -> Any:
    import jax

    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding)


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard of each leaf)."""
    import jax

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled: Any) -> dict[str, int]:
    ma = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    out = {k.replace("_size_in_bytes", ""): int(getattr(ma, k)) for k in keys}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def measure(run: RunConfig, *, backend: str | None = None, devices: Sequence[Any] | None = None) -> Measured:
    """Compiles the run's update step and scorer for `devices` (default: the trainer's devices of this process)
    ahead of time and reads XLA's memory analysis; `backend`: whose "auto" attention/remat to resolve (default:
    the devices' platform). Nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxrl_fp16 import scoring, sharding
    from jaxrl_fp16.lora import LoRA
    from jaxrl_fp16.models.decoder import CausalLM
    from jaxrl_fp16.rl.trainable import Trainable, make_rl_step
    from jaxrl_fp16.sampling.options import trainer_devices
    from jaxrl_fp16.step import TrainState

    cfg = model_config(run)
    devices = list(trainer_devices(jax.devices(), run.sampler.devices) if devices is None else devices)
    platform = devices[0].platform
    backend = backend or platform
    shapes = plan_shapes(run, cfg, len(devices))
    mesh = sharding.make_mesh(**shapes.mesh, devices=devices)
    compute = run.policy.compute_dtype
    numerics = run.model.numerics()
    options, note = _model_options(run, cfg, shapes.width, backend)
    model = CausalLM(cfg, dtype=compute, numerics=numerics, **options)

    params = _abstract_params(model)
    optimizer = run.build_optimizer()
    lora = None if run.lora is None else LoRA(run.lora.spec(), cfg, {}, run.policy, run.seed,
                                              part="policy" if run.critic.enabled else None)
    trainable = Trainable(critic=run.critic.enabled, lora=lora)
    state = jax.eval_shape(lambda p: TrainState.create(trainable.init(p), optimizer, run.build_loss_scale()), params)
    state_sharding = sharding.state_shardings(state, mesh, optimizer)
    state = jax.tree_util.tree_map(_struct, state, state_sharding)
    frozen = None
    if lora is not None:  # the frozen base, in the compute dtype, sharded as parameters
        frozen = jax.tree_util.tree_map(lambda x, s: _struct(x, s, compute), params,
                                        sharding.param_shardings(params, mesh))
    batch_sharding = sharding.batch_sharding(mesh)
    R, T = shapes.step_rows, shapes.width
    f32 = jnp.float32
    batch = {"tokens": ((R, T), jnp.int32), "attention_mask": ((R, T), jnp.int32), "response_mask": ((R, T), f32),
             "old_logp": ((R, T), f32), "sampler_logp": ((R, T), f32),
             "advantages": ((R, T) if run.critic.enabled else (R,), f32)}
    if run.critic.enabled:
        batch.update(old_values=((R, T), f32), returns=((R, T), f32))
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding) for k, (s, d) in batch.items()}

    step = make_rl_step(trainable, run, model, optimizer, state_sharding=state_sharding,
                        batch_sharding=batch_sharding)
    # The step's own jit sets these shardings and donation; this outer jit exposes them to `lower`.
    jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding, None), out_shardings=(state_sharding, None),
                     donate_argnums=(0,))
    step_memory = _memory(jitted.lower(state, batch, frozen).compile())

    # The scorer: the policy's weights cast to the compute dtype (sharded as the masters), a batch replicated.
    policy = trainable.policy_params(state.params) if lora is None else frozen  # LoRA: the merged base's shapes
    weights = jax.tree_util.tree_map(lambda x: _struct(x, x.sharding, compute), policy)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = jax.ShapeDtypeStruct((shapes.score_rows, shapes.score_width), jnp.int32, sharding=replicated)
    scorer = scoring.Scorer(cfg, dtype=compute, numerics=numerics)
    score_model = CausalLM(cfg, dtype=compute, numerics=numerics, **options)
    lowered = scoring._score.lower(score_model, weights, rows, rows,
                                   jax.ShapeDtypeStruct((), f32, sharding=replicated), scorer.chunk_size)
    score_memory = _memory(lowered.compile())

    params_bytes = _bytes_per_device(state.params)
    state_bytes = _bytes_per_device(state) + (0 if frozen is None else _bytes_per_device(frozen))
    score_memory["resident"] = state_bytes
    score_memory["peak"] += state_bytes
    return Measured(params=params_bytes, optimizer=state_bytes - params_bytes, gradients=params_bytes,
                    step=step_memory, scorer=score_memory, shapes=shapes, backend=backend, compiled_on=platform,
                    model_note=note)


# ----- N simulated devices: a subprocess -----

def measure_in_subprocess(run: RunConfig, num_devices: int, backend: str, *, timeout: float = 3600.0) -> Measured:
    """`measure` in a fresh process on `num_devices` simulated CPU devices; `backend`: whose "auto"
    attention/remat to resolve. The config travels as its resolved YAML."""
    from jaxrl_fp16.config import to_yaml

    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_WORKER_FLAG))
    env["XLA_FLAGS"] = f"{flags} {_WORKER_FLAG}={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    request = json.dumps({"config": to_yaml(run), "backend": backend})
    proc = subprocess.run([sys.executable, "-m", "jaxrl_fp16.tools.plan"], input=request, capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the plan's compile on {num_devices} simulated CPU devices failed (exit "
                           f"{proc.returncode}): {tail}")
    return Measured.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _worker() -> int:
    """The subprocess: reads {"config": yaml, "backend": ...} on stdin, prints `Measured` as one JSON line."""
    import tempfile

    from jaxrl_fp16.config import load_config

    request = json.loads(sys.stdin.read())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.yaml")
        with open(path, "w") as f:
            f.write(request["config"])
        run = load_config(path)
    print(json.dumps(measure(run, backend=request["backend"]).to_dict()))
    return 0


# ----- model shapes without weights -----

# config.json fields of the checkpoints the GPU configs name (the shape only: no weights, no tokenizer).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643},
    "r1-distill-qwen-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
                             "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
                             "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 10000.0,
                             "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                             "bos_token_id": 151646, "eos_token_id": 151643},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
                   "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643},
}


def write_config_json(name: str, out_dir: str | os.PathLike) -> str:
    """Writes `MODEL_SHAPES[name]` as `out_dir/config.json` (a folder `plan` accepts as `model.path`)."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.json")
    with open(path, "w") as f:
        json.dump(MODEL_SHAPES[name], f, indent=2)
    return path


# ----- devices -----

def host_device_bytes(devices: Sequence[Any]) -> int:
    """Each device's memory: a GPU's whole memory (JAX's limit over its pool fraction), or the host's RAM."""
    from jaxrl_fp16.memory import device_bytes_limit

    limit = device_bytes_limit(devices)
    if limit is not None:
        return int(limit / float(os.environ.get(JAX_FRACTION_ENV, JAX_DEFAULT_FRACTION)))
    total = host_memory()["total_bytes"]
    if total is None:
        raise ValueError("cannot tell this host's memory: give --device-memory-gib")
    return int(total)


def plan_run(run: RunConfig, *, num_devices: int | None = None, device_gib: float | None = None,
             backend: str | None = None) -> MemoryPlan:
    """The plan of `run` on `num_devices` devices of `device_gib` GiB (defaults: this host's devices and their
    memory). In-process when the count is this host's; else on simulated CPU devices in a subprocess."""
    import jax

    host = jax.default_backend()
    present = jax.devices()
    backend = backend or ("gpu" if device_gib is not None and host == "cpu" else host)
    n = len(present) if num_devices is None else int(num_devices)
    if n < 1:
        raise ValueError(f"--num-devices={n} must be >= 1")
    engine = len(run.sampler.devices or ())
    if n <= engine:
        raise ValueError(f"sampler.devices={list(run.sampler.devices)} takes all {n} devices and leaves none for "
                         f"the trainer")
    plan_shapes(run, model_config(run), n - engine)  # a config that does not split fails here, naming its keys
    if n == len(present):
        from jaxrl_fp16.sampling.options import trainer_devices

        measured = measure(run, backend=backend, devices=trainer_devices(present, run.sampler.devices))
    else:
        measured = measure_in_subprocess(run, n, backend)
    device_bytes = int(device_gib * _GIB) if device_gib is not None else host_device_bytes(present)
    return make_plan(run, measured, device_bytes)


def plan_before_training(run: RunConfig) -> MemoryPlan:
    """The trainer's plan on this process's devices, before any other work; DoesNotFitError when it does not fit."""
    plan = plan_run(run)
    log.info("memory plan: %s of %s per device (%s)", format_bytes(plan.per_device["total"]),
             format_bytes(plan.device_bytes), ", ".join(f"{k} {format_bytes(plan.per_device[k])}" for k in ITEMS))
    check_plan(plan)
    return plan


def main(config: str, overrides: Sequence[str], *, num_devices: int | None = None,
         device_gib: float | None = None, json_path: str | None = None) -> int:
    """`jaxrl-fp16 plan`: prints the table; 0 when the run fits, DoesNotFitError (exit 3) when not."""
    from jaxrl_fp16.config import load_config

    if device_gib is not None and not device_gib > 0:
        raise ValueError(f"--device-memory-gib={device_gib} must be > 0")
    run = load_config(config, overrides)
    if json_path:
        from jaxrl_fp16.outputs import ensure_writable_file

        ensure_writable_file(json_path)
    os.environ.setdefault(PREALLOCATE_ENV, "false")  # planning takes no device memory
    plan = plan_run(run, num_devices=num_devices, device_gib=device_gib)
    print(format_plan(plan, num_devices or len(__import__("jax").devices())))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(plan.to_json(), f, indent=2)
    check_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
