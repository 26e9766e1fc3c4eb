"""``distillery tune``: search a method's parameters for a teacher and student pair, then confirm.

- :mod:`~distillery.tune.space`: the recipe's ``tune`` section and the search space it gives;
- :mod:`~distillery.tune.objective`: one trial, trained on the training subset less a stratified
  validation part and scored (and stopped early) on that part;
- :mod:`~distillery.tune.study`: the Optuna study: storage, workers, progress;
- :mod:`~distillery.tune.confirmation`: the best recipe against the student alone on the test
  split, with the best trial's training settings and with the recipe's own;
- :mod:`~distillery.tune.report`: report.md, the plots and best.yaml;
- :mod:`~distillery.tune.command`: the command, :func:`~distillery.tune.command.run_tune`: the
  teacher, the search, best.yaml and its confirmation on the test split.

Only the search-space names are imported here: :mod:`distillery.compare` reads the recipe helpers
of :mod:`~distillery.tune.space`, and the command's confirmation is a comparison, so importing the
rest here would import :mod:`distillery.compare` from itself.
"""

from distillery.config import PrunerSetting, RangeSetting, TuneConfig
from distillery.tune.space import Dimension, SearchSpace, load_tune_recipe, resolve_space

__all__ = ["Dimension", "PrunerSetting", "RangeSetting", "SearchSpace", "TuneConfig", "load_tune_recipe",
           "resolve_space"]
