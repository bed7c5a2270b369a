"""Resume checks on run directories made of a real config and real (tiny) checkpoints: the config may change only
keys that leave the run's course as it was or that are allowed, allowed changes are recorded, resuming nothing is
an error; and the SIGINT/SIGTERM handlers of the loops. Nothing here builds a model: these checks come first."""

import contextlib
import json
import os
import signal
import time

import pytest
import yaml

from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.cli import main
from jaxrl_fp16.config import ConfigError, load_config
from jaxrl_fp16.rl import rundir
from jaxrl_fp16.rl.dpo_trainer import DPO_SILENT_CHANGES, DPOTrainer
from jaxrl_fp16.rl.rundir import (ConfigChangeError, Interrupted, ResumeOptions, StopSignals, check_changes,
                                  checkpoint_config, config_diff, config_dict, finish_resume, stored_config,
                                  write_config)
from jaxrl_fp16.rl.trainer import RL_SILENT_CHANGES, Trainer
from test_checkpoint import make_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
DPO = os.path.join(ROOT, "configs", "dpo", "tiny_fp16.yaml")
BASE = ["optim.lr=1e-4", "train.iterations=6", "log.progress=false"]


def make_run_dir(path, config=TINY, overrides=BASE, iterations=(2,)):
    """A run directory as a run leaves it: config.yaml and checkpoints whose meta holds the config."""
    run = load_config(config, overrides)
    os.makedirs(path, exist_ok=True)
    write_config(str(path), run)
    ck = Checkpointer(rundir.checkpoint_dir(str(path)), keep=3)
    for i in iterations:
        ck.save(i, make_state(), {"iteration": i, "step": i, "config": config_dict(run)})
    ck.close()
    return run


def _open(run_dir):
    return contextlib.closing(Checkpointer(rundir.checkpoint_dir(str(run_dir))))


def test_config_diff_lists_dotted_keys_with_old_and_new():
    old = config_dict(load_config(TINY, BASE))
    new = config_dict(load_config(TINY, [*BASE, "optim.lr=1e-3", "seed=1", "task.options.partial_credit=true"]))
    assert config_diff(old, old) == {}
    assert config_diff(old, new) == {"optim.lr": [1e-4, 1e-3], "seed": [0, 1], "task.options.partial_credit": [None, True]}


def test_changes_that_alter_the_course_are_refused_naming_the_keys():
    reference = config_dict(load_config(TINY, BASE))
    changed = load_config(TINY, [*BASE, "optim.lr=1e-3", "seed=1", "train.iterations=12"])
    with pytest.raises(ConfigChangeError) as e:
        check_changes(reference, changed, ResumeOptions(), RL_SILENT_CHANGES)
    message = str(e.value)
    assert "\n" not in message
    assert "optim.lr 0.0001 -> 0.001, seed 0 -> 1" in message and "--allow-change optim.lr,seed" in message
    assert "train.iterations" not in message  # extending the run is not a change of course


def test_keys_that_leave_the_course_change_silently():
    reference = config_dict(load_config(TINY, BASE))
    extended = load_config(TINY, [*BASE, "train.iterations=12", "log.tensorboard=false", "checkpoint.keep=5",
                                  "checkpoint.every=3", "checkpoint.export_hf=false", "dpo.beta=0.3",
                                  "train.score_memory_gib=0.5"])
    assert check_changes(reference, extended, ResumeOptions(), RL_SILENT_CHANGES) == {
        "checkpoint.every": [20, 3], "checkpoint.export_hf": [True, False], "checkpoint.keep": [2, 5],
        "dpo.beta": [0.1, 0.3], "log.tensorboard": [True, False], "train.iterations": [6, 12],
        "train.score_memory_gib": [2.0, 0.5]}
    # DPO does not read the RL sections, the RL loop not the DPO one.
    rl_only = load_config(TINY, [*BASE, "loss.algorithm=gspo", "sampler.max_new_tokens=5"])
    assert set(check_changes(reference, rl_only, ResumeOptions(), DPO_SILENT_CHANGES)) == {
        "loss.algorithm", "sampler.max_new_tokens"}
    with pytest.raises(ConfigChangeError, match="loss.algorithm grpo -> gspo"):
        check_changes(reference, rl_only, ResumeOptions(), RL_SILENT_CHANGES)


def test_allowed_changes_pass_and_unknown_allowed_keys_are_refused():
    reference = config_dict(load_config(TINY, BASE))
    changed = load_config(TINY, [*BASE, "optim.lr=1e-3", "optim.warmup_steps=5", "seed=1"])
    want = {"optim.lr": [1e-4, 1e-3], "optim.warmup_steps": [0, 5], "seed": [0, 1]}
    assert check_changes(reference, changed, ResumeOptions(allow=("optim", "seed"))) == want  # a section: its keys
    assert check_changes(reference, changed, ResumeOptions(allow_any=True)) == want
    with pytest.raises(ConfigChangeError, match="seed 0 -> 1") as e:
        check_changes(reference, changed, ResumeOptions(allow=("optim.lr", "optim.warmup_steps")))
    assert "optim.lr" not in str(e.value)
    with pytest.raises(ConfigError, match="--allow-change optim.lrr: no such config key"):
        check_changes(reference, changed, ResumeOptions(allow=("optim.lrr",)))


