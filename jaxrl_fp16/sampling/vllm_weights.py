"""Direct weight writes into an in-process vLLM engine: each HF tensor copied into its slice of the engine's own
parameter tensors, in place, without vLLM's reload machinery.

vLLM's `reload_weights` re-runs every layer's loading and processing for each push (it moves the layers to the meta
device, materialises them, runs their weight loaders and `process_weights_after_loading`, then copies the results
back). For layers whose processing leaves the loaded weight as it is (unquantized linears and embeddings whose
kernel reads `layer.weight` at call time) the same bytes land in the same tensors with one copy each. A
`DirectPlan`, built once per engine from the model's modules, says where (the rules: `vllm_layout`):

- fused modules (`packed_modules_mapping`: `qkv_proj` <- q, k, v; `gate_up_proj` <- gate, up) take each HF tensor
  in rows [offset, offset + size) of the fused weight, in that order; with tensor parallelism each rank's rows of
  the HF tensor (a KV head replicated over ranks is read from rank // replicas);
- row-parallel linears (o_proj, down_proj) take a column block per rank, their bias whole;
- vocabulary-parallel embeddings and LM heads take the rank's vocabulary rows; the padding rows beyond the
  vocabulary stay as the loader left them (zeros); a tied LM head shares the embedding's tensor;
- norms and everything else: the whole tensor.

An unquantized linear whose CPU GEMM keeps its own packed copy of the weight (vLLM's CPU backend: oneDNN, SGL or
zentorch; it then replaces `layer.weight` with an empty tensor) is rebuilt instead (`Rebuild`,
`DirectPlan.rebuilds`): its HF tensors are laid out as its loader would (the same slots) in transient tensors, and
once a module has all of them its `process_weights_after_loading` runs on them, as in vLLM's layerwise reload: the
engine's own parameter objects are kept and receive what processing left in them (an empty weight, the bias), and
the new GEMM replaces the old. An embedding or LM head whose CPU GEMM keeps a packed copy is written in place and
its GEMM rebuilt after the push (`DirectPlan.repack`, what vLLM's loader does after loading it).

What cannot be written in place or rebuilt goes through `reload_weights` (`DirectPlan.reload`, logged with the
reason once): a quantized or otherwise processed layer (a quant method other than vLLM's unquantized ones), a
parameter whose shape or dtype is not the HF tensor's, a parameter the HF tensors do not cover exactly once. A
module goes one way as a whole: vLLM's layerwise reload rebuilds every tensor of a module it loads, so a module it
reloads is not written directly.

`DirectPlan.verify` checks the plan against vLLM's own loaders: after a `reload_weights` push, every direct slice
must hold exactly (bit for bit) the HF tensor it would receive, and every rebuilt module's GEMM must give the same
bits as the reloaded one on a probe input (its bias the same bytes); the names of any that do not go to the reload
path (a rebuilt module that fails gets the reloaded GEMM back).

Only torch tensor methods are used here (no torch or vllm import at module level): the engine's tensors come from
its model, the HF tensors from `vllm_push.torch_weights`, parameters from `torch_bridge`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.sampling.vllm_layout import (Slot, fits, layer_layout, narrow, packed_shards, slot_for, slot_shape,
                                             slot_view)

__all__ = ["Rebuild", "DirectPlan", "plan_direct_writes"]

log = logging.getLogger(__name__)

# vLLM's quant methods that load a weight as it is (their CPU processing may only add a packed copy).
UNQUANTIZED_LINEAR = "UnquantizedLinearMethod"
UNQUANTIZED_EMBEDDING = "UnquantizedEmbeddingMethod"
# rows of the probe input (a rebuilt weight's first rows) on which `verify` compares a rebuilt GEMM with vLLM's
PROBE_ROWS = 4


def _keeps_packed_copy(module: Any) -> bool:
    """Whether the module's CPU GEMM holds its own (packed) copy of the weight: vLLM's CPU dispatch closes over it
    (oneDNN handler, SGL packed weight, zentorch weight); its plain torch-linear fallback reads `layer.weight`."""
    fn = getattr(module, "cpu_linear", None)
    return fn is not None and bool(getattr(fn, "__closure__", None) or getattr(fn, "__defaults__", None))


def _method_name(module: Any) -> str | None:
    method = getattr(module, "quant_method", None)
    return None if method is None else type(method).__name__


def _rebuilt(module: Any) -> bool:
    """Whether a module is rebuilt at each push: an unquantized linear whose CPU GEMM keeps a packed copy."""
    return _method_name(module) == UNQUANTIZED_LINEAR and _keeps_packed_copy(module)


def _loaded_shape(module: Any, pname: str) -> tuple[int, ...] | None:
    """The shape vLLM's loader gives parameter `pname` of a linear on this rank (weight (out, in), bias (out,)),
    from the module's partition sizes; None when the module does not say."""
    out, inp = getattr(module, "output_size_per_partition", None), getattr(module, "input_size_per_partition", None)
    if out is None or inp is None:
        return None
    return {"weight": (int(out), int(inp)), "bias": (int(out),)}.get(pname)


