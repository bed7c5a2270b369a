"""FP16 readiness of a checkpoint: per layer and per op, how close activations and weights come to FP16's limits.

FP16 keeps 10 mantissa bits but only 5 exponent bits: its largest finite value is 65504 and its smallest normal
6.1e-5, where BF16 has FP32's range. A checkpoint trained in BF16 can hold activations that FP16 cannot
represent. `fp16_readiness` runs the forward twice in one jitted program, in the compute dtype and in FP32, on
the same tokens, and reduces every recorded op output to a few statistics:

    for each op site x (compute-dtype run) and its FP32-run counterpart r, over real (unpadded) tokens:
        max |x| over finite x, max |r|                 headroom = dtype max / max |r|  (log2: bits to spare)
        #inf(x), #nan(x)                               overflow, or inf - inf downstream of one
        #(r != 0 and x == 0)                           values flushed to zero (underflow)
        #(0 < |x| < smallest normal)                   subnormals (precision already reduced)

and does the same for every weight tensor when cast to the compute dtype (overflow to inf, flush to zero,
subnormal).

Sites are recorded with `flax.linen.intercept_methods` around every module call (outputs, and the inputs of
`o_proj`, `down_proj` and `post_attn_norm`: the attention context, the MLP activation and the mid-layer
residual). Variables sown inside the decoder's `nn.scan` do not leave it (only `params` is scanned), so each
decoder layer's records leave the scan as that layer's per-layer output and come back stacked on a leading
layer axis. The attention scores q.k^T / sqrt(D) are not a module output; they are recomputed from the recorded
q and k with the decoder's own RoPE, in the dtype the decoder uses for them.

Both runs' recorded activations are alive at once inside the jitted program (the underflow count compares them
element by element): check a few sequences at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, DecoderLayer, causal_inputs
from jaxrl_fp16.models.hf_table import HF_TABLE, expected_params_shapes
from jaxrl_fp16.models.layers import apply_rope
from jaxrl_fp16.precision import dtype_name

__all__ = ["fp16_readiness", "Report", "ActivationRow", "WeightRow", "LAYER_OPS"]

Array = jax.Array

# (path of a module inside a decoder layer, "in" or "out", op name). The order of LAYER_OPS is forward order.
_LAYER_SITES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("input_norm",), "out", "input_norm"),
    (("attn", "q_proj"), "out", "attn.q_proj"),
    (("attn", "k_proj"), "out", "attn.k_proj"),
    (("attn", "v_proj"), "out", "attn.v_proj"),
    (("attn", "q_norm"), "out", "attn.q_norm"),
    (("attn", "k_norm"), "out", "attn.k_norm"),
    (("attn", "o_proj"), "in", "attn.context"),  # softmax(scores) . v, the attention output before o_proj
    (("attn", "o_proj"), "out", "attn.o_proj"),
    (("post_attn_norm",), "in", "resid_mid"),  # residual stream after the attention block
    (("post_attn_norm",), "out", "post_attn_norm"),
    (("mlp", "gate_proj"), "out", "mlp.gate_proj"),
    (("mlp", "up_proj"), "out", "mlp.up_proj"),
    (("mlp", "down_proj"), "in", "mlp.act"),  # silu(gate) * up
    (("mlp", "down_proj"), "out", "mlp.down_proj"),
)
LAYER_OPS: tuple[str, ...] = (
    "input_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.q_norm", "attn.k_norm", "attn.scores",
    "attn.context", "attn.o_proj", "resid_mid", "post_attn_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.act",
    "mlp.down_proj", "residual")
# Sites outside the layers: (module path, method) -> op name. The LM head is `lm_head` (untied) or the
# embedding's `attend` (tied).
_TOP_SITES = {(("embed",), "__call__"): "embed", (("final_norm",), "__call__"): "final_norm",
              (("lm_head",), "__call__"): "logits", (("embed",), "attend"): "logits"}
_HF_ROWS = {row.path: (k, row) for k, row in enumerate(HF_TABLE)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationRow:
    """Statistics of one op's output in one layer (`layer` None: outside the layers), over real tokens."""

    layer: int | None
    op: str
    dtype: str  # the dtype the op's output had in the checked run ("f32" where `Numerics` forces FP32)
    count: int  # values checked: real tokens x values per token (attention scores: all T keys, masked ones as 0)
    max_abs: float  # max |x| over the finite values of the checked run
    ref_max_abs: float  # max |x| in the FP32 run: the value the checked dtype would have to hold
    n_inf: int
    n_nan: int
    n_underflow: int  # nonzero in the FP32 run, exactly zero in the checked run
    n_subnormal: int  # nonzero and below the checked dtype's smallest normal

    @property
    def dtype_max(self) -> float:
        return float(jnp.finfo(_DTYPES[self.dtype]).max)

    @property
    def headroom(self) -> float:
        """dtype max / (FP32-run max |x|); below 1 the true values do not fit."""
        return self.dtype_max / self.ref_max_abs if self.ref_max_abs > 0 else math.inf

    @property
    def headroom_bits(self) -> float:
        return math.log2(self.headroom) if self.headroom > 0 else -math.inf

    @property
    def overflow(self) -> bool:
        return self.n_inf > 0 or self.n_nan > 0

    @property
    def where(self) -> str:
        return self.op if self.layer is None else f"layer {self.layer} {self.op}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightRow:
    """One weight tensor (one layer's slice of a stacked one) cast to the checked dtype."""

    name: str  # the Hugging Face tensor name where known, else the Flax path
    layer: int | None
    count: int
    max_abs: float
    n_overflow: int  # finite in FP32, inf after the cast
    n_flushed: int  # nonzero in FP32, zero after the cast
    n_subnormal: int  # nonzero after the cast and below the smallest normal


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
    """What `fp16_readiness` found: activation rows in forward order, weight rows in parameter order."""

    dtype: str
    activations: tuple[ActivationRow, ...]
    weights: tuple[WeightRow, ...]

    @property
    def first_overflow(self) -> ActivationRow | None:
        """The first op, in forward order, whose output holds an inf or a NaN."""
        return next((r for r in self.activations if r.overflow), None)

    @property
    def overflowing_weights(self) -> tuple[WeightRow, ...]:
        return tuple(w for w in self.weights if w.n_overflow)

    @property
    def ok(self) -> bool:
        """No inf or NaN in any activation and no weight that overflows when cast."""
        return self.first_overflow is None and not self.overflowing_weights

    @property
    def tightest(self) -> ActivationRow:
        """The op with the least headroom."""
        return min(self.activations, key=lambda r: r.headroom)

    @property
    def summary(self) -> str:
        parts = []
        first = self.first_overflow
        if first is not None:
            bad = [r for r in self.activations if r.overflow]
            parts.append(f"{self.dtype} overflow: first at {first.where} (FP32 max |x| {first.ref_max_abs:.4g} = "
                         f"{first.ref_max_abs / first.dtype_max:.3g}x the {first.dtype} max); "
                         f"{sum(r.n_inf for r in bad)} inf, {sum(r.n_nan for r in bad)} nan in {len(bad)} op outputs")
        weights = self.overflowing_weights
        if weights:
            worst = max(weights, key=lambda w: w.max_abs)
            parts.append(f"{sum(w.n_overflow for w in weights)} weights overflow in {len(weights)} tensors "
                         f"(worst {worst.name}, max |w| {worst.max_abs:.4g})")
        if parts:
            return "NOT OK: " + "; ".join(parts)
        t = self.tightest
        under = sum(r.n_underflow for r in self.activations)
        return (f"ok for {self.dtype}: least headroom at {t.where} (max |x| {t.ref_max_abs:.4g}, "
                f"{t.headroom_bits:.1f} bits); {under} activation values flushed to zero")

    def to_markdown(self) -> str:
        lines = [f"**{self.summary}**", "",
                 "| layer | op | dtype | max abs | FP32 max abs | headroom (bits) | inf | nan | underflow | "
                 "subnormal | count |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.activations:
            lines.append(f"| {'' if r.layer is None else r.layer} | {r.op} | {r.dtype} | {r.max_abs:.4g} | "
                         f"{r.ref_max_abs:.4g} | {r.headroom_bits:.1f} | {r.n_inf} | {r.n_nan} | {r.n_underflow} | "
                         f"{r.n_subnormal} | {r.count} |")
        lines += ["", f"| weight | max abs | overflow in {self.dtype} | flushed to 0 | subnormal | count |",
                  "|---|---|---|---|---|---|"]
        for w in self.weights:
            lines.append(f"| {w.name} | {w.max_abs:.4g} | {w.n_overflow} | {w.n_flushed} | {w.n_subnormal} | "
                         f"{w.count} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """JSON with the verdict, the summary and every row (non-finite numbers written as strings)."""
        def row(r):
            d = dataclasses.asdict(r)
            if isinstance(r, ActivationRow):
                d.update(headroom=r.headroom, headroom_bits=r.headroom_bits, overflow=r.overflow)
            return {k: _json_number(v) for k, v in d.items()}

        return json.dumps({"dtype": self.dtype, "ok": self.ok, "summary": self.summary,
                           "activations": [row(r) for r in self.activations],
                           "weights": [row(w) for w in self.weights]}, indent=1)


_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(jnp.bfloat16)}


def _json_number(v):
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


# ----- recording -----

class _Recorder:
    """A `nn.intercept_methods` interceptor that records the op sites of one forward.

    Sites outside the layers go to `top`; a decoder layer's sites are returned as its per-layer scan output.
    """

    def __init__(self, cfg: ModelConfig, dtype: Any, numerics: Numerics):
        self.cfg, self.dtype, self.numerics = cfg, dtype, numerics
        self.top: dict[str, Array] = {}
        self._layers: list[tuple[tuple[str, ...], dict[str, Array]]] = []

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if type(module) is DecoderLayer and method == "__call__":  # the scan body (not the lifted subclass)
            # The scan body calls the layer positionally: (h, cos_sin, mask_BxTxS, index, layer_kv).
            self._layers.append((module.path, {}))
            h, (new_kv, _) = next_fun(*args, **kwargs)
            _, sites = self._layers.pop()
            sites["attn.scores"] = self._scores(sites, cos_sin=args[1], mask_BxTxS=args[2])
            sites["residual"] = h
            return h, (new_kv, sites)
        out = next_fun(*args, **kwargs)
        if self._layers:
            base, sites = self._layers[-1]
            rel = module.path[len(base):]
            if method == "__call__":
                for path, kind, name in _LAYER_SITES:
                    if path == rel:
                        sites[name] = args[0] if kind == "in" else out
        elif (module.path, method) in _TOP_SITES:
            self.top[_TOP_SITES[(module.path, method)]] = out
        return out

    def _scores(self, sites, cos_sin, mask_BxTxS):
        """q.k^T / sqrt(D) as the decoder forms them, [B, T, S, Nq]; zero where the key is masked."""
        cfg, num = self.cfg, self.numerics
        q = sites.get("attn.q_norm", sites["attn.q_proj"])
        k = sites.get("attn.k_norm", sites["attn.k_proj"])
        B, T = q.shape[:2]
        q = apply_rope(q.reshape(B, T, cfg.num_heads, cfg.head_dim), *cos_sin, num.rope_f32)
        k = apply_rope(k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim), *cos_sin, num.rope_f32)
        score_dtype = jnp.float32 if num.attn_scores_f32 else self.dtype
        qg = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim).astype(score_dtype)
        s = jnp.einsum("btkgd,bskd->btskg", qg, k.astype(score_dtype)) * jnp.asarray(cfg.head_dim ** -0.5,
                                                                                     score_dtype)
        return jnp.where(mask_BxTxS[..., None, None], s, 0).reshape(B, T, T, cfg.num_heads)


def _forward_sites(params, tokens_BxT, positions_BxT, mask_BxTxT, cfg, dtype, numerics):
    """({op: [B, T, ...]} outside the layers, {op: [L, B, T, ...]} inside them) of one forward in `dtype`."""
    recorder = _Recorder(cfg, dtype, numerics)
    with nn.intercept_methods(recorder):
        logits, _, per_layer = CausalLM(cfg, dtype, numerics).apply(
            {"params": params}, tokens_BxT, positions_BxT, mask_BxTxT)
    top = dict(recorder.top)
    top.setdefault("logits", logits)  # an FP32 tied head is not a module call
    return top, per_layer


def _site_stats(x, ref, valid_BxT, layered: bool):
    """Per-(layer,) batch-row reductions of one site; the host sums rows in int64 (int32 could overflow)."""
    lead = 2 if layered else 1  # kept axes: ([L,] B)
    shape = (1,) * layered + valid_BxT.shape + (1,) * (x.ndim - layered - 2)
    valid = jnp.broadcast_to(valid_BxT.reshape(shape), x.shape)
    x = jnp.where(valid, x, jnp.zeros((), x.dtype))
    ref = jnp.where(valid, ref.astype(jnp.float32), 0.0)
    axes = tuple(range(lead + 1, x.ndim + 1))  # after stacking the statistics on a new leading axis
    a = jnp.abs(x.astype(jnp.float32))
    tiny = float(jnp.finfo(x.dtype).tiny)
    # One max and one sum per site (fewer reductions compile faster).
    max_abs, ref_max_abs = jnp.max(jnp.stack([jnp.where(jnp.isfinite(a), a, 0.0), jnp.abs(ref)]), axis=axes)
    counts = jnp.sum(jnp.stack([jnp.isinf(a), jnp.isnan(a), (ref != 0) & (x == 0), (a > 0) & (a < tiny)]),
                     axis=axes, dtype=jnp.int32)
    return dict(max_abs=max_abs, ref_max_abs=ref_max_abs, **dict(zip(_COUNTS, counts)))


_COUNTS = ("n_inf", "n_nan", "n_underflow", "n_subnormal")


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "numerics"))
def _activation_stats(params, tokens_BxT, valid_BxT, *, cfg, dtype, numerics):
    """Both forwards and every site's reductions, in one program: ({op: stats} outside, {op: stats} inside layers)."""
    positions_BxT, mask_BxTxT = causal_inputs(tokens_BxT, None, valid_BxT)
    top, layers = _forward_sites(params, tokens_BxT, positions_BxT, mask_BxTxT, cfg, dtype, numerics)
    ref_top, ref_layers = _forward_sites(params, tokens_BxT, positions_BxT, mask_BxTxT, cfg, jnp.float32,
                                         numerics)
    top_stats = {op: _site_stats(x, ref_top[op], valid_BxT, False) for op, x in top.items()}
    layer_stats = {op: _site_stats(x, ref_layers[op], valid_BxT, True) for op, x in layers.items()}
    return top_stats, layer_stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _weight_stats(params, *, dtype):
    """Per leaf (per layer for stacked leaves): max |w| and counts of what the cast to `dtype` does."""
    tiny = float(jnp.finfo(dtype).tiny)

    def stats(path, w):
        axes = tuple(range(1 if path[0].key == "layers" else 0, w.ndim))
        w = w.astype(jnp.float32)
        c = w.astype(dtype)
        a = jnp.abs(c.astype(jnp.float32))
        counts = jnp.sum(jnp.stack([jnp.isinf(c) & jnp.isfinite(w), (w != 0) & (c == 0), (a > 0) & (a < tiny)]),
                         axis=tuple(k + 1 for k in axes), dtype=jnp.int32)
        return dict(max_abs=jnp.max(jnp.abs(w), axis=axes), **dict(zip(_WEIGHT_COUNTS, counts)))

    return jax.tree_util.tree_map_with_path(stats, params)


_WEIGHT_COUNTS = ("n_overflow", "n_flushed", "n_subnormal")


# ----- the report -----

def fp16_readiness(cfg: ModelConfig, params: Any, tokens_BxT: Any, attention_mask: Any = None, *,
                   dtype: Any = jnp.float16, numerics: Numerics = Numerics()) -> Report:
    """Checks activations and weights of a checkpoint against the range of `dtype`.

    Args:
      cfg: the architecture.
      params: the parameter tree (FP32 masters, as `load_hf_params` returns them; numpy or jax arrays).
      tokens_BxT: int token ids of a few representative sequences.
      attention_mask: [B, T], 1 for real tokens; padding is excluded from every statistic. None: all real.
      dtype: the compute dtype to check (float16; bfloat16 works too).
      numerics: which sensitive ops run in FP32 in the checked run, as in training.

    Returns:
      A `Report`: `ok`, `summary`, activation rows (per layer, per op, in forward order) and weight rows.
    """
    dtype = np.dtype(dtype)
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    valid_BxT = (jnp.ones(tokens_BxT.shape, jnp.bool_) if attention_mask is None
                 else jnp.asarray(attention_mask).astype(jnp.bool_))
    params = jax.device_put(params)
    top, layers = jax.device_get(_activation_stats(params, tokens_BxT, valid_BxT, cfg=cfg, dtype=dtype,
                                                   numerics=numerics))
    shapes = _site_specs(cfg, dtype, numerics, tokens_BxT.shape)
    real_tokens = int(np.asarray(valid_BxT).sum())

    def row(layer, op, stats, index):
        s = {k: np.asarray(v)[index] for k, v in stats.items()}
        spec = shapes[op]
        per_token = int(np.prod(spec.shape[(3 if layer is not None else 2):]))
        return ActivationRow(
            layer=layer, op=op, dtype=dtype_name(spec.dtype), count=real_tokens * per_token,
            max_abs=float(s["max_abs"].max()), ref_max_abs=float(s["ref_max_abs"].max()),
            **{k: int(s[k].sum(dtype=np.int64)) for k in _COUNTS})

    rows = [row(None, "embed", top["embed"], ...)]
    for layer in range(cfg.num_layers):
        rows += [row(layer, op, layers[op], layer) for op in LAYER_OPS if op in layers]
    rows += [row(None, op, top[op], ...) for op in ("final_norm", "logits")]
    return Report(dtype=dtype_name(dtype), activations=tuple(rows), weights=_weight_rows(params, dtype))


@functools.lru_cache(maxsize=32)
def _site_specs(cfg, dtype, numerics, shape_BxT) -> dict[str, jax.ShapeDtypeStruct]:
    """{op: shape and dtype} of the checked run's sites (an abstract trace, once per configuration)."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), expected_params_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    tokens_BxT = jax.ShapeDtypeStruct(shape_BxT, jnp.int32)

    def sites(params, tokens_BxT):
        top, layers = _forward_sites(params, tokens_BxT, *causal_inputs(tokens_BxT, None, None), cfg, dtype,
                                     numerics)
        return {**top, **layers}

    return jax.eval_shape(sites, params, tokens_BxT)


def _weight_rows(params, dtype) -> tuple[WeightRow, ...]:
    """Rows in checkpoint order: the embedding, then layer by layer in `HF_TABLE` order, then the rest."""
    stats = jax.device_get(_weight_stats(params, dtype=dtype))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keyed = []
    for (path, w), s in zip(leaves, jax.tree_util.tree_structure(params).flatten_up_to(stats)):
        keys = tuple(k.key for k in path)
        stacked = keys[0] == "layers"
        index, hf_row = _HF_ROWS.get(keys, (len(HF_TABLE), None))
        size = int(np.prod(w.shape[1:] if stacked else w.shape))
        for layer in (range(w.shape[0]) if stacked else [None]):
            name = hf_row.hf.format(i=layer) if hf_row else "/".join(keys) + ("" if layer is None else f"[{layer}]")
            at = ... if layer is None else layer
            row = WeightRow(name=name, layer=layer, count=size, max_abs=float(s["max_abs"][at]),
                            **{k: int(s[k][at]) for k in _WEIGHT_COUNTS})
            group = 1 if stacked else (0 if index == 0 else 2)
            keyed.append(((group, layer or 0, index, name), row))
    return tuple(row for _, row in sorted(keyed, key=lambda kr: kr[0]))