@pytest.mark.parametrize("trainer, config", [(Trainer, TINY), (DPOTrainer, DPO)])
def test_resuming_nothing_is_an_error_naming_the_folder(tmp_path, trainer, config):
    run = load_config(config, BASE)
    with pytest.raises(FileNotFoundError, match=f"the run directory {tmp_path / 'none'} does not exist"):
        trainer(run, str(tmp_path / "none"), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path / 'empty' / 'checkpoints'}; nothing "
                                                f"to resume"):
        trainer(run, str(tmp_path / "empty"), resume=True)
    assert not os.path.exists(tmp_path / "empty" / "config.yaml")


@pytest.mark.parametrize("trainer, config", [(Trainer, TINY), (DPOTrainer, DPO)])
def test_a_changed_config_is_refused_before_anything_is_built(tmp_path, trainer, config):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, config)
    before = (run_dir / "config.yaml").read_text()
    changed = load_config(config, [*BASE, "optim.lr=1e-3"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigChangeError, match="optim.lr 0.0001 -> 0.001"):
        trainer(changed, str(run_dir), resume=True)
    assert time.perf_counter() - t0 < 10  # no base model, sampler or compile
    assert (run_dir / "config.yaml").read_text() == before
    assert not (run_dir / "config_changes.jsonl").exists()


def test_the_command_line_refuses_a_change_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir)
    code = main(["train", TINY, "--run-dir", str(run_dir), "--resume", *BASE, "optim.lr=1e-3", "seed=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "optim.lr 0.0001 -> 0.001, seed 0 -> 3" in err and "--allow-change optim.lr,seed" in err
    assert main(["train", TINY, "--run-dir", str(run_dir), "--allow-change", "seed", *BASE]) == 2
    assert "--allow-change: only with --resume" in capsys.readouterr().err


def test_an_allowed_change_is_recorded_and_config_yaml_kept(tmp_path, caplog):
    run_dir = tmp_path / "run"
    first = make_run_dir(run_dir, iterations=(2, 4))
    original = (run_dir / "config.yaml").read_text()
    changed = load_config(TINY, [*BASE, "optim.lr=1e-3", "train.iterations=12"])
    options = ResumeOptions(allow=("optim.lr",))
    rundir.begin_resume(str(run_dir), changed, options)
    with _open(run_dir) as ck:
        meta = ck.meta(4)
    changes = finish_resume(str(run_dir), changed, options, meta, 4)
    assert changes == {"optim.lr": [1e-4, 1e-3], "train.iterations": [6, 12]}
    assert (run_dir / "config.yaml").read_text() == original
    lines = [json.loads(x) for x in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert lines == [{"iteration": 4, "changes": {"optim.lr": [1e-4, 1e-3], "train.iterations": [6, 12]}}]
    assert yaml.safe_load((run_dir / "config.resumed.yaml").read_text())["optim"]["lr"] == 1e-3
    assert stored_config(str(run_dir)) == changed
    assert any("optim.lr 0.0001 -> 0.001" in r.getMessage() and "train.iterations" not in r.getMessage()
               for r in caplog.records if r.levelno == 30)
    # Each checkpoint keeps the config that made it: what `export` builds the model from.
    ck = Checkpointer(rundir.checkpoint_dir(str(run_dir)))
    ck.save(6, make_state(), {"iteration": 6, "config": config_dict(changed)})
    assert checkpoint_config(str(run_dir), ck.meta(4), 4) == first
    assert checkpoint_config(str(run_dir), ck.meta(6), 6) == changed
    assert checkpoint_config(str(run_dir), {"iteration": 1}, 1) == changed  # no config in meta: the stored one
    ck.close()
    # A new run started in the folder (its checkpoints gone) drops the former run's resume records.
    write_config(str(run_dir), first)
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("config")) == ["config.yaml"]


def _wait_for(condition, seconds=5.0):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_stop_flag_and_a_second_stops_at_once(signum):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as e:
        with StopSignals("runs/x/checkpoints") as stop:
            assert signal.getsignal(signum) is not before
            os.kill(os.getpid(), signum)  # a real signal to this process
            assert _wait_for(lambda: stop.signum == signum)  # the process goes on: the loop decides when to stop
            os.kill(os.getpid(), signum)
            _wait_for(lambda: False, 2.0)
    assert e.value.signum == signum and e.value.exit_code == 128 + signum
    assert str(e.value).startswith(f"stopped at once by a second {signal.Signals(signum).name}")
    assert "runs/x/checkpoints" in str(e.value)
    assert signal.getsignal(signum) is before  # restored