@dataclasses.dataclass(eq=False, kw_only=True)
class Rebuild:
    """A linear whose CPU GEMM keeps its own packed copy of the weight, rebuilt from its HF tensors at each push
    (see the module docstring).

    module: the engine's module.
    shapes: its loaded parameters' shapes on this rank (what its weight loaders fill).
    expected: how many HF tensors fill them.
    dtype: the dtype its loaders give them (the engine dtype); tensors of another dtype are cast as staged.
    contiguous: whether its processing needs contiguous tensors (vLLM-cpu's SGL GEMM packs only a contiguous
        weight; oneDNN's takes any strides). Set when a rebuild from strided tensors fails and the same tensors,
        made contiguous, rebuild; later pushes stage contiguous tensors directly.
    """

    module: Any
    shapes: Mapping[str, tuple[int, ...]]
    expected: int
    dtype: Any
    contiguous: bool = False
    staged: dict[str, Any] = dataclasses.field(default_factory=dict)
    received: int = 0

    def put(self, pname: str, slot: Slot, tensor: Any) -> bool:
        """Lays HF tensor `tensor` out in parameter `pname` as its loader would (its slot); True once the module
        has all its tensors. A tensor that is the whole parameter, in the engine dtype, is used as it is (no copy);
        parts, and tensors of another dtype, are copied (cast) into a tensor of the parameter's shape with their
        memory order (an (out, in) view of an (in, out) array fills the columns of an (in, out) array), or
        contiguous where the module's processing needs it (`contiguous`)."""
        src = narrow(tensor, slot)
        shape = tuple(self.shapes[pname])
        if slot.rows is None and tuple(src.shape) == shape and src.dtype == self.dtype and \
                (src.is_contiguous() or not self.contiguous):
            self.staged[pname] = src
        else:
            if pname not in self.staged:
                transposed = not self.contiguous and src.ndim == 2 and src.stride(0) == 1 and src.stride(1) != 1
                self.staged[pname] = tensor.new_empty(shape[::-1], dtype=self.dtype).t() if transposed else \
                    tensor.new_empty(shape, dtype=self.dtype)
            torch_bridge.copy_into(slot_view(self.staged[pname], slot), src)
        self.received += 1
        return self.received == self.expected

    def drop(self) -> None:
        """Forgets what was staged (after a rebuild, or a push that did not complete the module)."""
        self.staged.clear()
        self.received = 0

    def rebuild(self) -> None:
        """Runs the module's weight processing (`process_weights_after_loading`) on the staged tensors. The engine's
        parameter objects are kept and take what processing left in them (an emptied weight, the bias), as vLLM's
        layerwise reload does; the module's GEMM is the new one. Processing that fails on strided tensors runs
        again on contiguous copies of them, and the module is staged contiguous from then on (`contiguous`)."""
        try:
            try:
                self._process()
            except RuntimeError as e:
                if self.contiguous or all(t.is_contiguous() for t in self.staged.values()):
                    raise
                log.info("direct push: %s's processing needs contiguous weights (%s); staging them so",
                         type(self.module).__name__, e)
                self.contiguous = True
                self.staged = {name: t.contiguous() for name, t in self.staged.items()}
                self._process()
        finally:
            self.drop()

    def _process(self) -> None:
        module = self.module
        kernel = {name: param for name, param in module._parameters.items() if param is not None}
        try:
            for pname, tensor in self.staged.items():
                module._parameters[pname] = torch_bridge.as_parameter(tensor)
            module.quant_method.process_weights_after_loading(module)
            for name, param in kernel.items():
                processed = module._parameters[name]
                if processed is param:
                    continue
                if processed.shape != param.shape or processed.dtype != param.dtype:
                    raise RuntimeError(f"{type(module).__name__}: processing left {name} as "
                                       f"{tuple(processed.shape)} {processed.dtype}, the engine holds "
                                       f"{tuple(param.shape)} {param.dtype}")
                torch_bridge.copy_into(param.data, processed.data)
        finally:
            module._parameters.update(kernel)

    def rebuild_matches(self) -> bool:
        """`rebuild`, checked: the new GEMM must give the bits of the current one (loaded by vLLM from the same
        tensors) on a probe input, and the bias must keep its bytes; otherwise the current GEMM and bias are put
        back and False is returned."""
        module = self.module
        weight = self.staged["weight"]
        probe = weight[:PROBE_ROWS].contiguous()  # rows of in_features values, in the engine dtype
        bias = module._parameters.get("bias")
        old_gemm, old_bias = module.__dict__.get("cpu_linear"), None if bias is None else bias.detach().clone()
        want = module.quant_method.apply(module, probe, bias)
        try:
            self.rebuild()
        except RuntimeError as e:
            log.warning("direct push: rebuilding %s failed: %s", type(module).__name__, e)
            same = False
        else:
            same = torch_bridge.bits_equal(module.quant_method.apply(module, probe, bias), want) and \
                (bias is None or torch_bridge.bits_equal(bias, old_bias))
        if not same:
            module.cpu_linear = old_gemm
            if bias is not None:
                torch_bridge.copy_into(bias.data, old_bias)
        return same


