"""`jaxrl-fp16` command line: each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jaxrl_fp16  # noqa: F401  (sets XLA flags before JAX starts)

DEFAULT_SHARP = 8.0


def _make_tiny(args: argparse.Namespace) -> int:
    from jaxrl_fp16.models.tiny import make_tiny

    path = make_tiny(args.out, args.arch, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                     intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                     num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                     tie_word_embeddings=not args.untied, max_position_embeddings=args.max_position_embeddings,
                     sharp=args.sharp, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny {args.arch} model to {path}")
    return 0


def _mismatch(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import analysis
    from jaxrl_fp16.models.config import ModelConfig, Numerics
    from jaxrl_fp16.models.hf import load_hf_params
    from jaxrl_fp16.outputs import ensure_writable_dir
    from jaxrl_fp16.precision import parse_dtype
    from jaxrl_fp16.sampling import SAMPLERS, SamplingSettings, check_dtypes_agree, create_sampler, \
        validate_prompts
    from jaxrl_fp16.scoring import Scorer

    # Everything that can be wrong with the request is checked before any model is loaded or engine started.
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes:
        raise ValueError("--dtype needs at least one dtype")
    sampler_dtypes = [parse_dtype(d) for d in dtypes]
    trainer_dtypes = [parse_dtype(args.trainer_dtype) if args.trainer_dtype else d for d in sampler_dtypes]
    for s, t in zip(sampler_dtypes, trainer_dtypes):
        check_dtypes_agree(s, t, args.allow_dtype_mismatch)
    numerics = Numerics.from_overrides(args.fp32_ops or [])
    ensure_writable_dir(args.out)
    cfg = ModelConfig.from_hf_dir(args.model)
    if args.prompts:
        prompts = analysis.load_prompts(args.prompts, args.model)
    elif args.num_prompts and args.prompt_len:
        specials = [t for t in (*cfg.eos_token_ids, cfg.pad_token_id, cfg.bos_token_id) if t is not None]
        prompts = analysis.random_prompts(args.num_prompts, args.prompt_len, cfg.vocab_size, specials, args.seed)
    else:
        raise ValueError("give prompts: --prompts FILE, or --num-prompts N with --prompt-len L")
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples_per_prompt,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed)
    prompts = validate_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings, settings.max_new_tokens)

    _, params = load_hf_params(args.model, cfg, allow_nonfinite=args.allow_nonfinite)
    summaries = []
    for s_dtype, t_dtype in zip(sampler_dtypes, trainer_dtypes):
        out = args.out if len(dtypes) == 1 else os.path.join(args.out, str(s_dtype))
        sampler = create_sampler(args.sampler, cfg=cfg, params=params, model_dir=args.model, dtype=s_dtype,
                                 trainer_dtype=t_dtype, allow_dtype_mismatch=args.allow_dtype_mismatch,
                                 numerics=numerics, seed=args.seed)
        try:
            scorer = Scorer(cfg, dtype=t_dtype, numerics=numerics)
            info = {"model": os.path.abspath(args.model), "sampler": args.sampler, "numerics_fp32_ops":
                    sorted(args.fp32_ops or [])}
            result = analysis.measure_mismatch(sampler, scorer, params, prompts, settings, info)
        finally:
            sampler.close()
        analysis.save_mismatch(result, out, plots=not args.no_plots)
        summaries.append(result.summary)
    table = analysis.format_table(summaries)
    print(table)
    if len(dtypes) > 1:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "table.json"), "w") as f:
            json.dump([analysis.json_safe(s) for s in summaries], f, indent=2)
    return 0


def _fp16_check(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import analysis
    from jaxrl_fp16.tools.fp16_check import fp16_readiness
    from jaxrl_fp16.models.hf import load_hf_params
    from jaxrl_fp16.outputs import ensure_writable_file
    from jaxrl_fp16.models.inference import left_pad
    from jaxrl_fp16.precision import parse_dtype

    dtype = parse_dtype(args.dtype)
    if args.out:
        ensure_writable_file(args.out)
    cfg, params = load_hf_params(args.model, allow_nonfinite=args.allow_nonfinite)
    if args.prompts:
        prompts = analysis.load_prompts(args.prompts, args.model)
    else:
        specials = [t for t in (*cfg.eos_token_ids, cfg.pad_token_id, cfg.bos_token_id) if t is not None]
        prompts = analysis.random_prompts(args.num_sequences, args.seq_len, cfg.vocab_size, specials, args.seed)
    too_long = [len(p) for p in prompts if len(p) > cfg.max_position_embeddings]
    if too_long:
        raise ValueError(f"a sequence has {too_long[0]} tokens, more than the context ({cfg.max_position_embeddings})")
    tokens, mask = left_pad(prompts, cfg.pad_token_id or 0)
    report = fp16_readiness(cfg, params, tokens, mask, dtype=dtype)
    print(report.to_markdown())
    print(report.summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report.to_json())
    return 0 if report.ok else 1


def _study(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import ensure_writable_dir
    from jaxrl_fp16.precision import parse_dtype
    from jaxrl_fp16.tools.study import run_study

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        parse_dtype(d)
    ensure_writable_dir(args.out)
    result = run_study(args.model, args.out, dtypes=dtypes, num_prompts=args.num_prompts,
                       prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                       samples_per_prompt=args.samples_per_prompt, seed=args.seed, temperature=args.temperature)
    with open(os.path.join(args.out, "study.md")) as f:
        print(f.read())
    del result
    return 0


def _sanity(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import ensure_writable_dir
    from jaxrl_fp16.tools.sanity import run_sanity

    ensure_writable_dir(args.out)
    report = run_sanity(args.out, quick=args.quick, sampler=args.sampler, overrides=args.overrides,
                        progress=not args.no_progress)
    print("\n".join(f"- {s}" for s in report["findings"]))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import ensure_writable_dir
    from jaxrl_fp16.tools.sweep import parse_formats, run_sweep

    formats = parse_formats(args.formats) if args.formats else None
    ensure_writable_dir(args.out)
    report = run_sweep(args.out, formats=formats, seeds=args.seeds, quick=args.quick,
                       long=(args.long or args.long_only) or None, main=not args.long_only,
                       overrides=args.overrides, progress=not args.no_progress)
    print("\n".join(f"- {s}" for s in report["findings"] + report["long_findings"]))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.rl.rundir import Interrupted, resume_options_from_args
    from jaxrl_fp16.rl.trainer import Trainer

    resume_options = resume_options_from_args(args)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.iterations={args.steps}")
    run = load_config(args.config, overrides)
    from jaxrl_fp16.tools.doctor import prepare_gpus

    prepare_gpus(run)  # GPU shares and debug.deterministic (XLA_FLAGS): before JAX starts its backends
    if run.distributed.enabled:  # several processes: before any JAX computation
        from jaxrl_fp16.sharding import initialize_distributed

        d = run.distributed
        initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    if _plan_wanted(args.plan, run):  # the memory plan first: before any file is written or weight read
        from jaxrl_fp16.tools.plan import plan_before_training

        plan_before_training(run)
    run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.export:  # before any training, and again when the export is written
        from jaxrl_fp16.outputs import check_output_dir

        check_output_dir(args.export, overwrite=args.overwrite, sources=[run_dir])
    trainer = Trainer(run, run_dir, resume=args.resume, resume_options=resume_options)
    try:
        history = trainer.run()
        if args.export:
            trainer.export(args.export, overwrite=args.overwrite)
    except Interrupted as e:  # SIGINT/SIGTERM: stopped at an iteration boundary, with a checkpoint
        print(f"jaxrl-fp16 train: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(f"iteration {last['step']}: accuracy {last['reward/accuracy']:.3f}, "
              f"mismatch kl_k3 {last['mismatch/kl_k3']:.2e}, skipped steps {last['skipped_steps']}; "
              f"run directory {run_dir}")
    return 0


def _plan_wanted(choice: str, run) -> bool:
    """`train --plan {auto,on,off}`: auto plans a model from `model.path` of PLAN_MIN_PARAMS parameters or more."""
    if choice != "auto":
        return choice == "on"
    from jaxrl_fp16.tools.plan import PLAN_MIN_PARAMS, model_config

    if run.model.path is None or not os.path.isfile(os.path.join(run.model.path, "config.json")):
        return False  # the built-in tiny model, or a folder the trainer reports on
    return model_config(run).num_params() >= PLAN_MIN_PARAMS


def _plan(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import plan

    return plan.main(args.config, args.overrides, num_devices=args.num_devices, device_gib=args.device_memory_gib,
                     json_path=args.json)


def _doctor(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import doctor

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):  # no config, overrides only
        config, overrides = None, [config, *overrides]
    return doctor.main(config, overrides, json_path=args.json)


def _dpo(args: argparse.Namespace) -> int:
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.rl.dpo_trainer import DPOTrainer
    from jaxrl_fp16.rl.rundir import Interrupted, resume_options_from_args

    resume_options = resume_options_from_args(args)
    config, overrides = args.config, list(args.overrides)
    if args.config_option is not None:
        if config is not None and "=" not in config:
            raise ValueError(f"two configs given ({config} and --config {args.config_option}); give one")
        if config is not None:  # with --config, the first positional word is an override
            overrides.insert(0, config)
        config = args.config_option
    if config is None:
        raise ValueError("give a run config: jaxrl-fp16 dpo CONFIG (or --config CONFIG)")
    if args.steps is not None:
        overrides.append(f"dpo.steps={args.steps}")
    run = load_config(config, overrides)
    from jaxrl_fp16.tools.doctor import prepare_determinism

    prepare_determinism(run)  # debug.deterministic: XLA's flag, before JAX starts its backends
    run_dir = args.run_dir or os.path.join("runs", "dpo_" + os.path.splitext(os.path.basename(config))[0])
    trainer = DPOTrainer(run, run_dir, resume=args.resume, resume_options=resume_options)
    try:
        summary = trainer.run()
    except Interrupted as e:  # SIGINT/SIGTERM: stopped at a step boundary, with a checkpoint
        print(f"jaxrl-fp16 dpo: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        trainer.close()
    start, end = summary["start"], summary["end"]
    first = f"{start['eval/accuracy']:.3f} -> " if start else ""
    print(f"step {summary['steps']}: held-out preference accuracy {first}{end['eval/accuracy']:.3f}, "
          f"margin {end['eval/margin']:.3f}, skipped steps {summary['skipped_steps']}; run directory {run_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import check_output_dir
    from jaxrl_fp16.rl.trainer import export_checkpoint

    check_output_dir(args.out, overwrite=args.overwrite, sources=[args.run_dir])  # before any checkpoint is read
    it = export_checkpoint(args.run_dir, args.out, iteration=args.iteration, dtype=args.dtype,
                           overwrite=args.overwrite)
    print(f"exported iteration {it} of {args.run_dir} to {args.out} ({args.dtype})")
    return 0


def _sft(args: argparse.Namespace) -> int:
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.outputs import atomic_dir, check_output_dir
    from jaxrl_fp16.rl.sft import ensure_base_model, run_sft

    run = load_config(args.config, args.overrides)
    from jaxrl_fp16.tools.doctor import prepare_determinism

    prepare_determinism(run)  # debug.deterministic: XLA's flag, before JAX starts its backends
    if run.model.path is not None and not args.out:
        raise ValueError("with model.path set, give --out for the warm-started model")
    sources = [run.model.path] if run.model.path is not None else []
    if args.out:  # before any training
        check_output_dir(args.out, overwrite=args.overwrite, sources=sources)
    if run.model.path is None:
        path = ensure_base_model(run)
        if args.out:
            import shutil

            with atomic_dir(args.out, overwrite=args.overwrite, sources=[path]) as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
            path = args.out
    else:
        run_sft(run.model.path, run.task.build(), run.model.warm_start,
                args.out, progress=run.log.progress, overwrite=args.overwrite)
        path = args.out
    print(f"warm-started model: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-fp16", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write a tiny random Hugging Face model with a tokenizer")
    p.add_argument("out", help="output directory: new, empty, or written by jaxrl-fp16 before (then replaced "
                   "atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16 (a folder "
                        "holding other files is always refused)")
    p.add_argument("--arch", choices=("qwen2", "qwen3", "llama"), default="qwen2")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied embeddings)")
    p.add_argument("--sharp", type=float, nargs="?", const=DEFAULT_SHARP, default=None, metavar="SCALE",
                   help=f"peaked output distributions: logits scaled by SCALE (default {DEFAULT_SHARP}); "
                        "mismatch is only visible when outputs are sharp")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("mismatch", help="offline sampler-vs-trainer mismatch analysis (the paper's)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--sampler", default="jax", help="jax (built in), vllm or transformers")
    p.add_argument("--dtype", required=True,
                   help="sampler dtype: float16|bfloat16|float32, or a comma list to compare in one call")
    p.add_argument("--trainer-dtype", default=None, help="trainer compute dtype (default: the sampler's)")
    p.add_argument("--allow-dtype-mismatch", action="store_true",
                   help="allow sampler and trainer dtypes that differ (for studying it)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--prompts", default=None, help="file: JSON lines of token-id lists, or text lines")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--fp32-ops", nargs="*", default=None, metavar="OP",
                   help="op classes to run in FP32 in both engines' JAX code (norm, softmax, attn_scores, "
                        "lm_head, rope, residual)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf weights (refused by default)")
    p.set_defaults(func=_mismatch)

    p = sub.add_parser("fp16-check", help="FP16 readiness report of a checkpoint (activation/weight range)")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--dtype", default="float16", help="the low-precision dtype to check (default float16)")
    p.add_argument("--prompts", default=None, help="file of prompts (text lines or JSON token-id lists)")
    p.add_argument("--num-sequences", type=int, default=4, help="random sequences when no --prompts")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf weights (refused by default)")
    p.set_defaults(func=_fp16_check)

    p = sub.add_parser("study", help="where the mismatch comes from: per-layer drift of the two paths, op-class "
                       "overrides, mismatch vs response length")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--dtype", default="bfloat16,float16", help="comma list of compute dtypes to study")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (study.md, study.json, PNG plots)")
    p.set_defaults(func=_study)

    p = sub.add_parser("sanity", help="the paper's sanity experiment in miniature: FP16 vs BF16 RL, with a report")
    p.add_argument("--quick", action="store_true", help="GRPO in FP16 and BF16 only (minutes on 2 CPU cores); "
                   "without it: FP32 plus every algorithm in both precisions (about an hour)")
    p.add_argument("--sampler", default="jax", choices=("jax", "vllm", "transformers"))
    p.add_argument("--out", default="runs/sanity", help="output directory (report.md, plots, one folder per arm)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every arm")
    p.set_defaults(func=_sanity)

    p = sub.add_parser("sweep", help="the sanity RL run once per float format (real dtypes and emulated eXmY) and "
                       "seed: mismatch and training accuracy against mantissa bits, with a report")
    p.add_argument("--quick", action="store_true", help="10 formats, 1 seed, 30 iterations (about 20 minutes on 2 "
                   "idle CPU cores); without it: 15 formats, 3 seeds, 60 iterations and the long-response arm")
    p.add_argument("--formats", default=None, help="comma list: float32, bfloat16, float16 (real dtypes) or eXmY "
                   "(emulated, e.g. e8m3,e5m10)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 1 with --quick, else 3)")
    p.add_argument("--long", action="store_true", help="also the long-response arm (FP16 and BF16)")
    p.add_argument("--long-only", action="store_true", help="the long-response arm alone")
    p.add_argument("--out", default="runs/sweep", help="output directory (sweep.json, report.md, plots, one "
                   "folder per run; an existing one is resumed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every run")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("train", help="RL training from a YAML run config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.algorithm=gspo")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="number of RL iterations (train.iterations)")
    from jaxrl_fp16.rl.rundir import add_resume_arguments

    add_resume_arguments(p)
    p.add_argument("--export", default=None, metavar="DIR", help="also export the final policy to DIR (HF)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --export replace an existing Hugging Face model folder not written by jaxrl-fp16 (a "
                        "folder holding other files is always refused)")
    p.add_argument("--plan", choices=("auto", "on", "off"), default="auto",
                   help="compile the memory plan first and stop (exit 3) when the run does not fit; auto: for a "
                        "model.path of 50M+ parameters (see jaxrl-fp16 plan)")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="per-device memory of a run, from XLA's ahead-of-time compile of the update "
                       "step and the scorer (config.json only, no weights); exit 3 when it does not fit")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.microbatches=64")
    p.add_argument("--num-devices", type=int, default=None,
                   help="devices of the host (default: those present; others are simulated on the CPU)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory of each device (default: the devices'; on a CPU host the host RAM); given on a "
                        "CPU host, the plan is for a GPU")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(func=_plan)

    p = sub.add_parser("dpo", help="offline preference optimisation (DPO) from a YAML run config")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (see configs/dpo/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dpo.beta=0.5")
    p.add_argument("--config", dest="config_option", default=None, metavar="CONFIG",
                   help="the run config, as an option")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/dpo_<config name>)")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps (dpo.steps)")
    add_resume_arguments(p)
    p.set_defaults(func=_dpo)

    p = sub.add_parser("doctor", help="this host's backend, devices, memory and versions; with a run config, the "
                       "GPU memory split between JAX and vLLM and what is missing (exit 1)")
    p.add_argument("config", nargs="?", default=None, help="YAML run config to check (optional)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampler.name=vllm")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face directory")
    p.add_argument("run_dir", help="a run directory (with config.yaml and checkpoints/)")
    p.add_argument("out", help="output Hugging Face directory: new, empty, or an earlier export (written "
                   "atomically); never the run directory or the working folder")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16 (a folder "
                        "holding other files is always refused)")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint (default: the latest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=_export)

    p = sub.add_parser("sft", help="supervised warm start on a task's reference responses")
    p.add_argument("config", help="YAML run config (model, task and model.warm_start sections are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--out", default=None, help="output Hugging Face directory: new, empty, or written by "
                   "jaxrl-fp16 before")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16")
    p.set_defaults(func=_sft)
    for p in sub.choices.values():  # --debug also after the subcommand
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    return parser


# Failures a user can cause and fix (bad input, missing or unwritable files, a full disk): one line, exit 2.
EXPECTED_ERRORS = (ValueError, OSError)
DEBUG_ENV = "JAXRL_FP16_DEBUG"


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _leave(code: int) -> int:
    """A process of several that fails exits at once with `code`: JAX's shutdown at exit would wait (minutes) at a
    barrier for the others, which wait in a collective for this one; its exit lets them fail too."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere after the config, also after options.
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if _debug_requested(args):  # tracebacks as they are
        return args.func(args)
    prefix = f"jaxrl-fp16 {args.command}: error:"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"jaxrl-fp16 {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        print(f"{prefix} {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return _leave(getattr(e, "exit_code", 2))  # 3: the run does not fit its devices (memory.DoesNotFitError)
    except Exception as e:  # a defect, not the user's input: still one line, and how to see where it came from
        print(f"{prefix} unexpected {type(e).__name__}: {_one_line(e)} (run with --debug or {DEBUG_ENV}=1 for the "
              f"traceback)", file=sys.stderr)
        return _leave(1)


if __name__ == "__main__":
    sys.exit(main())
