"""The ``distillery`` command: argument parsing only; every command calls into the package.

    distillery run                        # the main job on the default recipe
    distillery train --role teacher       # train the teacher (or --role student: the student alone)
    distillery distill --teacher runs/fmnist/teacher/checkpoint.pt
    distillery eval runs/fmnist/student_distilled/checkpoint.pt
    distillery bench --quick              # what distillation costs over training the student alone
    distillery reproduce hinton --budget quick --seeds 3   # a paper's experiments, report.md + plots
    distillery tune --method hinton --n-trials 20 --workers 2   # search a method's parameters, then confirm
    distillery compare --seeds 3          # every method against the student alone, with intervals

Bad input (a config key, a value, a file) exits with code 2 and a message saying what and where.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from distillery.config import ConfigError
from distillery.recipe import RunConfig, load_config, method_default_stages

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3
EXIT_INTERNAL = 1


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="YAML",
                        help="recipe file (default: the shipped recipe distillery/recipes/fmnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.stages.0.method.temperature=8 "
                             "(repeatable; values are parsed as YAML)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--allow-code", dest="allow_code", action="append", default=[], metavar="PACKAGE",
                        help="allow a config to import and call models (or datasets) from this package, as "
                             "'PACKAGE.module:callable' (repeatable; or list them as allow_code in "
                             "~/.config/distillery/settings.yaml). Without it no code named in a config runs")


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

    _add_other_commands(sub)
    _add_search_commands(sub)
    return parser


def _add_search_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search a method's parameters for the teacher and student, then confirm them",
                       description="Train (or reuse) the teacher once, then search the distillation stages' "
                                   "parameters with Optuna (TPE, seeded), each trial scored on a stratified "
                                   "validation split of the training data and stopped early when behind; confirm the "
                                   "best against the student alone with several seeds on the test split. Writes "
                                   "report.md, results.json, plots and best.yaml (a recipe for `distillery distill "
                                   "--config`) into <output_dir>/<name>/tune-<method>/. Narrow or fix the search in "
                                   "the recipe's tune section or with --set tune.space.temperature.high=8, "
                                   "--set tune.fixed.kd_weight=0.5.")
    _add_config_options(p)
    p.add_argument("--method", metavar="NAME", help="tune this method's default stages (default: the recipe's)")
    _add_teacher_option(p)
    p.add_argument("--n-trials", type=int, metavar="N",
                   help="completed + stopped trials in all (tune.n_trials, default 20); a rerun continues to N")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="K processes searching one study (default 1)")
    p.add_argument("--storage", metavar="URL", help="an Optuna storage URL (tune.storage; default: a SQLite file "
                                                    "study.db in the tune folder)")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds of the confirmation (tune.confirm_seeds, default 3; "
                                                          "0 skips it)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the study again when its settings changed (and move aside runs of other settings)")

    p = sub.add_parser("compare", help="compare distillation methods against the student alone over seeds",
                       description="Train (or reuse) the teacher once, then the student alone and each method's "
                                   "student with every seed; report each method's test accuracy, its paired "
                                   "difference to the student alone with a 95 % interval, and its agreement and KL "
                                   "with the teacher. Writes report.md, results.json and forest.png.")
    _add_config_options(p)
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods with their default stages (default: every method that applies to the pair)")
    p.add_argument("--tuned", nargs="+", default=[], metavar="YAML",
                   help="recipes whose stages run beside the methods' defaults (a tune run's best.yaml)")
    p.add_argument("--method-set", dest="method_sets", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="override a key for one method only, e.g. fsp:distill.stages.0.train.epochs=5 (repeatable)")
    _add_teacher_option(p)
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds from the recipe's seed on (default 3)")
    p.add_argument("--out", metavar="DIR", help="output folder (default <output_dir>/<name>/compare)")
    p.add_argument("--overwrite", action="store_true", help="move aside run folders that hold runs of other settings")


def _add_teacher_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", metavar="CHECKPOINT", nargs="+",
                        help="a trained teacher checkpoint instead of training the recipe's (several: an ensemble, "
                             "for method ensemble)")


def _add_other_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained student alone: ONNX, safetensors or TorchScript (verified)",
                       description="Export the network of a checkpoint (never a teacher or a method's parts), "
                                   "verified against PyTorch on up to 1,000 test inputs; --int8 also writes an int8 "
                                   "ONNX copy calibrated on training inputs and measures its test accuracy.")
    _add_config_options(p)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a distillery checkpoint (checkpoint.pt)")
    p.add_argument("--format", default="onnx", choices=("onnx", "safetensors", "torchscript"))
    p.add_argument("--output", metavar="PATH", help="the file to write (default: beside the checkpoint)")
    p.add_argument("--int8", nargs="?", const="auto", choices=("auto", "dynamic", "static"),
                   help="also quantise the ONNX export to int8 (auto: static with calibration)")

    p = sub.add_parser("eval", help="evaluate checkpoints on the test set",
                       description="Top-1 accuracy and loss of each checkpoint on the configured test set; with "
                                   "--ensemble also of the ensemble averaging their probabilities.")
    _add_config_options(p)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="distillery checkpoint files")
    p.add_argument("--ensemble", action="store_true",
                   help="evaluate the ensemble of the checkpoints (averaged probabilities) and each member")

    p = sub.add_parser("bench", help="measure what distillation costs over training the student alone",
                       description="Time student CE alone, a hand-written KD loop, our KD (teacher on the fly "
                                   "and cached), FSP stage 1 (on the fly and stored), augmented KD on the teacher "
                                   "store and evaluation on a fixed Fashion-MNIST workload, and a 20-trial tune "
                                   "with augmentation against the student alone; print one table and write it as "
                                   "markdown + JSON.")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="timed steps per row, in rounds of 5 after a warm-up round (default 60: 12 paired rounds; "
                        "--quick: 5)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (5 steps per row, a 3-trial tune)")
    p.add_argument("--no-tune", action="store_true", help="leave out the wall-clock tune row (about 2 min)")
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
    p.add_argument("experiment", metavar="EXPERIMENT", help="hinton (Hinton et al. 2015), fsp (Yim et al. 2017), "
                                                            "tfkd (Yuan et al. 2020) or little_data (Hinton et al. "
                                                            "2015, section 6: soft targets with little data)")
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

    sub.add_parser("models", help="list the registered models with their options and sizes")
    sub.add_parser("methods", help="list the distillation methods with their formulas and parameters")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():  # restores Python's own display when the command returns
            if not debug:
                warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `distillery methods | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    except Exception as err:
        return _report_error(err, debug)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """One line, ``warning: <message>``, instead of Python's ``file:line: Category`` and the source
    line that raised it (``--debug`` keeps Python's form)."""
    print(f"{_rank_prefix()}warning: {message}", file=file or sys.stderr)


def _report_error(err: Exception, debug: bool) -> int:
    """Exit codes: 130 interrupted, 3 diverged, 2 bad input (config, file, data), 1 anything else;
    never a raw traceback unless ``--debug``."""
    from distillery.train import NonFiniteLossError, TrainingInterrupted

    if debug:
        raise err
    if isinstance(err, TrainingInterrupted):
        print(_rank_prefix() + str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(err, NonFiniteLossError):
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    from distillery.deploy import ExportMismatchError
    from distillery.fsio import FolderBusyError

    if isinstance(err, (ConfigError, ValueError, OSError, ExportMismatchError, FolderBusyError)):
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{_rank_prefix()}error: {type(err).__name__}: {err}\n(an unexpected error; run again with --debug "
          "for the traceback, and please report it)", file=sys.stderr)
    return EXIT_INTERNAL


def _rank_prefix() -> str:
    """``[rank N] `` in a torchrun process other than rank 0, so repeated messages can be told apart."""
    import os

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if world != "1" and rank != "0" else ""


def _config(args: argparse.Namespace) -> RunConfig:
    """The config file, then ``--method``'s stages, then the ``--set`` overrides, then other flags.

    ``--set distill.stages.0.method.temperature=8`` thus tunes the stages ``--method`` chose.
    """
    first = [method_default_stages(args.method, args.config, args.overrides)] if getattr(args, "method", None) else []
    extra = _teacher_flags(args)
    if getattr(args, "generations", None) is not None:
        extra.append(f"distill.generations={args.generations}")
    return load_config(args.config, [*first, *args.overrides, *extra])


def _code_policy(args: argparse.Namespace):
    from distillery.models.registry import CodePolicy

    return CodePolicy.from_settings().union(CodePolicy.of(args.allow_code))


def _options(args: argparse.Namespace):
    from distillery.pipeline import JobOptions

    return JobOptions(resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False),
                      progress=not args.no_progress, allow_code=_code_policy(args))


# ---------------------------------------------------------------- one function per command


def cmd_models(args: argparse.Namespace) -> int:
    from distillery.models import describe_models

    print(describe_models())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from distillery.methods.catalogue import describe_methods

    print(describe_methods())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distillery.bench import run_bench
    from distillery.bench.tune_row import TRIALS

    steps = args.steps if args.steps is not None else (5 if args.quick else 60)
    if steps < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError(f"--steps and --threads must be >= 1, got {steps} and {args.threads}")
    tune_trials = None if args.no_tune else 3 if args.quick else TRIALS
    _, markdown, path = run_bench(steps, args.output, args.data_root, args.threads, tune_trials=tune_trials,
                                  echo=lambda line: print(line, file=sys.stderr))
    print(markdown)
    print(f"written: {path} and {path.with_suffix('.json')}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from distillery.pipeline import export_job

    result = export_job(_config(args), args.checkpoint, args.format, args.output, args.int8, _options(args))
    e = result.export
    print(f"{e.format}: {e.path} ({e.size_bytes:,} bytes), outputs match PyTorch on {e.samples_checked} test "
          f"inputs (largest difference {e.max_abs_diff:.2e}, tolerance {e.tolerance:.2e}); test accuracy "
          f"{100 * result.accuracy:.2f} %")
    if result.int8 is not None:
        print(f"int8 ({result.int8.mode}): {result.int8.path} ({result.int8.size_ratio:.2f}× smaller), test accuracy "
              f"{100 * result.int8_accuracy:.2f} % ({100 * (result.int8_accuracy - result.accuracy):+.2f} points)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distillery.pipeline import eval_job

    for row in eval_job(_config(args), args.checkpoints, args.ensemble, _options(args)):
        print(f"{row.path}: {row.model} test accuracy {100 * row.accuracy:.2f} %  loss {row.loss:.4f}")
    return 0


def _in_process_group(args: argparse.Namespace, job) -> int:
    """Run a training job; under torchrun every process joins the group here (gloo on CPU, nccl on
    CUDA): all train, rank 0 alone prints and writes."""
    from distillery.train import distributed

    config = _config(args)
    with distributed.session(config.device) as ctx:
        return job(config, ctx.is_main)


def cmd_run(args: argparse.Namespace) -> int:
    from distillery.pipeline import run_main_job

    def job(config: RunConfig, is_main: bool) -> int:
        result = run_main_job(config, _options(args))
        if result is None or not is_main:
            return 0
        print(result.table_text)
        print(f"distilled minus alone: {100 * result.gain:+.2f} points\n")
        if result.card is not None:
            print(result.card.text())
        print(f"report: {result.report_path}\nplot:   {result.plot_path}\ntotal time: {result.seconds:.0f} s")
        return 0

    return _in_process_group(args, job)


def cmd_train(args: argparse.Namespace) -> int:
    from distillery.pipeline import train_job

    return _in_process_group(args, lambda config, is_main: _print_trained(
        train_job(config, args.role, _options(args)), is_main))


def cmd_distill(args: argparse.Namespace) -> int:
    from distillery.pipeline import distill_job

    return _in_process_group(args, lambda config, is_main: _print_trained(distill_job(config, _options(args)),
                                                                          is_main))


def _teacher_flags(args: argparse.Namespace) -> list[str]:
    """``--teacher A [B ...]`` as ``teacher.checkpoint`` and ``teacher.ensemble`` overrides."""
    if not getattr(args, "teacher", None):
        return []
    return [f"teacher.checkpoint={json.dumps(args.teacher[0])}", f"teacher.ensemble={json.dumps(args.teacher[1:])}"]


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from distillery.tune.command import run_tune
    from distillery.tune.space import load_tune_recipe
    from distillery.tune.study import WorkerFailed

    flags = [f"tune.{key}={json.dumps(value)}" for key, value in (
        ("n_trials", args.n_trials), ("storage", args.storage), ("confirm_seeds", args.seeds)) if value is not None]
    config, tune = load_tune_recipe(args.config, [*args.overrides, *_teacher_flags(args), *flags], args.method)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from distillery instead
    try:
        result = run_tune(config, tune, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except WorkerFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    values = [f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in result.best_values.items()]
    print(f"best: {', '.join(values)}")
    if result.confirmation is not None:
        for comparison, settings in zip(result.confirmation.comparisons, ("best's", "recipe's"), strict=False):
            confirmed = comparison.results[0]
            print(f"confirmed on the test split over {len(comparison.seeds)} seeds: best minus alone (with the "
                  f"{settings} training settings) {confirmed.difference.mean:+.2f} points: {confirmed.outcome}")
        print(f"verdict: {result.confirmation.verdict}")
    print(f"recipe: {result.best_yaml}\nreport: {result.report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from distillery.compare import comparison_table, run_compare
    from distillery.tune.space import load_tune_recipe

    config, _ = load_tune_recipe(args.config, [*args.overrides, *_teacher_flags(args)])
    comparison, report = run_compare(config, methods=args.methods, tuned=args.tuned, method_sets=args.method_sets,
                                     seeds=args.seeds, out=args.out, overwrite=args.overwrite,
                                     progress=not args.no_progress)
    print(comparison_table(comparison))
    print(f"report: {report}")
    return 0


def _print_trained(trained, is_main: bool) -> int:
    if is_main:
        checkpoint = trained.run_dir / "checkpoint.pt" if trained.run_dir else "-"
        print(f"{trained.role}: test accuracy {100 * trained.test_accuracy:.2f} %  checkpoint {checkpoint}")
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "distill": cmd_distill, "eval": cmd_eval, "export": cmd_export,
            "bench": cmd_bench, "reproduce": cmd_reproduce, "models": cmd_models, "methods": cmd_methods,
            "tune": cmd_tune, "compare": cmd_compare}


if __name__ == "__main__":
    sys.exit(main())
