"""Interleaved A/B of the training step with two versions of the decoder module, against PyTorch, in one process.

    python -m benchmarks.backward_ab OLD_DECODER.py [--old-layers OLD_LAYERS.py] [--size small] [--dtype float32]
        [--repeats 9]

OLD_DECODER.py is another copy of `jaxrl_fp16/models/decoder.py` (e.g. `git show HEAD~1:jaxrl_fp16/models/decoder.py
> /tmp/old.py`). The copy takes its building blocks, `jaxrl_fp16.models.layers`, from this tree, or from
OLD_LAYERS.py, another copy of `jaxrl_fp16/models/layers.py`, with `--old-layers` (to time a change to the building
blocks alone, pass this tree's decoder.py as OLD_DECODER.py). Each round times
the forward (loss), the gradient, the full step (`train_step.OurTrainStep`'s optimizer and loss scaling) of both
versions and the PyTorch step, round-robin; prints medians, the backward/forward ratio (gradient time minus forward,
over forward) and each step's ratio to PyTorch. Both versions' gradients are compared bit for bit before timing.
Only for profiling changes to the decoder; `make bench` does not run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import jaxrl_fp16  # noqa: F401  (first: sets the XLA flags before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import models
from benchmarks.peers import TorchTrainStep
from benchmarks.train_step import LR, MAX_GRAD_NORM, POLICIES, WEIGHT_DECAY, batch
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models import decoder
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.step import TrainState, make_train_step


def _load_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _load(path: str, layers_path: str | None = None):
    """The decoder in `path`; its `jaxrl_fp16.models.layers` import gets the file `layers_path` when given (the
    import statement reads sys.modules, so the other layers module stands in while the decoder file runs)."""
    if layers_path is None:
        return _load_file(path, "decoder_under_test")
    key = "jaxrl_fp16.models.layers"
    ours = sys.modules[key]
    sys.modules[key] = _load_file(layers_path, "layers_under_test")
    try:
        return _load_file(path, "decoder_under_test")
    finally:
        sys.modules[key] = ours


def _fns(module, cfg, params, dtype: str, tokens, mask):
    model = module.CausalLM(cfg, dtype=jnp.dtype(dtype))
    policy = get_policy(POLICIES[dtype])
    data = {"tokens": tokens, "mask": mask}

    def loss_fn(p, b):
        logp = module.token_logprobs(model, p, b["tokens"], b["mask"])
        m = jnp.asarray(b["mask"], jnp.float32).at[:, 0].set(0.0)
        return -(logp * m).sum() / m.sum(), {}

    fwd = jax.jit(lambda p: loss_fn(policy.cast_to_compute(p), data)[0])
    grad = jax.jit(jax.grad(lambda p: loss_fn(policy.cast_to_compute(p), data)[0]))
    optimizer = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    scale = DynamicLossScale(loss_scale=2.0 ** 15) if dtype == "float16" else NoOpLossScale()
    step_fn = make_train_step(loss_fn, optimizer, policy, max_grad_norm=MAX_GRAD_NORM)
    state = TrainState.create(params, optimizer, scale)
    return grad, {"fwd": lambda: jax.block_until_ready(fwd(params)),
                  "grad": lambda: jax.block_until_ready(grad(params)),
                  "step": lambda: jax.block_until_ready(step_fn(state, data))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backward_ab", description=__doc__.splitlines()[0])
    ap.add_argument("old", help="path of the other decoder.py")
    ap.add_argument("--old-layers", default=None, help="path of the other layers.py the old decoder builds on")
    ap.add_argument("--size", default="small", choices=sorted(models.SIZES))
    ap.add_argument("--dtype", default="float32", choices=sorted(POLICIES))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--root", default="bench/models")
    args = ap.parse_args(argv)
    model_dir = models.build(args.root, args.size)
    cfg, params = load_hf_params(model_dir)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokens, mask = batch(cfg.vocab_size, 8, 128)
    fns, grads = {}, {}
    for name, module in (("old", _load(args.old, args.old_layers)), ("new", decoder)):
        grads[name], named = _fns(module, cfg, params, args.dtype, tokens, mask)
        fns.update({f"{name}:{k}": f for k, f in named.items()})
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), grads["old"](params), grads["new"](params))
    differ = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(same) if not v]
    print(f"gradients old vs new: {'bitwise equal' if not differ else 'differ in ' + ', '.join(differ)}")
    peer = TorchTrainStep(model_dir, args.dtype, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    fns["torch:step"] = lambda: peer.step(tokens, mask)
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name in ("old", "new"):
        f, g, s = med[f"{name}:fwd"], med[f"{name}:grad"], med[f"{name}:step"]
        print(f"{args.size} {args.dtype} {name}: forward {f:.1f} ms, gradient {g:.1f} ms (backward/forward "
              f"{(g - f) / f:.2f}), step {s:.1f} ms; PyTorch step {med['torch:step']:.1f} ms: ratio "
              f"{med['torch:step'] / s:.3f}")


if __name__ == "__main__":
    main()
