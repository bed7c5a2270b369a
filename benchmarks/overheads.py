"""What the method adds to an RL iteration, as a fraction of the iteration's wall time.

Runs the trainer on the tiny FP16 config (built-in JAX sampler) and measures, on its own mini-batches:
- the per-iteration mismatch measurement: `mismatch.summarize(mismatch_metrics(log mu, log pi, mask))`. The
  trainer's recomputation of log pi on the rollout is not counted: GRPO needs it anyway (the old policy's
  log-probs for the PPO ratio), the mismatch reuses it;
- dynamic loss scaling: the same jitted step with the run's `DynamicLossScale` state vs a `NoOpLossScale` state
  (scaling, unscaling, the finiteness check and the skip logic), times the optimizer steps per iteration.
The comparison's ratio is (iteration - overhead) / iteration; the target 0.95 means overhead <= 5%.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time


from benchmarks.common import Comparison, interleaved_median
from jaxrl_fp16 import mismatch
from jaxrl_fp16.config import load_config
from jaxrl_fp16.loss_scale import NoOpLossScale
from jaxrl_fp16.step import make_train_step

__all__ = ["run_overheads"]

log = logging.getLogger(__name__)


def run_overheads(config: str, *, iterations: int, repeats: int) -> list[Comparison]:
    from jaxrl_fp16.rl.trainer import Trainer

    run = load_config(config, [f"train.iterations={iterations}", "log.progress=false", "log.tensorboard=false",
                               "checkpoint.export_hf=false", f"checkpoint.every={iterations}"])
    with tempfile.TemporaryDirectory(prefix="bench-overheads-") as run_dir:
        trainer = Trainer(run, os.path.join(run_dir, "run"))
        last_call = {}
        update = trainer.update  # what the trainer calls for each mini-batch (the step, with fault injection)

        def recording_update(*args, **kwargs):
            last_call.update(args=args, kwargs=kwargs)  # the last mini-batch only: no old states kept alive
            return update(*args, **kwargs)

        trainer.update = recording_update  # an instance attribute: read before the run's parts
        try:
            trainer.iteration(0)  # compiles
            iteration_times = []
            for it in range(1, iterations):
                start = time.perf_counter()
                trainer.iteration(it)
                iteration_times.append(time.perf_counter() - start)
            if not last_call:
                raise RuntimeError("overheads: the trainer ran its iterations without calling `trainer.update`; "
                                   "the benchmark no longer sees the step it times")
            lp = trainer.last_logprobs
            args, kwargs = last_call["args"], last_call["kwargs"]
            state, rest = trainer.state, args[1:]  # the step donated (deleted) the state it was given
            steps_per_iteration = run.train.minibatches_per_iteration

            def measure():
                out = mismatch.summarize(mismatch.mismatch_metrics(lp["sampler_logprobs"], lp["trainer_logprobs"],
                                                                    lp["response_mask"]))
                return out

            # The run's step function may carry the run's shardings (fixed to its state's structure): time one
            # built the same way from the same loss, optimizer and policy, for both loss-scale states.
            plain_step = make_train_step(trainer._loss_fn, trainer.optimizer, trainer.policy,
                                         max_grad_norm=run.optim.max_grad_norm,
                                         num_microbatches=run.train.microbatches)

            def timed_step(s):
                def call():
                    new_state, metrics = plain_step(s, *rest, **kwargs)
                    float(metrics["loss"])

                return call

            noop_state = state.replace(loss_scale=NoOpLossScale())
            for fn in (measure, timed_step(state), timed_step(noop_state)):
                fn()  # compile
            t = interleaved_median({"mismatch": measure, "dynamic": timed_step(state),
                                    "noop": timed_step(noop_state)}, repeats)
        finally:
            trainer.close()
    iteration = statistics.median(iteration_times)
    scaling = steps_per_iteration * (t["dynamic"] - t["noop"])
    overhead = t["mismatch"] + scaling
    log.info("overheads: iteration %.4f s, mismatch %.5f s, loss scaling %.5f s (%d steps: %.5f vs %.5f s)",
             iteration, t["mismatch"], scaling, steps_per_iteration, t["dynamic"], t["noop"])
    note = (f"mismatch metrics {t['mismatch'] * 1e3:.2f} ms, loss scaling {scaling * 1e3:.2f} ms "
            f"({steps_per_iteration} steps), iteration {iteration * 1e3:.0f} ms")
    ratio = (iteration - overhead) / iteration
    return [Comparison(name="mismatch measurement + loss scaling, share of an RL iteration (tiny FP16 run)",
                       ours=overhead, peer=iteration, unit="s", ratio=ratio, target=0.95, met=ratio >= 0.95,
                       peer_name="the iteration's wall time", check="the trainer's own mini-batches and log-probs",
                       note=note)]


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    print(run_overheads(os.path.join("configs", "tiny_fp16.yaml"), iterations=4, repeats=10))
