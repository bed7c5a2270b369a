"""`jaxrl-fp16` subcommands end to end: make-tiny, mismatch (files, conventions, errors before any work)."""

import json
import os

import numpy as np
import pytest
import transformers

from jaxrl_fp16.cli import main
from jaxrl_fp16.mismatch import METRIC_NAMES
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.scoring import Scorer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "tiny")
    assert main(["make-tiny", out, "--arch", "llama", "--num-layers", "2", "--sharp", "--seed", "1",
                 "--max-position-embeddings", "64"]) == 0
    return out


def test_make_tiny_writes_a_transformers_model(model_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 2
    assert tok.decode(tok("12+3=15")["input_ids"]) == "12+3=15"
    assert float(m.model.norm.weight.detach().abs().mean()) == pytest.approx(8.0)  # --sharp default scale


def test_mismatch_single_dtype_files(model_dir, tmp_path):
    out = tmp_path / "mm"
    assert main(["mismatch", "--model", model_dir, "--dtype", "float16", "--num-prompts", "4", "--prompt-len",
                 "5", "--max-new-tokens", "10", "--samples-per-prompt", "2", "--seed", "0",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(METRIC_NAMES) <= set(summary)
    assert summary["sampler_dtype"] == summary["trainer_dtype"] == "float16" and summary["sampler"] == "jax"
    assert summary["num_sequences"] == 8 and summary["num_prompts"] == 4
    z = np.load(out / "tokens.npz")
    seq, resp = z["sequences"], z["response_mask"]
    assert seq.shape == resp.shape == z["sampler_logprobs"].shape == z["trainer_logprobs"].shape == (8, 15)
    assert z["sampler_logprobs"].dtype == np.float32 and np.all(z["trainer_logprobs"][resp == 0] == 0)
    assert int(resp.sum()) == summary["mismatch/num_tokens"]
    # trainer_logprobs[:, t] is log p(sequences[:, t] | sequences[:, :t]): recompute it independently.
    cfg, params = load_hf_params(model_dir)
    pi = Scorer(cfg, dtype="float16")(params, seq, z["attention_mask"])
    np.testing.assert_allclose(z["trainer_logprobs"][resp == 1], pi[resp == 1], atol=1e-6)
    for png in ("token_probs.png", "seq_log_ratio.png"):
        assert (out / png).stat().st_size > 10_000


def test_mismatch_dtype_list_prints_a_table(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["mismatch", "--model", model_dir, "--dtype", "float32,bfloat16", "--num-prompts", "3",
                 "--prompt-len", "4", "--max-new-tokens", "6", "--seed", "1", "--out", str(out),
                 "--no-plots"]) == 0
    table = capsys.readouterr().out
    assert "| jax | float32 | float32 |" in table and "| jax | bfloat16 | bfloat16 |" in table
    rows = json.loads((out / "table.json").read_text())
    assert [r["sampler_dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["mismatch/kl_k3"] < rows[1]["mismatch/kl_k3"]
    assert (out / "float32" / "tokens.npz").exists() and (out / "bfloat16" / "summary.json").exists()


def test_text_prompts_file(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("1+1=\n2+2=\n")
    ids = tmp_path / "p.jsonl"
    ids.write_text("[1, 2, 3]\n{\"prompt_ids\": [4, 5]}\n")
    for f in (prompts, ids):
        out = tmp_path / f.stem
        # 2 prompts x 2 samples, 6 new tokens: the FP32 programs of the dtype-list test (4 rows)
        assert main(["mismatch", "--model", model_dir, "--dtype", "f32", "--prompts", str(f), "--max-new-tokens",
                     "6", "--samples-per-prompt", "2", "--seed", "0", "--out", str(out), "--no-plots"]) == 0
        assert json.loads((out / "summary.json").read_text())["num_prompts"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "float8", "--num-prompts", "2", "--prompt-len", "3"], "unknown dtype"),
    (["--dtype", "bfloat16", "--trainer-dtype", "float16", "--num-prompts", "2", "--prompt-len", "3"],
     "differs from the trainer's compute dtype"),
    (["--dtype", "float16", "--num-prompts", "2", "--prompt-len", "60"], "context length"),
    (["--dtype", "float16"], "give prompts"),
    (["--dtype", "float16", "--prompts", "EMPTY"], "no prompts"),
    (["--dtype", "float16", "--sampler", "sglang", "--num-prompts", "2", "--prompt-len", "3"], "unknown sampler"),
])
def test_bad_input_fails_before_any_work(model_dir, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    out = tmp_path / "never"
    code = main(["mismatch", "--model", model_dir, "--max-new-tokens", "8", "--seed", "0", "--out", str(out),
                 *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_allowing_a_dtype_mismatch_runs_it(model_dir, tmp_path):
    out = tmp_path / "mixed"
    # The shapes of the dtype-list test (3 prompts of 4 tokens, 6 new): its BF16 and FP32 programs again.
    assert main(["mismatch", "--model", model_dir, "--dtype", "bfloat16", "--trainer-dtype", "float32",
                 "--allow-dtype-mismatch", "--num-prompts", "3", "--prompt-len", "4", "--max-new-tokens", "6",
                 "--seed", "0", "--out", str(out), "--no-plots"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["sampler_dtype"], s["trainer_dtype"]) == ("bfloat16", "float32")
    assert os.path.exists(out / "tokens.npz")


def test_fp16_check_reports_and_flags_overflow(model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["fp16-check", model_dir, "--num-sequences", "2", "--seq-len", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ok for f16" in text and "final_norm" in text
    assert json.loads(out.read_text())["ok"] is True
    # A checkpoint with an activation far beyond 65504 fails the check (exit code 1) and names the layer.
    from jaxrl_fp16.models.hf import save_hf_params

    cfg, params = load_hf_params(model_dir)
    params["layers"]["mlp"]["down_proj"]["kernel"][1] *= 3e4
    params["layers"]["mlp"]["up_proj"]["kernel"][1] *= 3e2
    bad = tmp_path / "bad"
    save_hf_params(params, cfg, bad, tokenizer_from=model_dir)
    assert main(["fp16-check", str(bad), "--num-sequences", "2", "--seq-len", "16"]) == 1
    text = capsys.readouterr().out
    assert "NOT OK" in text and "layer 1" in text


def test_an_expected_failure_is_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "no_such_run")
    assert main(["export", missing, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxrl-fp16 export: error:") and "no_such_run" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    missing = str(tmp_path / "no_such_run")
    argv = ["export", missing, str(tmp_path / "out")]
    if how == "flag-before":
        argv = ["--debug"] + argv
    elif how == "flag-after":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("JAXRL_FP16_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        main(argv)


def test_a_defect_is_one_line_naming_its_type_and_the_debug_switch(tmp_path, monkeypatch, capsys):
    """Fault injection (named as such): a subcommand that fails with an error no user input explains."""
    import jaxrl_fp16.rl.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(trainer, "export_checkpoint", broken)
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unexpected RuntimeError: something inside broke second line" in err and "--debug" in err


def test_ctrl_c_outside_the_training_loop_exits_130(tmp_path, monkeypatch, capsys):
    """Fault injection (named as such): Ctrl-C arriving while a subcommand works."""
    import jaxrl_fp16.rl.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "export_checkpoint", interrupted)
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "jaxrl-fp16 export: interrupted\n"
