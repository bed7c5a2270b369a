"""Output folders: what may be replaced, what is refused (and survives), permissions, stale temporaries, and
output paths checked before any work."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.outputs import (OUTPUT_MARKER, OutputNotWritableError, OutputRefusedError, check_output_dir,
                                ensure_writable_dir, ensure_writable_file, read_output_marker)
from jaxrl_fp16.models.tiny import make_tiny

_SMALL = dict(vocab_size=272, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
              max_position_embeddings=64)
_RUN_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "tiny_fp16.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("outputs") / "tiny", **_SMALL)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_hf_params(tiny)


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`, to show it was left untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _fake_run(root):
    """A run directory as the trainers leave it (config, checkpoints, metrics), without training."""
    run = root / "run"
    (run / "checkpoints" / "20").mkdir(parents=True)
    (run / "checkpoints" / "20" / "state").write_bytes(b"\x00checkpoint")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


# ----- refused destinations: nothing is lost -----

def test_make_tiny_into_the_working_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "sentinel.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(["make-tiny", "."]) == 2
    err = _error(capsys)
    assert str(tmp_path) in err and "current working folder" in err
    assert os.listdir(tmp_path) == ["sentinel.txt"] and (tmp_path / "sentinel.txt").read_text() == "mine"
    assert main(["make-tiny", ".", "--overwrite"]) == 2  # not even with --overwrite
    assert os.listdir(tmp_path) == ["sentinel.txt"]


def test_make_tiny_into_an_ancestor_of_the_working_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["make-tiny", str(tmp_path)]) == 2
    assert "current working folder or holds it" in _error(capsys)
    assert os.listdir(tmp_path) == ["work"]


@pytest.mark.parametrize("target", ["run", "checkpoints", "inside_checkpoints", "ancestor"])
def test_export_never_writes_over_the_run(target, tmp_path, capsys):
    run = _fake_run(tmp_path)
    before = _snapshot(tmp_path)
    out = {"run": run, "checkpoints": run / "checkpoints", "inside_checkpoints": run / "checkpoints" / "hf",
           "ancestor": tmp_path}[target]
    assert main(["export", str(run), str(out), "--overwrite"]) == 2
    err = _error(capsys)
    assert str(out) in err
    assert {"run": "is a run directory", "checkpoints": "inside the checkpoints of the run",
            "inside_checkpoints": "inside the checkpoints of the run", "ancestor": "which this command reads"}[
        target] in err
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary left either


def test_a_run_with_only_metrics_is_a_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(OutputRefusedError, match=r"r is a run directory"):
        check_output_dir(run, overwrite=True)


def test_export_into_a_folder_with_a_foreign_file_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path)
    out = tmp_path / "somedir"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(run), str(out), *extra]) == 2
        err = _error(capsys)
        assert str(out) in err and "notes.txt" in err and "refusing to delete" in err
        assert _snapshot(out) == {"notes.txt": b"keep me", "config.json": b"{}"}


def test_save_refuses_a_foreign_file_in_an_earlier_export(loaded, tmp_path):
    cfg, params = loaded
    out = save_hf_params(params, cfg, tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("my notes")
    with pytest.raises(OutputRefusedError, match=r"out holds files .*\(README.md\)"):
        save_hf_params(params, cfg, out, overwrite=True)
    assert (tmp_path / "out" / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_source_model_is_not_a_destination(loaded, tiny, tmp_path):
    cfg, params = loaded
    copy = shutil.copytree(tiny, tmp_path / "model")
    before = _snapshot(copy)
    with pytest.raises(OutputRefusedError, match=r"model is .*model, which this command reads"):
        save_hf_params(params, cfg, copy, tokenizer_from=copy)
    assert _snapshot(copy) == before


def test_a_file_is_not_a_destination(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputRefusedError, match="f exists and is not a folder"):
        check_output_dir(tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


# ----- what may be replaced -----

def test_export_over_our_own_export_replaces_it(loaded, tmp_path):
    cfg, params = loaded
    out = tmp_path / "out"
    save_hf_params(params, cfg, out, max_shard_bytes=10_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    marker = read_output_marker(out)
    assert marker["writer"] == "jaxrl_fp16" and "model.safetensors.index.json" in marker["files"]
    doubled = {k: v for k, v in params.items()}
    doubled["final_norm"] = {"scale": 2 * params["final_norm"]["scale"]}
    save_hf_params(doubled, cfg, out)
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "config.json", "generation_config.json", "model.safetensors"]
    np.testing.assert_array_equal(load_hf_params(out)[1]["final_norm"]["scale"], doubled["final_norm"]["scale"])
    assert os.listdir(tmp_path) == ["out"]


def test_an_empty_folder_is_used(loaded, tmp_path):
    cfg, params = loaded
    (tmp_path / "out").mkdir()
    save_hf_params(params, cfg, tmp_path / "out")
    assert read_output_marker(tmp_path / "out") is not None


def test_overwrite_replaces_only_a_plain_model_folder(loaded, tiny, tmp_path):
    cfg, params = loaded
    plain = shutil.copytree(tiny, tmp_path / "plain")  # a Hugging Face folder someone else wrote
    os.remove(os.path.join(plain, OUTPUT_MARKER))
    before = _snapshot(plain)
    with pytest.raises(OutputRefusedError, match=r"plain exists and was not written by jaxrl_fp16 .*--overwrite"):
        save_hf_params(params, cfg, plain)
    assert _snapshot(plain) == before
    save_hf_params(params, cfg, plain, overwrite=True)
    assert read_output_marker(plain) is not None and "tokenizer.json" not in os.listdir(plain)
    # A subfolder is not something a model export writes: refused even with overwrite.
    other = shutil.copytree(tiny, tmp_path / "other")
    os.remove(os.path.join(other, OUTPUT_MARKER))
    os.mkdir(os.path.join(other, "data"))
    with pytest.raises(OutputRefusedError, match=r"\(data/\)"):
        save_hf_params(params, cfg, other, overwrite=True)
    assert os.path.isdir(os.path.join(other, "data"))


def test_make_tiny_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    args = ["make-tiny", str(out), "--hidden-size", "32", "--num-heads", "2", "--num-kv-heads", "1",
            "--num-layers", "1", "--intermediate-size", "48"]
    assert main(args) == 2
    assert "--overwrite" in _error(capsys)
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


# ----- permissions and temporaries -----

def test_new_folders_get_the_users_normal_permissions(loaded, tmp_path):
    cfg, params = loaded
    old = os.umask(0o022)
    try:
        out = save_hf_params(params, cfg, tmp_path / "out")
        tiny = make_tiny(tmp_path / "tiny", **_SMALL)
    finally:
        os.umask(old)
    for folder in (out, tiny):
        assert os.stat(folder).st_mode & 0o777 == 0o755
        for name in os.listdir(folder):
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_the_destination_are_removed(loaded, tmp_path):
    cfg, params = loaded
    dead = _dead_pid()
    stale = [f".out.tmp-{dead}-0badcafe", f".out.tmp-{dead}-0badcafe-old", ".out.tmp-ab1_cd2e"]  # killed writes
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-00000.partial").write_bytes(b"half")
    (tmp_path / stale[1] / "config.json").write_text("{}")
    kept = {
        f".out.tmp-{os.getpid()}-12345678": "config.json",  # a live writer's
        f".out.tmp-{dead}-87654321": "notes.txt",  # holds something no export writes
        f".other.tmp-{dead}-0badcafe": "config.json",  # another destination's
    }
    for name, file in kept.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("x")
    save_hf_params(params, cfg, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *kept])
    for name, file in kept.items():
        assert (tmp_path / name / file).read_text() == "x"


# ----- output paths checked before any work -----

def test_unwritable_output_paths_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritableError, match=r"file/out: not a folder \(.*file is a file\)"):
        ensure_writable_dir(tmp_path / "file" / "out")
    with pytest.raises(OutputNotWritableError, match=r"cannot write the file .*: it is a folder"):
        ensure_writable_file(tmp_path)
    assert ensure_writable_dir(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert os.listdir(tmp_path) == ["file"]  # the check creates nothing and leaves no probe


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs procfs (a file system nobody can write)")
def test_the_write_probe_catches_what_permissions_allow():
    with pytest.raises(OutputNotWritableError, match="cannot write the folder /proc/jaxrl_out"):
        ensure_writable_dir("/proc/jaxrl_out")


@pytest.mark.parametrize("command", ["mismatch", "fp16-check", "study", "sanity"])
def test_unwritable_output_is_refused_before_any_work(command, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    missing_model = str(tmp_path / "no_model")  # loading it would fail: the output is checked first
    if command == "mismatch":
        argv = ["mismatch", "--model", missing_model, "--dtype", "float32", "--num-prompts", "1", "--prompt-len",
                "2", "--max-new-tokens", "2", "--seed", "0", "--out", str(tmp_path / "file" / "out")]
    elif command == "fp16-check":
        argv = ["fp16-check", missing_model, "--out", str(tmp_path / "file" / "report.json")]
    elif command == "study":
        argv = ["study", "--model", missing_model, "--out", str(tmp_path / "file" / "out")]
    else:
        argv = ["sanity", "--quick", "--out", str(tmp_path / "file" / "out"), f"model.path={missing_model}"]
    assert main(argv) == 2
    err = _error(capsys)
    assert "cannot write" in err and str(tmp_path / "file") in err and "no_model" not in err


def test_sft_refuses_its_output_before_training(tiny, tmp_path, capsys):
    out = tmp_path / "warm"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["sft", _RUN_CONFIG, f"model.path={tiny}", "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in _error(capsys)
    assert os.listdir(out) == ["notes.txt"]
    assert main(["sft", _RUN_CONFIG, f"model.path={tiny}", "--out", tiny]) == 2
    assert "which this command reads" in _error(capsys)


def test_train_refuses_its_export_folder_before_training(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    run_dir = tmp_path / "run"
    argv = ["train", _RUN_CONFIG, "--run-dir", str(run_dir), f"model.cache_dir={tmp_path / 'cache'}",
            "--export", str(out)]
    assert main(argv) == 2
    assert "notes.txt" in _error(capsys)
    assert os.listdir(out) == ["notes.txt"]
    assert not run_dir.exists() and not (tmp_path / "cache").exists()  # no warm start, no run folder
    assert main(argv[:-1] + [str(run_dir)]) == 2  # the run's own folder is never an export target
    assert "run" in _error(capsys)


# ----- make-tiny validates before it writes -----

@pytest.mark.parametrize("extra, message", [
    (["--num-kv-heads", "3"], "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (["--sharp", "nan"], "sharp=nan must be a finite number > 0"),
    (["--sharp", "inf"], "sharp=inf must be a finite number > 0"),
    (["--sharp", "0"], "sharp=0.0 must be a finite number > 0"),
    (["--head-dim", "33", "--arch", "llama"], "head_dim=33 must be even"),
    (["--hidden-size", "130"], "hidden_size=130 is not a multiple of num_heads=4"),
    (["--num-layers", "0"], "num_layers must be a positive integer, got 0"),
    (["--vocab-size", "100"], "vocab_size=100 is smaller than the tokenizer's 258 tokens"),
])
def test_make_tiny_refuses_a_model_that_nothing_could_load(extra, message, tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "m"), *extra]) == 2
    assert message in _error(capsys)
    assert os.listdir(tmp_path) == []


# ----- non-finite weights on the command line -----

def test_commands_refuse_non_finite_weights_unless_allowed(loaded, tiny, tmp_path, capsys):
    cfg, params = loaded
    poisoned = {**params, "final_norm": {"scale": params["final_norm"]["scale"].copy()}}
    poisoned["final_norm"]["scale"][0] = np.nan
    model = save_hf_params(poisoned, cfg, tmp_path / "nan", tokenizer_from=tiny)
    check = ["fp16-check", model, "--num-sequences", "1", "--seq-len", "4"]
    assert main(check) == 2
    err = _error(capsys)
    assert "tensor 'model.norm.weight' in model.safetensors has 1 NaN" in err and "--allow-nonfinite" in err
    assert main(["mismatch", "--model", model, "--dtype", "float32", "--num-prompts", "1", "--prompt-len", "2",
                 "--max-new-tokens", "2", "--seed", "0", "--out", str(tmp_path / "mm")]) == 2
    assert "tensor 'model.norm.weight'" in _error(capsys)
    assert main(check + ["--allow-nonfinite"]) == 1  # loaded, and the report flags the NaN it propagates
    assert "NOT OK" in capsys.readouterr().out
