"""Sharding rules, the mesh and distributed config keys, the memory estimate, and sharded training on 8 simulated
CPU devices (a subprocess: the device count is fixed before JAX starts) against one device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_fp16 import sharding
from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.memory import DoesNotFitError, MemoryEstimate, check_fits, device_bytes_limit, estimate_memory
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf_table import expected_params_shapes, hf_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))


# ----- the mesh -----

def test_mesh_shape_resolves_the_rest_and_names_bad_sizes():
    assert sharding.resolve_mesh_shape(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.resolve_mesh_shape(8, -1, 4, 1) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.resolve_mesh_shape(8, 1, -1, 2) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="6 devices do not split"):
        sharding.resolve_mesh_shape(6, -1, 4)
    with pytest.raises(ValueError, match="= 4 devices, but there are 8"):
        sharding.resolve_mesh_shape(8, 2, 2, 1)
    with pytest.raises(ValueError, match="only one of data, fsdp may be -1"):
        sharding.resolve_mesh_shape(8, -1, -1)
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        sharding.resolve_mesh_shape(8, 8, 1, 0)


def test_one_device_mesh():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert sharding.axis_sizes(mesh) == {"data": 1, "fsdp": 1, "tensor": 1}


# ----- the rules (pure functions of path, shape and mesh sizes) -----

L = 3


@pytest.mark.parametrize("path,shape,sizes,expected", [
    # column parallel over the output features, fsdp over the largest other divisible axis
    (("layers", "attn", "q_proj", "kernel"), (L, 64, 128), {"fsdp": 4, "tensor": 2}, P(None, "fsdp", "tensor")),
    (("layers", "mlp", "gate_proj", "kernel"), (L, 64, 256), {"fsdp": 4, "tensor": 2}, P(None, "fsdp", "tensor")),
    (("layers", "attn", "q_proj", "bias"), (L, 128), {"fsdp": 4, "tensor": 2}, P(None, "tensor")),
    # row parallel over the input features; its bias stays whole on "tensor"
    (("layers", "attn", "o_proj", "kernel"), (L, 128, 64), {"fsdp": 4, "tensor": 2}, P(None, "tensor", "fsdp")),
    (("layers", "mlp", "down_proj", "bias"), (L, 64), {"fsdp": 1, "tensor": 2}, P(None, None)),
    # the stacked layer axis is never sharded, even when it is the only divisible one
    (("layers", "input_norm", "scale"), (8, 6), {"fsdp": 4}, P(None, None)),
    (("layers", "input_norm", "scale"), (L, 64), {"fsdp": 4}, P(None, "fsdp")),
    (("policy", "layers", "input_norm", "scale"), (8, 6), {"fsdp": 4}, P(None, None)),  # under a prefix too
    # fsdp alone: the largest divisible axis
    (("layers", "mlp", "up_proj", "kernel"), (L, 64, 256), {"fsdp": 8}, P(None, None, "fsdp")),
    (("layers", "mlp", "up_proj", "kernel"), (L, 64, 100), {"fsdp": 8}, P(None, "fsdp", None)),
    # embeddings and head: vocabulary on "tensor", else hidden
    (("embed", "embedding"), (96, 64), {"fsdp": 4, "tensor": 2}, P("tensor", "fsdp")),
    (("embed", "embedding"), (97, 64), {"fsdp": 4, "tensor": 2}, P(None, "tensor")),
    (("lm_head", "kernel"), (64, 96), {"fsdp": 4, "tensor": 2}, P("fsdp", "tensor")),
    (("final_norm", "scale"), (64,), {"fsdp": 4, "tensor": 2}, P("fsdp")),
    # nothing divides: replicated
    (("final_norm", "scale"), (63,), {"fsdp": 4, "tensor": 2}, P(None)),
    (("layers", "attn", "q_proj", "kernel"), (L, 64, 128), {"data": 8}, P(None, None, None)),
])
def test_param_spec_rules(path, shape, sizes, expected):
    assert sharding.param_spec(path, shape, sizes) == expected


def test_shard_shape_and_elements_per_device():
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.shard_shape((L, 64, 128), P(None, "fsdp", "tensor"), sizes) == (L, 16, 64)
    assert sharding.shard_shape((16, 8), P(("data", "fsdp")), sizes) == (4, 8)
    params = {"embed": {"embedding": np.zeros((96, 64))}, "final_norm": {"scale": np.zeros((63,))},
              "layers": {"attn": {"q_proj": {"kernel": np.zeros((L, 64, 128))}}}}
    # 96*64/8 + 63 (replicated) + 3*64*128/8
    assert sharding.elements_per_device(params, sizes) == 768 + 63 + 3072


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


# ----- config keys -----

def test_mesh_and_distributed_config_keys():
    run = load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"])
    assert run.mesh.shape(16) == {"data": 2, "fsdp": 4, "tensor": 2}
    assert load_config(None).mesh.shape(3) == {"data": 3, "fsdp": 1, "tensor": 1}  # default: all on data
    with pytest.raises(ConfigError, match="6 devices do not split"):
        run.mesh.shape(6)
    with pytest.raises(ConfigError, match="mesh.fsdp=0"):
        load_config(None, ["mesh.fsdp=0"])
    with pytest.raises(ConfigError, match="mesh.data and mesh.tensor are both -1"):
        load_config(None, ["mesh.tensor=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'mesh.model'"):
        load_config(None, ["mesh.model=2"])
    ok = load_config(None, ["distributed.enabled=true", "distributed.coordinator_address=10.0.0.1:1234",
                            "distributed.num_processes=2", "distributed.process_id=1"])
    assert ok.distributed.process_id == 1
    with pytest.raises(ConfigError, match="distributed.num_processes is set but distributed.enabled=false"):
        load_config(None, ["distributed.num_processes=2"])
    with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        load_config(None, ["distributed.enabled=true", "distributed.num_processes=2", "distributed.process_id=2"])
    with pytest.raises(ConfigError, match="must be host:port"):
        load_config(None, ["distributed.enabled=true", "distributed.coordinator_address=10.0.0.1"])


def test_tensor_parallel_size_is_a_vllm_key():
    assert load_config(None, ["sampler.name=vllm", "sampler.tensor_parallel_size=2"]).sampler.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="sampler.tensor_parallel_size=2 needs sampler.name=vllm"):
        load_config(None, ["sampler.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="sampler.tensor_parallel_size must be > 0"):
        load_config(None, ["sampler.name=vllm", "sampler.tensor_parallel_size=0"])


def test_distributed_start_after_jax_ran_is_refused():
    jax.devices()  # the backends are running in this process
    with pytest.raises(RuntimeError, match="must run before any JAX computation"):
        sharding.initialize_distributed("127.0.0.1:1234", 2, 0)


# ----- the memory estimate -----

CFG = ModelConfig(arch="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def test_memory_estimate_closed_form():
    n = CFG.num_params()
    one = estimate_memory(CFG, {}, compute_bytes=2, microbatch_rows=8, seq_len=32)
    assert (one.params, one.optimizer, one.gradients, one.compute_params) == (4 * n, 8 * n, 4 * n, 2 * n)
    H, I, Q, K = 64, 128, 64, 32
    per_layer = 8 * 32 * 2 * (6 * H + 2 * Q + 2 * K + 3 * I) + 8 * 4 * 32 ** 2 * 8
    assert one.activations == 2 * per_layer + 8 * 32 * 1000 * 12
    assert one.total == 18 * n + one.activations
    # FSDP over 4 divides the state and (through the rows) the activations; FP32 compute keeps no copy.
    four = estimate_memory(CFG, {"data": 1, "fsdp": 4}, compute_bytes=4, microbatch_rows=8, seq_len=32,
                           params_per_device=n // 4)
    assert four.params == 4 * (n // 4) and four.compute_params == 0
    assert four.activations == (2 * (2 * 32 * 4 * (6 * H + 2 * Q + 2 * K + 3 * I) + 2 * 4 * 32 ** 2 * 8)
                                + 2 * 32 * 1000 * 12)
    with pytest.raises(ValueError, match="microbatch_rows=0"):
        estimate_memory(CFG, {}, compute_bytes=2, microbatch_rows=0, seq_len=32)


def test_a_frozen_base_counts_in_the_compute_dtype():
    plain = estimate_memory(CFG, {}, compute_bytes=2, microbatch_rows=8, seq_len=32)
    lora = estimate_memory(CFG, {}, compute_bytes=2, microbatch_rows=8, seq_len=32, frozen_per_device=1000)
    assert plain.frozen == 0 and lora.frozen == 2 * 1000
    assert lora.total - plain.total == 2000 and "frozen" in lora.describe()


def test_check_fits_names_the_numbers():
    est = MemoryEstimate(params=4 << 30, optimizer=8 << 30, gradients=4 << 30, compute_params=2 << 30,
                         activations=1 << 30)
    check_fits(est, None)  # no known limit (CPU): nothing to check
    check_fits(est, 19 << 30)
    with pytest.raises(DoesNotFitError, match=r"19\.00 GiB per device \(params 4\.00 GiB, optimizer 8\.00 GiB.*"
                                              r"more than the 16\.00 GiB a device has.*mesh\.fsdp"):
        check_fits(est, 16 << 30)


def test_cpu_devices_report_no_limit():
    assert device_bytes_limit(jax.devices("cpu")) is None


def test_host_streaming_on_one_device_equals_the_numpy_export():
    """`stream_hf_weights` of device arrays: the numpy export's tensors, bit for bit (the untied head's transpose
    goes through `HostGathered.T`)."""
    cfg = ModelConfig(arch="llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), expected_params_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    on_device = jax.tree.map(jax.numpy.asarray, params)
    assert sharding.host_streamed(on_device)["lm_head"]["kernel"].T.shape == (48, 32)
    for dtype in ("float32", "bfloat16"):
        want = list(hf_state_dict(params, cfg, dtype))
        got = list(sharding.stream_hf_weights(on_device, cfg, dtype))
        assert [n for n, _ in got] == [n for n, _ in want] and len(want) == 3 + 2 * 9
        for (name, a), (_, b) in zip(want, got):
            assert b.dtype == a.dtype and b.flags.c_contiguous, name
            np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8), err_msg=name)


# ----- 8 simulated devices -----

@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_check.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "result.json") as f:
        return json.load(f)


@pytest.mark.slow  # the 8-device subprocess
def test_eight_devices_with_our_xla_flag(eight_devices):
    assert eight_devices["device_count"] == 8
    flags = eight_devices["xla_flags"].split()
    assert "--xla_force_host_platform_device_count=8" in flags and "--xla_allow_excess_precision=false" in flags


@pytest.mark.slow  # the 8-device subprocess
@pytest.mark.parametrize("policy", ["fp32", "fp16-mixed"])
def test_sharded_training_matches_one_device(eight_devices, policy):
    runs = eight_devices[policy]
    single = runs.pop("single")
    assert runs, "no sharded run"
    for name, r in runs.items():
        # Same steps taken and skipped: the FP16 run's first step overflows on every mesh and is skipped.
        assert r["skipped"] == single["skipped"], name
        assert r["loss_scale"] == r["ref_loss_scale"], name
        # FP16: after a step, the params differ at FP16's rounding level (below), so the losses do too: within
        # one FP16 ulp (2^-10; measured 6.5e-5 on 2x2x2 on an Intel Xeon, below 5e-5 on an AMD EPYC).
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=2e-6 if policy == "fp32" else 2.0 ** -10,
                                   err_msg=name)
        # FP32: rounding-level differences (measured 2.4e-7 abs, 2e-6 of what the steps moved the params).
        # FP16: the shards sum FP16 partial products in another order, so the params differ by a fraction of a
        # percent of what the steps moved them (measured 0.26% on 2x4, 0.49% on 2x2x2); a step that lost rows
        # or shards (e.g. gradients not summed over "data") would move them elsewhere.
        if policy == "fp32":
            assert r["param_max_diff"] < 2e-6 and r["param_rel_diff"] < 2e-5, (name, r)
            assert r["opt_max_diff"] < 1e-6, (name, r["opt_max_diff"])
        else:
            assert r["param_rel_diff"] < 0.02, (name, r["param_rel_diff"])
        assert r["loss_scale_replicated"], name
    if policy == "fp16-mixed":
        assert single["skipped"][0] == 1 and sum(single["skipped"]) < len(single["skipped"])


@pytest.mark.slow  # the 8-device subprocess
def test_params_and_adam_state_are_really_sharded(eight_devices):
    runs = eight_devices["fp32"]
    q = "['layers']['attn']['q_proj']['kernel']"  # [L=2, 64, 64]
    assert runs["8x1"]["params"][q] == [[2, 64, 64], [2, 64, 64]]  # pure data parallel: replicated
    assert runs["1x8"]["params"][q] == [[2, 64, 64], [2, 8, 64]]  # fsdp over the input dim, never the layer axis
    assert runs["2x4"]["params"][q] == [[2, 64, 64], [2, 16, 64]]
    assert runs["1x2x4"]["params"][q] == [[2, 64, 64], [2, 32, 16]]  # fsdp=2 on input, tensor=4 on output
    assert runs["1x2x4"]["params"]["['layers']['attn']['o_proj']['kernel']"] == [[2, 64, 64], [2, 16, 32]]
    for name in ("1x8", "2x4", "1x2x4"):
        assert runs[name]["mu"] == runs[name]["params"], name  # Adam's moments sharded as their params


@pytest.mark.slow  # the 8-device subprocess
def test_checkpoint_restores_onto_another_mesh_and_continues_identically(eight_devices):
    restores = eight_devices["restore"]
    assert restores
    for name, r in restores.items():
        assert r["same_shardings"], name  # restored arrays live on the target mesh
        assert r["restored_max_diff"] == 0.0, name  # bitwise the saved state
        assert r["meta"] == {"iteration": 2} and r["step"] == 3
        np.testing.assert_allclose(r["loss_b"], r["loss_a"], rtol=5e-5, err_msg=name)
        assert r["param_rel_diff"] < 0.02, (name, r["param_rel_diff"])  # FP16 (see above; measured 0.31%)


@pytest.mark.slow  # the 8-device subprocess
def test_streaming_push_equals_unsharded_export(eight_devices):
    stream = eight_devices["stream"]
    assert stream["q_kernel_shard_shape"] == [2, 32, 16]  # the streamed tree was sharded
    for dtype in ("float32", "float16", "bfloat16"):
        assert stream[dtype]["count"] == 27
        assert stream[dtype]["names_equal"] and stream[dtype]["bit_equal"], dtype
    assert stream["torch_weights_equal"]