@dataclasses.dataclass(eq=False, kw_only=True)
class DirectPlan:
    """Where each HF tensor of a push goes in one engine (see the module docstring); built by `plan_direct_writes`.

    writes: HF name -> [(the engine tensor's view it fills, its slot)].
    rebuilds: HF name -> (the `Rebuild` of its module, its parameter name, its slot).
    reload: HF names left to `reload_weights`.
    repack: modules whose CPU GEMM is rebuilt after a direct write (embeddings/LM heads with a packed copy).
    reasons: why names went to `reload` (one line per engine parameter or module).
    verified: whether `verify` confirmed the plan against vLLM's loaders.
    """

    writes: dict[str, list[tuple[Any, Slot]]]
    rebuilds: dict[str, tuple[Rebuild, str, Slot]]
    reload: frozenset[str]
    repack: tuple[Any, ...]
    reasons: tuple[str, ...]
    verified: bool = False
    # (module, parameter name, tensor, data pointer) of every written tensor, checked by `current`
    owners: tuple[tuple[Any, str, Any, int], ...] = ()
    # HF name -> the modules its tensor lands in (for moving whole modules to the reload path)
    modules_of: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def direct(self) -> bool:
        """Whether any tensor is written directly (in place or by a rebuild)."""
        return bool(self.writes or self.rebuilds)

    @property
    def planned(self) -> int:
        """How many HF tensors go the direct way."""
        return len(self.writes) + len(self.rebuilds)

    def current(self) -> bool:
        """Whether the engine still holds the tensors the plan writes into (the same objects, the same memory)."""
        return all(getattr(module, "_parameters", {}).get(name) is tensor and tensor.data_ptr() == ptr
                   for module, name, tensor, ptr in self.owners)

    def write(self, name: str, tensor: Any) -> None:
        """Copies HF tensor `name` (HF layout, the engine dtype) into its engine slices, or stages it for its
        module's rebuild (which runs once the module has all its tensors)."""
        if name in self.writes:
            for view, slot in self.writes[name]:
                torch_bridge.copy_into(view, narrow(tensor, slot))
            return
        rebuild, pname, slot = self.rebuilds[name]
        if rebuild.put(pname, slot, tensor):
            rebuild.rebuild()

    def finish(self) -> None:
        """After the direct writes: checks that every rebuilt module got all its tensors, then rebuilds the packed
        CPU GEMMs of the written embeddings / LM heads."""
        pending = {id(r): r for r, _, _ in self.rebuilds.values() if r.received}
        for rebuild in pending.values():
            rebuild.drop()
        if pending:
            raise RuntimeError(f"the weight push ended before {len(pending)} rebuilt linears had all their tensors "
                               f"(their GEMMs keep the previous weights)")
        for module in self.repack:
            module.quant_method.process_weights_after_loading(module)

    def verify(self, tensors: Iterable[tuple[str, Any]]) -> list[str]:
        """After a `reload_weights` push of `tensors`: the names whose engine slices do not hold exactly those
        bytes, or whose rebuilt module's GEMM differs from the reloaded one (`Rebuild.rebuild_matches`); they and
        the rest of their modules move to the reload path. Marks the plan verified."""
        bad = []
        for name, tensor in tensors:
            if name in self.writes:
                if not all(torch_bridge.bits_equal(view, narrow(tensor, slot)) for view, slot in self.writes[name]):
                    bad.append(name)
            elif name in self.rebuilds:
                rebuild, pname, slot = self.rebuilds[name]
                if rebuild.put(pname, slot, tensor) and not rebuild.rebuild_matches():
                    bad.extend(n for n, (r, _, _) in self.rebuilds.items() if r is rebuild)
        for rebuild, _, _ in self.rebuilds.values():  # a module the tensors did not complete
            rebuild.drop()
        if bad:
            moved = _close_over_modules(set(bad), self.modules_of)
            self.writes = {n: w for n, w in self.writes.items() if n not in moved}
            self.rebuilds = {n: r for n, r in self.rebuilds.items() if n not in moved}
            self.reload = self.reload | moved
            self.reasons = (*self.reasons, f"the engine's loaders put other bytes than the direct path for {bad}")
        self.verified = True
        return bad


