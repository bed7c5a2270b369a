"""DPO: the loss and its gradients against a closed-form numpy reference, the same loss through the real model
and the one jitted step, synthetic preference pairs, and short CPU runs that learn in FP16 and BF16."""

import json
import os
import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.cli import main
from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.loss_scale import NoOpLossScale
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.rl.dpo import DPO_DIAG_NAMES, DPOLossConfig, dpo_loss, dpo_loss_from_tokens
from jaxrl_fp16.rl.dpo_trainer import DPOTrainer
from jaxrl_fp16.rl.order import epoch_slice
from jaxrl_fp16.rl.preferences import corrupt_answer, make_preference_pairs, split_pairs, tokenize_pairs
from jaxrl_fp16.rl.tasks import make_task
from jaxrl_fp16.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO_FP16 = os.path.join(ROOT, "configs", "dpo", "tiny_fp16.yaml")
STEPS = 100


# ----- numpy reference ------------------------------------------------------------------------------------------

def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_dpo(loss_type, beta, eps, pc, pr, rc, rr):
    """(loss, dloss/dpc [B], diagnostics) in float64; dloss/dpr = -dloss/dpc."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        terms = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
        dl_dh = beta * (eps * np_sigmoid(beta * h) - (1 - eps) * np_sigmoid(-beta * h))
    else:
        terms = (h - 1 / (2 * beta)) ** 2
        dl_dh = 2 * (h - 1 / (2 * beta))
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    diag = {"accuracy": np.mean((rw > rl) + 0.5 * (rw == rl)), "margin": np.mean(rw - rl),
            "chosen_reward": np.mean(rw), "rejected_reward": np.mean(rl), "logits": np.mean(h),
            "policy_accuracy": np.mean((pc > pr) + 0.5 * (pc == pr))}
    return terms.mean(), dl_dh / len(h), diag


def random_token_inputs(seed, B=12, T=9):
    """Token log-probs of chosen/rejected under policy and reference, with ragged masks and garbage off-mask."""
    rng = np.random.default_rng(seed)
    tok = {k: -rng.exponential(0.7, size=(B, T)) for k in ("pc", "pr", "rc", "rr")}
    masks = {}
    for side in ("c", "r"):
        start = rng.integers(1, 4, size=B)
        length = rng.integers(1, T - 3, size=B)
        cols = np.arange(T)
        masks[side] = ((cols >= start[:, None]) & (cols < (start + length)[:, None])).astype(np.float32)
    for k in tok:  # what sits outside the responses (prompt, padding) must not count
        tok[k] = np.where(masks[k[1]] > 0, tok[k], 1e4 * rng.standard_normal((B, T)))
    tok["rc"][:3], tok["rr"][:3] = tok["pc"][:3], tok["pr"][:3]  # three exact ties: policy == reference
    return tok, masks


@pytest.mark.parametrize("loss_type, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                  ("sigmoid", 50.0, 0.1), ("ipo", 0.3, 0.0)])
def test_loss_and_gradients_match_numpy(loss_type, beta, eps):
    tok, masks = random_token_inputs(seed=int(beta * 10) + len(loss_type))
    cfg = DPOLossConfig(loss_type=loss_type, beta=beta, label_smoothing=eps)
    seq = {k: np.sum(np.where(masks[k[1]] > 0, v, 0.0), axis=-1) for k, v in tok.items()}
    want_loss, want_dpc, want_diag = np_dpo(loss_type, beta, eps, seq["pc"], seq["pr"], seq["rc"], seq["rr"])

    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in tok.items()}
    mc, mr = jnp.asarray(masks["c"]), jnp.asarray(masks["r"])

    @jax.jit
    def loss_and_grads(pc, pr, rc, rr):
        def f(pc, pr, rc, rr):
            return dpo_loss_from_tokens(cfg, pc, pr, rc, rr, mc, mr)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(pc, pr, rc, rr)

    (loss, diag), (g_pc, g_pr, g_rc, g_rr) = loss_and_grads(f32["pc"], f32["pr"], f32["rc"], f32["rr"])
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    # d loss / d logp_t = dl/dh / B on every chosen response token, minus that on every rejected one, 0 elsewhere.
    np.testing.assert_allclose(np.asarray(g_pc), masks["c"] * want_dpc[:, None], rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_pr), -masks["r"] * want_dpc[:, None], rtol=2e-4, atol=1e-7)
    assert not np.any(np.asarray(g_rc)) and not np.any(np.asarray(g_rr))  # the reference is a constant
    assert set(diag) == set(DPO_DIAG_NAMES)
    for k, v in want_diag.items():
        np.testing.assert_allclose(float(diag[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)
    assert 0 < float(diag["accuracy"]) < 1 and float(diag["accuracy"]) != 0.5


def test_policy_at_the_reference_gives_log2_and_ties_count_half():
    cfg = DPOLossConfig(beta=0.2)
    same = jnp.asarray([-3.0, -1.5, -7.25])
    loss, diag = jax.jit(lambda a, b: dpo_loss(cfg, a, b, a, b))(same, same - 1.0)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)  # policy == reference: -log sigmoid(0)
    assert float(diag["accuracy"]) == 0.5 and float(diag["margin"]) == 0.0
    assert float(diag["policy_accuracy"]) == 1.0  # chosen is 1 nat more likely in every pair
    with pytest.raises(ValueError, match="share one"):
        dpo_loss(cfg, same, same[:2], same, same)


@pytest.mark.parametrize("kwargs, words", [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                                            ({"loss_type": "kto"}, "sigmoid, ipo"),
                                            ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing")])
def test_bad_loss_config_is_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DPOLossConfig(**kwargs)


@pytest.mark.parametrize("override, words", [("dpo.beta=-1", "dpo.beta"), ("dpo.loss_type=orpo", "dpo.loss_type"),
                                             ("dpo.label_smoothing=0.7", "dpo.label_smoothing"),
                                             ("dpo.steps=0", "dpo.steps"), ("dpo.betta=1", "dpo.betta"),
                                             ("dpo.microbatches=3", "dpo.microbatches")])
def test_bad_dpo_section_names_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(DPO_FP16, [override])


@pytest.mark.parametrize("override, words", [("lora={rank: 4}", "lora"), ("critic.enabled=true", "critic"),
                                             ("mesh.fsdp=2", "mesh.fsdp")])
def test_rl_only_settings_are_refused_not_ignored(override, words, tmp_path):
    run = load_config(DPO_FP16, [override])
    with pytest.raises(ConfigError, match=words):
        DPOTrainer(run, str(tmp_path / "run"))


def test_the_dpo_configs_differ_only_in_precision():
    import dataclasses

    runs = {p: load_config(os.path.join(ROOT, "configs", "dpo", f"tiny_{p}.yaml")) for p in ("fp16", "bf16", "fp32")}
    assert [r.precision for r in runs.values()] == ["fp16-mixed", "bf16-mixed", "fp32"]
    for r in runs.values():
        assert dataclasses.replace(r, precision="fp16-mixed") == runs["fp16"]


# ----- preference pairs -----------------------------------------------------------------------------------------

def test_corrupted_answers_are_near_misses():
    rng = random.Random(0)
    for answer in ["0", "7", "10", "99", "100", "118", "olleh", "ab", "a"]:
        for _ in range(100):
            wrong = corrupt_answer(answer, rng)
            assert wrong != answer and abs(len(wrong) - len(answer)) <= 1
            if answer.isdigit() and len(wrong) > 1:
                assert wrong.isdigit() and wrong[0] != "0", (answer, wrong)


def test_pairs_are_deterministic_distinct_and_held_out_prompts_are_new():
    task = make_task("addition", min_digits=1, max_digits=2)
    train, held_out = split_pairs(task, 300, 100, seed=3)
    assert (train, held_out) == split_pairs(task, 300, 100, seed=3)
    assert train != split_pairs(task, 300, 100, seed=4)[0]
    assert len({p.prompt for p in train}) == 300 and len({p.prompt for p in held_out}) == 100
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    for p in train + held_out:
        a, b = (int(x) for x in p.prompt[:-1].split("+"))
        assert p.chosen == str(a + b) and p.rejected != p.chosen
    with pytest.raises(ValueError, match="distinct new prompts"):
        make_preference_pairs(make_task("addition", min_digits=1, max_digits=1), 101, seed=0)


class CharTokenizer:
    """One id per character; EOS 1, PAD 0 (the layout of the project's tiny tokenizers)."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenized_pairs_mask_the_responses_and_eos():
    task = make_task("addition")
    pairs = make_preference_pairs(task, 5, seed=0)
    data = tokenize_pairs(pairs, CharTokenizer(), width=12)
    assert data.tokens.shape == (5, 2, 12) and len(data) == 5
    for i, p in enumerate(pairs):
        for side, response in enumerate((p.chosen, p.rejected)):
            row, resp = data.tokens[i, side], data.response_mask[i, side]
            n = len(p.prompt) + len(response) + 1
            assert "".join(map(chr, row[resp > 0][:-1])) == response and row[n - 1] == 1
            assert data.attention_mask[i, side].sum() == n and not np.any(row[n:])
    with pytest.raises(ValueError, match="width"):
        tokenize_pairs(pairs, CharTokenizer(), width=4)


def test_batches_walk_through_every_pair_once_per_epoch():
    rows = np.concatenate([epoch_slice(96, 32, s, seed=1) for s in range(3)])
    assert sorted(rows) == list(range(96))
    np.testing.assert_array_equal(epoch_slice(96, 32, 4, seed=1), epoch_slice(96, 32, 4, seed=1))
    assert set(epoch_slice(96, 32, 3, seed=1)) != set(rows[:32])  # a new permutation each epoch


# ----- through the real model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(base_models, tmp_path_factory):
    """This module's model cache, holding the session's shared base model of the quick config (conftest.py)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return base_models.cache_dir(load_config(DPO_FP16, quick(cache)), cache)


def quick(cache_dir, *extra):
    """The tiny DPO config scaled down for tests: 2 layers, a shorter warm start, fewer pairs and steps."""
    return [f"model.cache_dir={cache_dir}", "model.tiny.num_layers=2", "model.warm_start.steps=300",
            "dpo.num_pairs=1024",
            "dpo.eval_pairs=256", f"dpo.steps={STEPS}", f"dpo.eval_every={STEPS // 2}", "dpo.beta=0.5", "optim.lr=3e-4",
            f"checkpoint.every={STEPS}", "log.progress=false", "log.tensorboard=false", *extra]


@pytest.mark.slow  # the warm-started base model (built once per session)
def test_the_step_loss_and_gradients_through_the_model_equal_numpy(cache_dir, tmp_path):
    run = load_config(DPO_FP16, quick(cache_dir, "precision=fp32"))
    trainer = DPOTrainer(run, str(tmp_path))
    try:
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(lambda x: x + 0.02 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                                        trainer.state.params)  # a policy that differs from the reference
        rows = np.arange(16)
        batch = {**trainer.train_data.take(rows), "ref_logps": trainer.ref_train[rows],
                 "poison": np.zeros(16, np.float32)}
        sgd = optax.sgd(1.0)  # new params = params - gradient
        step = make_train_step(trainer._loss_fn, sgd, "fp32", max_grad_norm=None)
        new_state, metrics = step(TrainState.create(params, sgd, NoOpLossScale()), batch)

        model = CausalLM(trainer.model_cfg, dtype=jnp.float32)
        tokens = batch["tokens"].reshape(32, -1)
        attn = batch["attention_mask"].reshape(32, -1)
        resp = batch["response_mask"].reshape(32, -1).astype(np.float64)

        def token_lp(p):
            return token_logprobs(model, p, tokens, attn)

        lp = np.asarray(jax.jit(token_lp)(params), np.float64)
        seq_Bx2 = (lp * resp).sum(-1).reshape(16, 2)
        ref = trainer.ref_train[rows].astype(np.float64)
        want_loss, want_dpc, _ = np_dpo("sigmoid", run.dpo.beta, 0.0, seq_Bx2[:, 0], seq_Bx2[:, 1], ref[:, 0],
                                        ref[:, 1])
        assert abs(want_loss - np.log(2)) > 1e-3  # the perturbation moved the policy off the reference
        np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
        # Chain rule with the closed-form dloss/dlogp: vjp of the token log-probs with that cotangent.
        cot_BxT = (resp.reshape(16, 2, -1) * np.stack([want_dpc, -want_dpc], 1)[:, :, None]).reshape(32, -1)
        _, vjp = jax.vjp(token_lp, params)
        (want_grads,) = vjp(jnp.asarray(cot_BxT, jnp.float32))
        got = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params,
                                     new_state.params)
        num = sum(np.sum((g - np.asarray(w)) ** 2) for g, w in zip(jax.tree_util.tree_leaves(got),
                                                                   jax.tree_util.tree_leaves(want_grads)))
        den = sum(np.sum(np.asarray(w, np.float64) ** 2) for w in jax.tree_util.tree_leaves(want_grads))
        assert den > 0 and np.sqrt(num / den) < 1e-4, np.sqrt(num / den)
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def arms(cache_dir, tmp_path_factory):
    """The same short DPO run in FP16 (one injected overflow) and in BF16."""
    out = {}
    for precision, extra in (("fp16-mixed", ["debug.inject_overflow_steps=[2]"]), ("bf16-mixed", [])):
        run = load_config(DPO_FP16, quick(cache_dir, f"precision={precision}", *extra))
        run_dir = str(tmp_path_factory.mktemp(precision))
        trainer = DPOTrainer(run, run_dir)
        try:
            summary = trainer.run()
            compiles = trainer.step_fn._cache_size()
        finally:
            trainer.close()
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        out[precision] = {"summary": summary, "lines": lines, "run_dir": run_dir, "compiles": compiles}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_a_tiny_dpo_run_learns(arms, precision):
    s = arms[precision]["summary"]
    start, end = s["start"], s["end"]
    print(f"{precision}: held-out preference accuracy {start['eval/accuracy']:.3f} -> {end['eval/accuracy']:.3f}, "
          f"margin {end['eval/margin']:.3f}, skipped {s['skipped_steps']}, {s['time/total']:.1f} s")
    assert start["eval/accuracy"] == 0.5 and start["eval/margin"] == 0.0  # policy == reference: all ties
    assert end["eval/accuracy"] > 0.7 and end["eval/margin"] > 0.2
    assert end["eval/loss"] < start["eval/loss"] - 0.05
    assert arms[precision]["compiles"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_metrics_lines_and_outputs(arms, precision):
    arm = arms[precision]
    lines = arm["lines"]
    assert [m["step"] for m in lines] == list(range(STEPS + 1))
    for m in lines[1:]:
        assert {"loss", "grad_norm", "loss_scale", "skipped_steps", *DPO_DIAG_NAMES} <= set(m)
    assert {f"eval/{k}" for k in DPO_DIAG_NAMES} <= set(lines[STEPS // 2]) and "eval/accuracy" not in lines[1]
    assert os.path.isfile(os.path.join(arm["run_dir"], "hf", "config.json"))
    assert os.path.isdir(os.path.join(arm["run_dir"], "checkpoints", str(STEPS)))


@pytest.mark.slow
def test_fp16_scales_the_loss_and_skips_the_injected_overflow(arms):
    fp16, bf16 = arms["fp16-mixed"]["lines"], arms["bf16-mixed"]["lines"]
    assert fp16[3]["skipped"] == 1 and fp16[3]["loss_scale"] == fp16[2]["loss_scale"] / 2  # optimizer step 2
    assert max(m["loss_scale"] for m in fp16[1:]) <= 65536.0
    assert arms["fp16-mixed"]["summary"]["skipped_steps"] == sum(m["skipped"] for m in fp16[1:]) >= 1
    assert all(m["loss_scale"] == 1.0 for m in bf16[1:]) and arms["bf16-mixed"]["summary"]["skipped_steps"] == 0


def cli_args(cache_dir):
    """A short bf16 CLI run: 128 pairs, eval and checkpoint every 4 steps."""
    return quick(cache_dir, "precision=bf16-mixed", "dpo.num_pairs=128", "dpo.eval_pairs=64", "dpo.eval_every=4",
                 "checkpoint.every=4")


@pytest.fixture(scope="module")
def whole(cache_dir, tmp_path_factory):
    """The 8-step CLI run, uninterrupted: the reference of the resumed ones."""
    out = str(tmp_path_factory.mktemp("dpo-whole") / "whole")
    assert main(["dpo", DPO_FP16, "--run-dir", out, "--steps", "8", *cli_args(cache_dir)]) == 0
    return out


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def metrics_without_time(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(x).items() if k != "time/step"} for x in f]


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_the_resume_ends_bitwise(cache_dir, whole, tmp_path, capsys,
                                                                      monkeypatch):
    args = cli_args(cache_dir)
    parts = str(tmp_path / "parts")
    ckpt_dir = os.path.join(parts, "checkpoints")
    train_step = DPOTrainer.train_step

    def step_then_sigterm(self, step):
        out = train_step(self, step)
        if step == 2:  # a real SIGTERM to this process, at a moment the test chooses: during step 3 of 8
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(DPOTrainer, "train_step", step_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["dpo", "--config", DPO_FP16, "--run-dir", parts, "--steps", "8", *args]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"jaxrl-fp16 dpo: stopped by SIGTERM after step 3 of 8; checkpoint 3 "
                                            f"saved in {ckpt_dir} (continue with --resume)")
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert os.listdir(ckpt_dir) == ["3"]  # checkpoint.every=4: the stop's own
    assert [m["step"] for m in metrics_without_time(parts)] == [0, 1, 2, 3]
    assert not os.path.exists(os.path.join(parts, "hf"))
    monkeypatch.undo()

    assert main(["dpo", "--config", DPO_FP16, "--run-dir", parts, "--steps", "8", *args]) == 2  # needs --resume
    assert "--resume" in capsys.readouterr().err
    # A resume with a config that changes the course is refused, naming the key, before any work.
    original = read_bytes(os.path.join(parts, "config.yaml"))
    assert main(["dpo", DPO_FP16, "--run-dir", parts, "--steps", "8", "--resume", *args, "dpo.beta=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dpo.beta 0.5 -> 0.3" in err and "--allow-change dpo.beta" in err
    assert read_bytes(os.path.join(parts, "config.yaml")) == original

    assert main(["dpo", DPO_FP16, "--run-dir", parts, "--steps", "8", "--resume", *args]) == 0
    assert read_bytes(os.path.join(whole, "hf", "model.safetensors")) == read_bytes(
        os.path.join(parts, "hf", "model.safetensors"))
    assert metrics_without_time(whole) == metrics_without_time(parts)
    assert not os.path.exists(os.path.join(parts, "config_changes.jsonl"))  # the same config: nothing to record
    assert main(["dpo", "--config", DPO_FP16, DPO_FP16, *args]) == 2


@pytest.mark.slow
def test_allowed_changes_are_recorded_and_a_broken_checkpoint_falls_back(cache_dir, whole, tmp_path, capsys,
                                                                          caplog):
    import shutil

    from test_checkpoint import truncate_array_data

    args = cli_args(cache_dir)
    run_dir = str(tmp_path / "run")
    shutil.copytree(whole, run_dir)  # 8 steps done: checkpoints 4 and 8
    original = read_bytes(os.path.join(run_dir, "config.yaml"))
    extend = ["dpo", DPO_FP16, "--run-dir", run_dir, "--steps", "10", "--resume", *args, "dpo.beta=0.3"]
    assert main([*extend, "--allow-change", "dpo.beta"]) == 0
    assert read_bytes(os.path.join(run_dir, "config.yaml")) == original
    with open(os.path.join(run_dir, "config_changes.jsonl")) as f:
        assert [json.loads(x) for x in f] == [{"iteration": 8, "changes": {"dpo.beta": [0.5, 0.3],
                                                                            "dpo.steps": [8, 10]}}]
    assert load_config(os.path.join(run_dir, "config.resumed.yaml")).dpo.beta == 0.3
    extended = read_bytes(os.path.join(run_dir, "hf", "model.safetensors"))
    capsys.readouterr()

    # Checkpoint 10's array data cut short: export says which file and which checkpoint restores, in one line.
    truncate_array_data(os.path.join(run_dir, "checkpoints", "10"))
    assert main(["export", run_dir, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint 10 in " in err and "the newest that restores is 8" in err
    assert main(["export", run_dir, str(tmp_path / "out"), "--iteration", "8"]) == 0
    # --fallback resumes from checkpoint 8, made with beta 0.5 (the change is checked against that one, allowed).
    assert main([*extend, "--fallback", "--allow-change", "dpo.beta"]) == 0
    assert any("checkpoint 10 in" in r.getMessage() and "resuming from checkpoint 8" in r.getMessage()
               for r in caplog.records)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["10", "10.broken", "8"]
    with open(os.path.join(run_dir, "config_changes.jsonl")) as f:  # checked against checkpoint 8's config
        assert [json.loads(x)["iteration"] for x in f] == [8, 8]
    assert read_bytes(os.path.join(run_dir, "hf", "model.safetensors")) == extended  # the same steps again


def test_epoch_slice_visits_every_item_once_per_epoch_and_rejects_bad_sizes():
    seen = np.concatenate([epoch_slice(10, 7, s, seed=5) for s in range(10)])  # 70 positions: 7 epochs of 10
    for e in range(7):
        assert sorted(seen[10 * e:10 * (e + 1)]) == list(range(10))
    with pytest.raises(ValueError, match="n=0"):
        epoch_slice(0, 4, 0, seed=0)
