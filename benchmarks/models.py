"""The benchmark models, built locally with transformers (random weights, no hub) and cached under the output
folder: the tiny test model (overhead-bound) and a ~50M-parameter one (compute-bound), both Qwen2."""

from __future__ import annotations

import json
import os

from jaxrl_fp16.models.tiny import make_tiny

__all__ = ["SIZES", "build", "param_count"]

# The tiny model is the test suite's default shape. The logits are sharpened (x8) so greedy decoding has clear
# winners and the engines' tokens can be compared before timing.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2),
    "50M": dict(hidden_size=640, intermediate_size=2048, num_layers=10, num_heads=10, num_kv_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2),
}


def build(root: str, size: str) -> str:
    """The model folder of `size` under `root`, built once (atomically) and reused."""
    path = os.path.join(root, f"qwen2-{size}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny(path, "qwen2", sharp=8.0, seed=0, max_position_embeddings=512, **SIZES[size])
    return path


def param_count(model_dir: str) -> int:
    """Parameters of a Qwen2 config (tied embeddings counted once)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = h * q + q + 2 * (h * kv + kv) + q * h
    per_layer = attn + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if c.get("tie_word_embeddings", True) else 2) + h
