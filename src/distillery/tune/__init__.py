"""``distillery tune``: search a method's parameters for a teacher and student pair, then confirm.

- :mod:`~distillery.tune.space`: the recipe's ``tune`` section and the search space it gives;
- :mod:`~distillery.tune.objective`: one trial, trained on the training subset less a stratified
  validation part and scored (and stopped early) on that part;
- :mod:`~distillery.tune.study`: the Optuna study (storage, workers, progress), the search and its
  confirmation on the test split (:func:`~distillery.tune.study.run_tune`);
- :mod:`~distillery.tune.report`: report.md, the plots and best.yaml.

Only the search-space names are imported here: :mod:`distillery.compare` reads the recipe helpers
of :mod:`~distillery.tune.space`, and the study's confirmation is a comparison.
"""

from distillery.tune.space import (
    Dimension,
    PrunerSetting,
    RangeSetting,
    SearchSpace,
    TuneConfig,
    load_tune_recipe,
    resolve_space,
)

__all__ = ["Dimension", "PrunerSetting", "RangeSetting", "SearchSpace", "TuneConfig", "load_tune_recipe",
           "resolve_space"]
