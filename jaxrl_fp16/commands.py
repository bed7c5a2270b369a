"""The `jaxrl-fp16` commands: one handler per subcommand (`cli.build_parser` routes to it), which takes the parsed
arguments, calls the library and returns the exit code.

The tools (`jaxrl_fp16.tools`) and the trainers are imported inside each handler, so that `jaxrl-fp16 --help`
stays fast and a command imports only what it needs (not the optional torch or vllm another command may use). The
GPU plan (`gpu_host`) is light and imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxrl_fp16.gpu_host import prepare_determinism, prepare_gpus

__all__ = ["make_tiny", "mismatch", "fp16_check", "study", "sanity", "sweep", "train", "plan_wanted", "plan",
           "doctor", "dpo", "export", "sft"]


def make_tiny(args: argparse.Namespace) -> int:
    from jaxrl_fp16.models import tiny

    path = tiny.make_tiny(args.out, args.arch, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                          intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                          tie_word_embeddings=not args.untied, max_position_embeddings=args.max_position_embeddings,
                          sharp=args.sharp, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny {args.arch} model to {path}")
    return 0


def mismatch(args: argparse.Namespace) -> int:
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


def fp16_check(args: argparse.Namespace) -> int:
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


def study(args: argparse.Namespace) -> int:
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


def sanity(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import ensure_writable_dir
    from jaxrl_fp16.tools.sanity import run_sanity

    ensure_writable_dir(args.out)
    report = run_sanity(args.out, quick=args.quick, sampler=args.sampler, overrides=args.overrides,
                        progress=not args.no_progress)
    print("\n".join(f"- {s}" for s in report["findings"]))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def sweep(args: argparse.Namespace) -> int:
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


def train(args: argparse.Namespace) -> int:
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.rl.rundir import Interrupted, resume_options_from_args
    from jaxrl_fp16.rl.trainer import Trainer

    resume_options = resume_options_from_args(args)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.iterations={args.steps}")
    run = load_config(args.config, overrides)
    prepare_gpus(run)  # GPU shares and debug.deterministic (XLA_FLAGS): before JAX starts its backends
    run.distributed.initialize()  # several processes (when enabled): before any JAX computation
    if plan_wanted(args.plan, run):  # the memory plan first: before any file is written or weight read
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


def plan_wanted(choice: str, run) -> bool:
    """`train --plan {auto,on,off}`: auto plans a model from `model.path` of PLAN_MIN_PARAMS parameters or more."""
    if choice != "auto":
        return choice == "on"
    from jaxrl_fp16.tools.plan import PLAN_MIN_PARAMS, model_config

    if run.model.path is None or not os.path.isfile(os.path.join(run.model.path, "config.json")):
        return False  # the built-in tiny model, or a folder the trainer reports on
    return model_config(run).num_params() >= PLAN_MIN_PARAMS


def plan(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import plan as memory_plan

    return memory_plan.main(args.config, args.overrides, num_devices=args.num_devices,
                            device_gib=args.device_memory_gib, json_path=args.json)


def doctor(args: argparse.Namespace) -> int:
    from jaxrl_fp16.tools import doctor as host_report

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):  # no config, overrides only
        config, overrides = None, [config, *overrides]
    return host_report.main(config, overrides, json_path=args.json)


def dpo(args: argparse.Namespace) -> int:
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


def export(args: argparse.Namespace) -> int:
    from jaxrl_fp16.outputs import check_output_dir
    from jaxrl_fp16.rl.trainer import export_checkpoint

    check_output_dir(args.out, overwrite=args.overwrite, sources=[args.run_dir])  # before any checkpoint is read
    it = export_checkpoint(args.run_dir, args.out, iteration=args.iteration, dtype=args.dtype,
                           overwrite=args.overwrite)
    print(f"exported iteration {it} of {args.run_dir} to {args.out} ({args.dtype})")
    return 0


def sft(args: argparse.Namespace) -> int:
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.outputs import atomic_dir, check_output_dir
    from jaxrl_fp16.rl.sft import ensure_base_model, run_sft

    run = load_config(args.config, args.overrides)
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
        run_sft(run.model.path, run.task.build(), run.model.warm_start, args.out, forward=run.model,
                progress=run.log.progress, overwrite=args.overwrite)
        path = args.out
    print(f"warm-started model: {path}")
    return 0
