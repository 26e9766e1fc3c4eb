"""The ``distillery`` command: argument parsing only; every command calls into the package.

    distillery run                        # the main job on the default recipe
    distillery train --role teacher       # train the teacher (or --role student: the student alone)
    distillery distill --teacher runs/fmnist/teacher/checkpoint.pt
    distillery eval runs/fmnist/student_distilled/checkpoint.pt
    distillery bench --quick              # what distillation costs over training the student alone
    distillery reproduce hinton --budget quick --seeds 3   # a paper's experiments, report.md + plots

Bad input (a config key, a value, a file) exits with code 2 and a message saying what and where.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from distillery.config import ConfigError, RunConfig, load_config

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="YAML",
                        help="recipe file (default: the shipped recipe distillery/recipes/fmnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.stages.0.method.temperature=8 "
                             "(repeatable; values are parsed as YAML)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue unfinished runs from their checkpoints (finished ones are always reused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move aside an output folder that holds a run of other settings, and start again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description="Knowledge distillation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: teacher, student alone, student distilled, one table",
                       description="Train (or reuse) the teacher, train the student alone and distilled, "
                                   "evaluate all three and write report.md, results.json and "
                                   "learning_curves.png under <output_dir>/<name>/.")
    _add_config_options(p)
    _add_run_options(p)

    p = sub.add_parser("train", help="train the teacher, or the student alone",
                       description="Train one network with cross-entropy into <output_dir>/<name>/<role>/.")
    _add_config_options(p)
    _add_run_options(p)
    p.add_argument("--role", choices=("teacher", "student"), default="teacher",
                   help="teacher: teacher.model with teacher.train; student: student.model alone with student.train")

    p = sub.add_parser("distill", help="train the student from a teacher checkpoint",
                       description="Distil student.model through distill.stages into "
                                   "<output_dir>/<name>/student_distilled/.")
    _add_config_options(p)
    _add_run_options(p)
    p.add_argument("--teacher", metavar="CHECKPOINT", nargs="+",
                   help="teacher checkpoint (distillery checkpoint or state_dict); several make an ensemble teacher "
                        "(method ensemble). Default: teacher.checkpoint, else the teacher trained in this run's "
                        "folder (for tfkd_self: the student trained alone there)")
    p.add_argument("--method", metavar="NAME",
                   help="run this method's default stages with default parameters (two stages for fsp and "
                        "fitnets); see `distillery methods`")
    p.add_argument("--generations", type=int, metavar="N",
                   help="repeat the distillation N times, each student teaching the next (tfkd_self)")

    p = sub.add_parser("eval", help="evaluate checkpoints on the test set",
                       description="Top-1 accuracy and loss of each checkpoint on the configured test set; with "
                                   "--ensemble also of the ensemble averaging their probabilities.")
    _add_config_options(p)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="distillery checkpoint files")
    p.add_argument("--ensemble", action="store_true",
                   help="evaluate the ensemble of the checkpoints (averaged probabilities) and each member")

    p = sub.add_parser("bench", help="measure what distillation costs over training the student alone",
                       description="Time student CE alone, a hand-written KD loop, our KD (teacher on the fly "
                                   "and cached), FSP stage 1 (on the fly and stored) and evaluation on a fixed "
                                   "Fashion-MNIST workload; print one table and write it as markdown + JSON.")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="timed steps per row, in rounds of 5 after a warm-up round (default 60: 12 paired rounds; "
                        "--quick: 5)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (5 steps per row)")
    p.add_argument("--output", default="runs/bench", metavar="DIR",
                   help="folder for bench-<date>.md and .json (default runs/bench)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder with the Fashion-MNIST idx files")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per row (default: one per core)")

    p = sub.add_parser("reproduce", help="rerun a paper's experiments over several seeds, with statistics",
                       description="Train every setting of one paper's experiments for each seed (finished runs are "
                                   "reused, unfinished ones continued), then write report.md (mean ± std, paired 95 % "
                                   "intervals against the baselines, the paper's claims) and PNG plots into --out. "
                                   "See docs/reproduce.md.")
    p.add_argument("experiment", metavar="EXPERIMENT", help="hinton (Hinton et al. 2015), fsp (Yim et al. 2017) or "
                                                            "tfkd (Yuan et al. 2020)")
    p.add_argument("--budget", default="quick",
                   help="quick (default: small models and data subsets, about an hour or less on 2 CPU cores for 3 "
                        "seeds) or full (the same code at paper-like scale, for a GPU)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 (default 3)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/reproduce/<experiment>-<budget>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, seeds, estimated minutes) and stop")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder with the Fashion-MNIST idx files")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 lets two experiments share 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sub.add_parser("models", help="list the registered model names")
    sub.add_parser("methods", help="list the distillation methods and their parameters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from distillery.train import NonFiniteLossError, TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            print(_rank_prefix() + str(err), file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(err, NonFiniteLossError):
            print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        if isinstance(err, (ConfigError, ValueError, FileNotFoundError)):
            print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


def _rank_prefix() -> str:
    """``[rank N] `` in a torchrun process other than rank 0, so repeated messages can be told apart."""
    import os

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if world != "1" and rank != "0" else ""


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> RunConfig:
    """The config file, then ``--method``'s stages, then the ``--set`` overrides, then other flags.

    ``--set distill.stages.0.method.temperature=8`` thus tunes the stages ``--method`` chose.
    """
    first = []
    if getattr(args, "method", None):
        first.append("distill.stages=" + json.dumps(_default_stages(args)))
    return load_config(args.config, [*first, *args.overrides, *extra])


def _dispatch(args: argparse.Namespace) -> int:

    if args.command == "models":
        from distillery.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.command == "methods":
        from distillery.methods import METHODS

        for name, cls in sorted(METHODS.items()):
            fields = ", ".join(f"{k}={f.get_default(call_default_factory=True)!r}"
                               for k, f in cls.Params.model_fields.items())
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            stages = [stage["method"]["name"] for stage in cls.default_stages()]
            print(f"{name}: {summary}" + (f"\n    {fields}" if fields else "")
                  + (f"\n    --method {name} runs the stages {' → '.join(stages)}" if len(stages) > 1 else ""))
        return 0

    if args.command == "bench":
        from distillery.bench import run_bench

        steps = args.steps if args.steps is not None else (5 if args.quick else 60)
        if steps < 1 or (args.threads is not None and args.threads < 1):
            raise ConfigError(f"--steps and --threads must be >= 1, got {steps} and {args.threads}")
        _, markdown, path = run_bench(steps, args.output, args.data_root, args.threads,
                                      echo=lambda line: print(line, file=sys.stderr))
        print(markdown)
        print(f"written: {path} and {path.with_suffix('.json')}")
        return 0

    if args.command == "reproduce":
        from distillery.reproduce import Env, get_experiment, run_experiment
        from distillery.train import resolve_device

        experiment = get_experiment(args.experiment)
        resolve_device(args.device)  # an unusable device fails before any planning
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        out = args.out or f"runs/reproduce/{args.experiment}-{args.budget}"
        run_experiment(experiment, args.budget, args.seeds, out, env=Env(args.device, args.data_root),
                       dry_run=args.dry_run, progress=not args.no_progress)
        return 0

    extra = []
    if getattr(args, "teacher", None):
        extra.append(f"teacher.checkpoint={json.dumps(args.teacher[0])}")
        extra.append(f"teacher.ensemble={json.dumps(args.teacher[1:])}")
    if getattr(args, "generations", None) is not None:
        extra.append(f"distill.generations={args.generations}")
    config = _config(args, extra)
    progress = not args.no_progress
    if args.command == "eval":
        return _eval(config, args.checkpoints, args.ensemble)
    from distillery.train import distributed

    # Distributed: under torchrun every process joins the group here (gloo on CPU, nccl on CUDA);
    # all train, rank 0 alone prints and writes.
    with distributed.session(config.device) as ctx:
        return _train_commands(args, config, progress, ctx.is_main)


def _train_commands(args: argparse.Namespace, config: RunConfig, progress: bool, is_main: bool) -> int:
    from distillery import pipeline

    data = pipeline.load_data(config)
    common = {"progress": progress, "resume": args.resume, "overwrite": args.overwrite}
    if args.command == "run":
        result = pipeline.run_main_job(config, **common)
        if result is None:  # not rank 0
            return 0
        print(result.table_text)
        print(f"distilled minus alone: {100 * result.gain:+.2f} points")
        print(f"report: {result.report_path}\nplot:   {result.plot_path}")
        return 0
    if args.command == "train":
        if args.role == "teacher":
            trained, _ = pipeline.get_teacher(config, data, **common)
        else:
            trained = pipeline.train_student_alone(config, data, **common)
    else:
        teacher, key = None, ""
        if pipeline.teaches_itself(config) and not args.teacher:
            teacher = pipeline.train_student_alone(config, data, **common)
            key = pipeline.run_key(teacher)
        elif pipeline.needs_teacher(config):
            if not config.teacher.checkpoint:
                default = pipeline.Path(config.output_dir) / config.name / "teacher" / "checkpoint.pt"
                if not default.exists():
                    raise ConfigError(f"distill needs a teacher: pass --teacher CHECKPOINT, set teacher.checkpoint, "
                                      f"or train one first with `distillery train --role teacher` (looked for "
                                      f"{default})")
                config.teacher.checkpoint = str(default)
            teacher, key = pipeline.get_teacher(config, data, **common)
        trained = pipeline.distill_student(config, data, teacher, key, **common)
    final = trained.history[-1] if trained.history else {}
    if not is_main:
        return 0
    print(f"{trained.role}: test accuracy {100 * final.get('test_accuracy', float('nan')):.2f} %  "
          f"checkpoint {trained.run_dir / 'checkpoint.pt' if trained.run_dir else '-'}")
    return 0


def _default_stages(args: argparse.Namespace) -> list[dict]:
    """``--method NAME``: the method's default stages; a stage's partial ``train`` settings (e.g. a
    smaller stage-1 learning rate) are laid over the config's ``student.train``."""
    from distillery.methods import method_class

    stages = method_class(args.method).default_stages()
    if not any("train" in stage for stage in stages):
        return stages
    plain = [{k: v for k, v in stage.items() if k != "train"} for stage in stages]
    config = load_config(args.config, ["distill.stages=" + json.dumps(plain), *args.overrides])
    base = config.student.train.model_dump(mode="json")
    return [{**stage, "train": _merged(base, stage["train"])} if "train" in stage else stage for stage in stages]


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _eval(config: RunConfig, checkpoints: Sequence[str], ensemble: bool = False) -> int:
    from distillery import pipeline
    from distillery.train import evaluate, evaluate_ensemble, resolve_device

    _, test = pipeline.load_data(config)
    device = resolve_device(config.device)
    trusted = {config.teacher.model.name, config.student.model.name}
    models = []
    for path in checkpoints:
        model, spec = pipeline.load_trained_model(path, None, test, trusted_models=trusted)
        models.append((path, spec, model.to(device)))
    if not ensemble:
        for path, spec, model in models:
            metrics = evaluate(model, test, config.data.eval_batch_size, device)
            print(f"{path}: {spec.name} test accuracy {100 * metrics['accuracy']:.2f} %  loss {metrics['loss']:.4f}")
        return 0
    result = evaluate_ensemble([m for _, _, m in models], test, config.data.eval_batch_size, device)
    for (path, spec, _), metrics in zip(models, result["members"]):
        print(f"{path}: {spec.name} test accuracy {100 * metrics['accuracy']:.2f} %  loss {metrics['loss']:.4f}")
    metrics = result["ensemble"]
    print(f"ensemble of {len(models)} (averaged probabilities): test accuracy {100 * metrics['accuracy']:.2f} %  "
          f"loss {metrics['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
