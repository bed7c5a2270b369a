"""Model config from Hugging Face config.json dicts: supported families, refused features named."""

import json

import numpy as np
import pytest
import transformers

from jaxrl_fp16.models.config import ModelConfig, Numerics, UnsupportedConfigError

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def test_qwen2_has_qkv_bias_and_no_o_bias():
    cfg = ModelConfig.from_hf_dict(transformers.Qwen2Config(**SMALL).to_dict())
    assert (cfg.arch, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.head_dim) == ("qwen2", True, False, False, 8)
    assert cfg.num_groups == 2


def test_qwen3_head_dim_and_qk_norm():
    cfg = ModelConfig.from_hf_dict(transformers.Qwen3Config(**SMALL, head_dim=24).to_dict())
    assert cfg.head_dim == 24 and cfg.qk_norm and not cfg.qkv_bias


def test_llama3_rope_scaling_both_formats():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    new = transformers.LlamaConfig(**SMALL, rope_scaling=rope, rope_theta=500000.0).to_dict()
    old = dict(SMALL, model_type="llama", rope_theta=500000.0, rope_scaling=dict(rope, type="llama3"))
    for d in (new, old):
        cfg = ModelConfig.from_hf_dict(d)
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == "llama3"
        assert cfg.rope_scaling.original_max_position_embeddings == 64


def test_llama3_inv_freq_matches_transformers():
    import torch  # noqa: F401  (transformers' rope init runs in torch)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    hf = transformers.LlamaConfig(**dict(SMALL, hidden_size=256, num_attention_heads=4), rope_scaling=rope,
                                  rope_theta=500000.0)
    inv_ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    np.testing.assert_allclose(cfg.inv_freq(), inv_ref.numpy(), rtol=1e-6)


def test_hf_dict_round_trip():
    for hf in (transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
               transformers.Qwen3Config(**SMALL, head_dim=16),
               transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)):
        cfg = ModelConfig.from_hf_dict(hf.to_dict())
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0), "use_sliding_window"),
    (dict(model_type="qwen2", num_experts=8), "num_experts"),
    (dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act"),
    (dict(model_type="llama", layer_types=["full_attention", "sliding_attention"]), "layer_types"),
])
def test_unsupported_features_are_named(change, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        ModelConfig.from_hf_dict(dict(SMALL, **change))


def test_window_that_never_bites_is_accepted():
    cfg = ModelConfig.from_hf_dict(dict(SMALL, model_type="mistral", sliding_window=4096))
    assert cfg.arch == "mistral"


def test_missing_field_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf_dir(tmp_path / "nowhere")


def test_bad_head_grouping():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.from_hf_dict(dict(SMALL, model_type="llama", num_key_value_heads=3))


def test_numerics_overrides():
    n = Numerics.from_overrides("lm_head,attn_scores")
    assert n.lm_head_f32 and n.attn_scores_f32 and n.softmax_f32 and not n.rope_f32
    with pytest.raises(ValueError, match="valid"):
        Numerics.from_overrides("lm_heads")


def test_eos_ids_include_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, model_type="qwen2", eos_token_id=5)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    assert ModelConfig.from_hf_dir(tmp_path).eos_token_ids == (5, 7)