def _close_over_modules(names: set[str], modules_of: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """`names` plus every name that lands in a module one of them lands in (to a fixpoint: tied tensors link
    modules)."""
    names = set(names)
    while True:
        modules = {m for n in names for m in modules_of.get(n, ())}
        more = {n for n, ms in modules_of.items() if n not in names and modules.intersection(ms)}
        if not more:
            return frozenset(names)
        names |= more


def plan_direct_writes(model: Any, hf_shapes: Mapping[str, tuple[int, ...]], dtype: str) -> DirectPlan:
    """The `DirectPlan` of a vLLM model (the engine's `nn.Module`) for HF tensors of `hf_shapes` in `dtype`
    ("float16", ...), checked: every written parameter (of a rebuilt linear: every loaded parameter, as its loader
    shapes it) is covered exactly once by HF tensors of its shape and dtype (vocabulary padding rows excepted),
    else its names go to the reload path with the reason."""
    packed = packed_shards(getattr(model, "packed_modules_mapping", None) or {})
    modules = dict(model.named_modules())
    holders: dict[int, list[tuple[str, str]]] = {}  # id(tensor) -> [(module path, parameter name)]
    for path, module in modules.items():
        for pname, tensor in module._parameters.items():
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((path, pname))
    reasons: list[str] = []
    reload: set[str] = set()
    # HF name -> (module, engine tensor, slot, module path, the parameter's loaded shape)
    planned: dict[str, tuple[Any, Any, Slot, str, tuple[int, ...]]] = {}
    modules_of: dict[str, tuple[str, ...]] = {}  # HF name -> the modules holding its engine tensor
    for name, hf_shape in hf_shapes.items():
        path, _, pname = name.rpartition(".")
        head, _, last = path.rpartition(".")
        shard = None
        if last in packed:
            fused, shard = packed[last]
            path = f"{head}.{fused}" if head else fused
        module = modules.get(path)
        tensor = None if module is None else module._parameters.get(pname)
        modules_of[name] = tuple(p for p, _ in holders.get(id(tensor), ())) if tensor is not None else \
            ((path,) if module is not None else ())
        if tensor is None:
            reload.add(name)
            reasons.append(f"{name}: no engine parameter {path}.{pname}")
            continue
        try:
            slot = slot_for(layer_layout(module), pname, shard)
            src_shape = slot_shape(hf_shape, slot)
        except (ValueError, AttributeError) as e:
            reload.add(name)
            reasons.append(f"{name}: {e}")
            continue
        if _rebuilt(module):  # its weight was emptied: the loader's shape and dtype
            shape, held = _loaded_shape(module, pname), str(getattr(module, "params_dtype", None))
        else:
            shape, held = tuple(tensor.shape), str(tensor.dtype)
        if shape is None or held != f"torch.{dtype}" or not fits(slot, src_shape, shape):
            reload.add(name)
            reasons.append(f"{name}: engine parameter {path}.{pname} is {shape} {held}, the HF tensor gives "
                           f"{src_shape} {dtype}")
            continue
        planned[name] = (module, tensor, slot, path, shape)

    # coverage, per engine tensor: whole, or row blocks tiling it (a vocabulary's padding rows excepted)
    by_tensor: dict[int, list[str]] = {}
    for name, (_, tensor, _, _, _) in planned.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    for names in by_tensor.values():
        module, _, _, path, shape = planned[names[0]]
        extent = shape[0] if shape else 0
        blocks = sorted((planned[n][2].rows or (0, extent), n) for n in names)
        whole = any(planned[n][2].rows is None for n in names)
        end, ok = 0, not (whole and len(names) > 1)
        for (start, stop), _ in blocks:
            ok = ok and start == end
            end = stop
        padding = layer_layout(module).kind == "vocab"
        if not (ok and (end == extent or padding or whole)):
            reload.update(names)
            reasons.append(f"{path}: the HF tensors {sorted(names)} do not cover its {shape} parameter exactly once")

    # the modules holding each written tensor: plain, an embedding whose packed GEMM is rebuilt afterwards, or a
    # linear rebuilt from its tensors (which needs its weight)
    repack: dict[str, Any] = {}
    for name in list(planned):
        for path in modules_of[name]:
            module, method = modules[path], _method_name(modules[path])
            if method not in (None, UNQUANTIZED_LINEAR, UNQUANTIZED_EMBEDDING):
                reload.add(name)
                reasons.append(f"{path}: its weights are processed by {method}")
            elif _keeps_packed_copy(module) and method == UNQUANTIZED_EMBEDDING:
                repack[path] = module
    rebuilt: dict[str, list[str]] = {}  # module path -> the HF names of a rebuilt linear
    for name, (module, _, _, path, _) in planned.items():
        if _rebuilt(module):
            rebuilt.setdefault(path, []).append(name)
    for path, names in rebuilt.items():
        if not any(n.endswith(".weight") for n in names if n not in reload):
            reload.update(names)
            reasons.append(f"{path}: its packed GEMM is rebuilt from its weight, which no HF tensor fills directly")
    reload = set(_close_over_modules(reload, modules_of))
    direct = {n: p for n, p in planned.items() if n not in reload}
    writes = {name: [(slot_view(tensor, slot), slot)] for name, (module, tensor, slot, _, _) in direct.items()
              if not _rebuilt(module)}
    rebuilds: dict[str, tuple[Rebuild, str, Slot]] = {}
    for path, names in rebuilt.items():
        names = [n for n in names if n in direct]
        if names:
            rebuild = Rebuild(module=modules[path], shapes={n.rpartition(".")[2]: direct[n][4] for n in names},
                              dtype=modules[path].params_dtype,
                              expected=len(names))
            rebuilds.update((n, (rebuild, n.rpartition(".")[2], direct[n][2])) for n in names)
    written = {id(planned[n][1]) for n in writes}
    repack = {p: m for p, m in repack.items() if any(id(t) in written for t in m._parameters.values())}
    owners = tuple((modules[p], pname, planned[n][1], planned[n][1].data_ptr())
                   for n in direct for p, pname in holders[id(planned[n][1])])
    unwritten = sorted(f"{path}.{pname}" for path, module in modules.items()
                       for pname, tensor in module._parameters.items()
                       if tensor is not None and id(tensor) not in {id(planned[n][1]) for n in planned})
    if unwritten:
        reasons.append(f"engine parameters no HF tensor maps to (left as loaded): {unwritten}")
    return DirectPlan(writes=writes, rebuilds=rebuilds, reload=frozenset(reload), repack=tuple(repack.values()),
                      reasons=tuple(reasons), owners=owners, modules_of=modules_of)
