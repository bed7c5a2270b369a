"""Tiny random Hugging Face models with a character-level tokenizer, built locally (no model hub).

`make_tiny` writes a folder that transformers, vLLM and `load_hf_params` all load: config.json,
generation_config.json, model.safetensors and the tokenizer files. torch and transformers are imported inside
the functions only.
"""

from __future__ import annotations

import math
import os
import string
from typing import Any

from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.outputs import atomic_dir, check_output_dir

__all__ = ["make_tiny", "make_char_tokenizer", "CHARS", "EOS_TOKEN", "PAD_TOKEN"]

# Token ids: one per byte, the bytes of these characters first (so "0".."9" are ids 0..9), then the other bytes,
# then the special tokens.
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
_SPECIAL = (EOS_TOKEN, PAD_TOKEN)
_ARCHS = ("qwen2", "qwen3", "llama")


def _byte_symbols() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the others are shifted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def make_char_tokenizer(model_max_length: int = 4096):
    """A `PreTrainedTokenizerFast`: one token per character (per UTF-8 byte beyond ASCII), plus EOS and PAD.

    A byte-level BPE with no merges: ASCII text is tokenized one character per token, any other text one byte
    per token, so every string round-trips (258 tokens in all). Byte-level rather than a word-level vocabulary
    because transformers rebuilds a Qwen2 model's tokenizer as a byte-level BPE from the saved vocabulary and
    merges; this one reads the same either way. No BOS token, nothing is added around encoded text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    order = [*CHARS.encode(), *(b for b in range(256) if b not in CHARS.encode())]
    vocab = {symbols[b]: i for i, b in enumerate(order)}
    vocab.update({t: len(vocab) + k for k, t in enumerate(_SPECIAL)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=model_max_length)


def _check_shape(arch: str, *, hidden_size: int, num_heads: int, head_dim: int | None, **sizes: int) -> None:
    """Raises ValueError for a shape that `ModelConfig` refuses (non-positive sizes, heads not a multiple of the
    kv heads, odd head_dim), or a hidden size that num_heads does not divide when head_dim is derived from it."""
    if head_dim is None and isinstance(num_heads, int) and num_heads > 0 and hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}: give head_dim")
    derived = hidden_size // num_heads if isinstance(num_heads, int) and num_heads > 0 else num_heads
    ModelConfig(arch=arch, hidden_size=hidden_size, num_heads=num_heads,
                head_dim=derived if head_dim is None else head_dim, **sizes)


def make_tiny(out_dir: str | os.PathLike, arch: str = "qwen2", *, vocab_size: int = 320, hidden_size: int = 128,
              intermediate_size: int = 256, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
              head_dim: int | None = None, tie_word_embeddings: bool = True, max_position_embeddings: int = 512,
              sharp: float | None = None, seed: int = 0, rope_scaling: dict[str, Any] | None = None,
              attention_bias: bool | None = None, mlp_bias: bool | None = None,
              rope_theta: float = 10000.0, overwrite: bool = False) -> str:
    """Builds a random `arch` causal LM with transformers and saves it, with its tokenizer, to `out_dir`.

    Args:
      out_dir: the folder to write: new, empty, or written here before (it is then replaced atomically); it
        holds nothing but the model's and the tokenizer's files (and our marker). See `check_output_dir`.
      arch: "qwen2", "qwen3" or "llama".
      vocab_size: model vocabulary; at least the tokenizer's size (the extra embedding rows are never produced
        by the tokenizer).
      hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim: the shape
        (head_dim defaults to hidden_size // num_heads). vLLM's CPU attention needs head_dim to be a multiple
        of 32, hence the defaults (head_dim 32).
      tie_word_embeddings: share the input embedding with the LM head.
      max_position_embeddings: the context length.
      sharp: when set, `model.norm.weight` (the final RMSNorm scale, all ones at init) is multiplied by `sharp`.
        The LM head is linear in the final-normed hidden state, so this multiplies every logit by `sharp`
        (tied or not) and makes the output distributions peaked: a random init is otherwise close to uniform
        (logit std about 0.02 * sqrt(hidden_size)), and precision mismatch is only visible on peaked outputs.
      seed: seeds torch's generator for the initialisation.
      rope_scaling: e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64} or {"rope_type": "linear", "factor": 2.0}.
      attention_bias: biases on q/k/v/o (llama, qwen3); qwen2 always has q/k/v biases and accepts only True.
      mlp_bias: biases on the MLP projections (llama only).
      rope_theta: RoPE base.
      overwrite: also replace an existing Hugging Face model folder that was not written here.

    Returns:
      The absolute path of the written folder.

    Raises:
      ValueError before anything is built or written when the settings give a model that `ModelConfig` (and so
      every other command) refuses, or `sharp` is not a finite positive number; OutputRefusedError when
      `out_dir` may not be replaced.
    """
    import transformers

    from jaxrl_fp16 import torch_bridge

    if arch not in _ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; supported: {', '.join(_ARCHS)}")
    tokenizer = make_char_tokenizer(max_position_embeddings)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    if arch == "qwen2" and attention_bias is False:
        raise ValueError("qwen2 always has q/k/v biases: attention_bias=False is not possible")
    if mlp_bias and arch != "llama":
        raise ValueError(f"mlp_bias is only available for llama, not {arch}")
    if arch == "qwen2" and head_dim is not None and head_dim * num_heads != hidden_size:
        raise ValueError("qwen2 needs head_dim * num_heads == hidden_size (vLLM's Qwen2 derives head_dim so)")
    _check_shape(arch, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 max_position_embeddings=max_position_embeddings)
    if sharp is not None and not (math.isfinite(sharp) and sharp > 0):
        raise ValueError(f"sharp={sharp} must be a finite number > 0 (it multiplies every logit)")

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if attention_bias is not None and arch != "qwen2":
        kw["attention_bias"] = attention_bias
    if mlp_bias is not None and arch == "llama":
        kw["mlp_bias"] = mlp_bias
    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    config = config_cls(**kw)
    ModelConfig.from_hf_dict(config.to_dict())  # what every command reads back must pass, before any work
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    with torch_bridge.seeded(seed):
        model = model_cls(config).float().eval()
    if sharp is not None:
        torch_bridge.scale_parameter(model.model.norm.weight, sharp)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
