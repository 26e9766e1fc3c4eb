"""The Optuna study of ``distillery tune``: its storage, the search in one or several processes, progress.

The study lives in an Optuna storage — by default a SQLite file in the tune folder — so a search
continues where it stopped: trials run until ``n_trials`` have completed or been stopped over
every invocation and worker. A trial left running by a killed process stops sending heartbeats
and is failed after a grace period, then repeated once with the same parameters; a trial a signal
interrupted is repeated at the next start (:func:`requeue_interrupted`). Runs are placed by key,
so a repeat continues the trial's checkpoint. ``--workers K`` starts K processes on one study;
each draws from its own TPE sampler (seed + worker), so only a one-worker search is reproducible
trial for trial.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from distillery.config import ConfigError, PrunerSetting, TuneConfig
from distillery.tune.objective import Objective

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose process died stops beating; after the grace period it is failed and repeated once.
HEARTBEAT_S, GRACE_S = 20, 60


class WorkerFailed(RuntimeError):
    """A ``--workers`` process stopped with an error (its own message was printed above)."""


@dataclass(frozen=True)
class StudyPlan:
    """Everything a process needs to open the search's study (picklable for the workers)."""

    url: str
    name: str
    tune: TuneConfig
    fingerprint: str


def storage_url(tune: TuneConfig, folder: Path) -> str:
    """``tune.storage``, else a SQLite file ``study.db`` in the tune folder."""
    return tune.storage or f"sqlite:///{(folder / 'study.db').resolve()}"


def make_pruner(setting: PrunerSetting) -> optuna.pruners.BasePruner:
    if setting.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=setting.startup_trials,
                                           n_warmup_steps=setting.warmup_epochs)
    if setting.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=setting.min_epochs,
                                                      reduction_factor=setting.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(plan: StudyPlan, worker: int = 0) -> optuna.Study:
    """The study of ``plan`` (created on first use); one made from other settings is refused."""
    engine = {"connect_args": {"timeout": 120}} if plan.url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # the heartbeat is marked experimental, though there since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(plan.url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    sampler = optuna.samplers.TPESampler(seed=plan.tune.seed + worker, n_startup_trials=plan.tune.startup_trials)
    study = optuna.create_study(storage=storage, study_name=plan.name, direction="maximize", sampler=sampler,
                                pruner=make_pruner(plan.tune.pruner), load_if_exists=True)
    made_from = study.user_attrs.get("fingerprint")
    if made_from is None:
        study.set_user_attr("fingerprint", plan.fingerprint)
    elif made_from != plan.fingerprint:
        raise ConfigError(f"study {plan.name!r} in {plan.url} was made from other settings (recipe, search space, "
                          "validation split, sampler or pruner); pass --overwrite to start it again, or give "
                          "another tune.folder or tune.storage")
    return study


def delete_study(plan: StudyPlan) -> None:
    """Remove the study of ``plan`` from its storage, if it is there (``--overwrite``)."""
    if plan.name in optuna.study.get_all_study_names(plan.url):
        optuna.delete_study(study_name=plan.name, storage=plan.url)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue once more the parameters of every trial a signal interrupted (not queued already): the
    repeat continues that trial's checkpoint. Returns how many were queued."""
    trials = study.get_trials(deepcopy=False)
    repeated = {t.user_attrs.get("repeat_of") for t in trials}
    lost = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
            and t.number not in repeated]
    for trial in lost:
        study.enqueue_trial(trial.params, user_attrs={"repeat_of": trial.number})
    return len(lost)


class Progress:
    """After each trial, one line: how it ended, how many are done and stopped, the best so far."""

    def __init__(self, n_trials: int, echo: Callable[[str], None]) -> None:
        self.n_trials, self.echo = n_trials, echo

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        stopped = sum(t.state == TrialState.PRUNED for t in trials)
        if trial.state == TrialState.COMPLETE:
            ended = f"{100 * trial.value:.2f} % validation accuracy"
        elif trial.state == TrialState.PRUNED:
            ended = "diverged" if "diverged" in trial.user_attrs else f"stopped after epoch {trial.last_step}"
        else:
            ended = trial.state.name.lower()
        best = max(done, key=lambda t: t.value, default=None)
        best_text = f"best {100 * best.value:.2f} % (trial {best.number})" if best else "no trial completed yet"
        self.echo(f"tune: trial {trial.number} {ended} | {len(done)} done, {stopped} stopped of {self.n_trials}; "
                  f"{best_text}")


def search(objective: Objective, plan: StudyPlan, worker: int = 0, echo: Callable[[str], None] = print,
           study: optuna.Study | None = None) -> None:
    """Run trials in this process until the study holds ``n_trials`` finished ones (with other workers).
    ``study``: the plan's study already opened by this process (opening one costs about a second)."""
    study = study if study is not None else open_study(plan, worker)
    remaining = plan.tune.n_trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[
            optuna.study.MaxTrialsCallback(plan.tune.n_trials, states=FINISHED), Progress(plan.tune.n_trials, echo)])


def _worker(objective: Objective, plan: StudyPlan, worker: int, threads: int) -> None:
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search(objective, plan, worker)


def search_in_processes(objective: Objective, plan: StudyPlan, workers: int,
                        echo: Callable[[str], None] = print, study: optuna.Study | None = None) -> None:
    """:func:`search` here (one worker, on ``study`` if this process opened it), or in ``workers``
    processes sharing the study's storage, each with its share of this process's torch threads. The
    study may end a few trials over ``n_trials``: workers already running a trial finish it."""
    if workers == 1:
        search(objective, plan, 0, echo, study)
        return
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    processes = [context.Process(target=_worker, args=(objective, plan, k, threads), name=f"tune-worker-{k}")
                 for k in range(workers)]
    for process in processes:
        process.start()
    for process in processes:  # on Ctrl-C the workers get the signal too, checkpoint and stop
        process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode]
    if failed:
        raise WorkerFailed(f"tune: {', '.join(failed)} stopped with an error; see its messages above. Run the "
                           "same command again to continue the search")


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The completed trial of highest validation accuracy (the first of them on a tie)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise ConfigError(f"tune: no trial of study {study.study_name!r} completed (all were stopped early or "
                          "failed); widen the space, loosen the pruner (tune.pruner.name: none) or add trials")
    return max(done, key=lambda t: (t.value, -t.number))
