"""FSP matrices, the "flow of solution procedure" of Yim et al. (CVPR 2017), stage 1 of a two-stage run.

Knowledge is the relation between two layers: for maps F1 (h×w×m) and F2 (h×w×n) of one network,
G_ij = Σ_{s,t} F1[s,t,i]·F2[s,t,j] / (h·w) (the larger map max-pooled first). Stage 1 trains the
student to reproduce the teacher's G over the chosen layer pairs; stage 2 trains the main task
(``ce``) from those weights. ``distillery distill --method fsp`` runs both; the shipped recipe
``fsp`` is the paper's set-up at laptop scale.

Options beyond the paper's defaults:

- ``store_teacher`` (``auto`` by default): compute the teacher's matrices once per training
  example and read them back each step instead of running the teacher (the paper's speed-up:
  35 → 19 s per 100 iterations). They are entries of the teacher-output cache, one per teacher
  pair (``fsp_<a>__<b>``), keyed by the teacher's weights, the data, the preprocessing and the
  device. ``auto`` stores them where that is exact and cheap enough: ``teacher.cache: auto`` (the
  default; ``off`` turns it off), a stage without augmentation (the default stage 1 has none) and
  at most ``teacher.cache_max_mb`` of matrices (~650 MB for the default pairs on 60k 28×28 images).
  ``true`` always stores (an error if the stage augments), ``false`` never; ``store_dir`` names
  another folder. See :mod:`distillery.methods.stored`.
- ``shuffle_seed``: permute the teacher's channels (one fixed permutation per layer), an equivalent
  teacher whose G has permuted rows and columns; students trained on differently shuffled targets
  are less correlated, so their ensemble is stronger. The stored matrices are the un-shuffled
  ones, permuted as they are read, so one stored copy serves every seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distillery.cache import entry_name
from distillery.data.loader import BatchLoader
from distillery.losses import fsp_loss, fsp_matrix, pool_to_common_size
from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, probe_student
from distillery.methods.stored import StoreMode, store_dir_field, store_teacher_field, stored_targets
from distillery.taps import UnknownLayerError

Pair = tuple[str, str]
RESNET_STAGE_PAIRS: list[Pair] = [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
# Stage-1 optimiser of the default stages (FSP and FitNets): see FSP.default_stages.
STAGE1_OPTIMIZER = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}


class FSPParams(MethodParams):
    pairs: list[Pair] = Field(
        default_factory=lambda: list(RESNET_STAGE_PAIRS),
        description="(layer_a, layer_b) pairs of the student; the default takes each ResNet stage's input and "
                    "output, as the paper does")
    teacher_pairs: list[Pair] | None = Field(
        None, description="the teacher's layer pairs, one per student pair (default: the same names)")
    pair_weights: list[float] | None = Field(None, description="λ_i, the weight of each pair's term (default 1 each)")
    shuffle_seed: int | None = Field(None, description="permute the teacher's channels with this seed (None: off)")
    store_teacher: StoreMode = store_teacher_field()
    store_dir: str | None = store_dir_field()

    @model_validator(mode="after")
    def _check_lengths(self) -> FSPParams:
        if not self.pairs:
            raise ValueError("pairs: give at least one (layer_a, layer_b) pair")
        for name, other in (("teacher_pairs", self.teacher_pairs), ("pair_weights", self.pair_weights)):
            if other is not None and len(other) != len(self.pairs):
                raise ValueError(f"{name} has {len(other)} entries but pairs has {len(self.pairs)}; give one per pair")
        if self.pair_weights is not None and any(w < 0 for w in self.pair_weights):
            raise ValueError(f"pair_weights must be >= 0, got {self.pair_weights}")
        return self

    @property
    def teacher_pairs_or_same(self) -> list[Pair]:
        return list(self.teacher_pairs) if self.teacher_pairs is not None else list(self.pairs)

    @property
    def weights(self) -> list[float]:
        return list(self.pair_weights) if self.pair_weights is not None else [1.0] * len(self.pairs)


class FSP(Method):
    """L_FSP = (1/N) Σ_x Σ_i λ_i · ‖G_i^T(x) − G_i^S(x)‖²₂ over the layer pairs i (λ_i = ``pair_weights``).

    Teacher and student must have the same channel counts at paired layers; spatial sizes may
    differ between the nets (G averages over space). The classifier is not used, so the teacher
    may come from another task or class count.
    """

    name = "fsp"
    Params = FSPParams

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        self.student_layers = tuple(dict.fromkeys(name for pair in p.pairs for name in pair))
        self.teacher_layers = tuple(dict.fromkeys(name for pair in p.teacher_pairs_or_same for name in pair))
        self._permutations: dict[str, Tensor] = {}
        self._channels: dict[str, int] = {}  # the teacher layers' channel counts, known after setup
        self._stored: list[Tensor] | None = None

    # ------------------------------------------------------------------ set-up checks

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        p = self.params
        try:
            super().setup(student, teacher, example)
        except UnknownLayerError as err:
            raise UnknownLayerError(f"method 'fsp' (parameters pairs / teacher_pairs): {err} The default pairs "
                                    "fit the ResNets of the shipped recipe (--config fsp).") from None
        assert teacher is not None
        s_feats = probe_student(student, example, self.student_layers).features
        t_feats = teacher(example, self.teacher_layers).features
        for i, ((sa, sb), (ta, tb)) in enumerate(zip(p.pairs, p.teacher_pairs_or_same), start=1):
            for role, feats, a, b in (("student", s_feats, sa, sb), ("teacher", t_feats, ta, tb)):
                fa, fb = feats[a], feats[b]
                if fa.dim() != 4 or fb.dim() != 4:
                    raise ValueError(f"fsp pair {i}: {role} layers {a!r} {tuple(fa.shape[1:])} and {b!r} "
                                     f"{tuple(fb.shape[1:])} must both give N×C×H×W feature maps")
                try:
                    pool_to_common_size(fa, fb)
                except ValueError:
                    raise ValueError(
                        f"fsp pair {i}: {role} layers {a!r} ({fa.shape[-2]}×{fa.shape[-1]}) and {b!r} "
                        f"({fb.shape[-2]}×{fb.shape[-1]}) have spatial sizes that cannot be max-pooled to match: "
                        "the larger must be a whole multiple of the smaller"
                    ) from None
            for s_name, t_name in ((sa, ta), (sb, tb)):
                c_s, c_t = s_feats[s_name].shape[1], t_feats[t_name].shape[1]
                if c_s != c_t:
                    raise ValueError(
                        f"fsp pair {i}: student layer {s_name!r} has {c_s} channels but teacher layer {t_name!r} "
                        f"has {c_t}; FSP matrices compare channel by channel, so paired layers need equal counts"
                    )
        self._channels = {name: t_feats[name].shape[1] for name in self.teacher_layers}
        self._permutations = {}
        if p.shuffle_seed is not None:
            for k, name in enumerate(self.teacher_layers):
                generator = torch.Generator().manual_seed(p.shuffle_seed * 1000 + k)
                perm = torch.randperm(t_feats[name].shape[1], generator=generator)
                self._permutations[name] = perm.to(example.device)

    # ------------------------------------------------------------------ stored teacher matrices

    def prepare(self, teacher: Teacher | None, loader: BatchLoader, cache_dir: Path | None = None, *,
                run_dir: Path | None = None, max_mb: float | None = None) -> None:
        """Load the teacher's per-example matrices from the cache, or compute and store them, when
        ``store_teacher`` says so (see the module docstring); otherwise the teacher runs every step."""
        pairs = self.params.teacher_pairs_or_same
        if self.params.store_teacher is not False and not self._channels:
            raise RuntimeError("fsp: call setup(student, teacher, example) before prepare")
        names = self.entry_names
        stored = stored_targets(
            f"method {self.name!r}", self.params.store_teacher, self.params.store_dir, teacher, loader,
            shapes={name: (self._channels[a], self._channels[b]) for name, (a, b) in zip(names, pairs)},
            layers=self.teacher_layers, targets=lambda out: dict(zip(names, self._teacher_matrices(out, False))),
            cache_dir=cache_dir, run_dir=run_dir, max_mb=max_mb)
        self._stored = None if stored is None else [stored[name] for name in names]

    @property
    def entry_names(self) -> list[str]:
        """The teacher-output cache entry of each teacher pair: ``fsp_<a>__<b>``."""
        return [entry_name("fsp", a, b) for a, b in self.params.teacher_pairs_or_same]

    @property
    def uses_stored_targets(self) -> bool:
        """Whether :meth:`prepare` loaded stored teacher matrices (no teacher forward pass per step)."""
        return self._stored is not None

    # ------------------------------------------------------------------ the loss

    def _teacher_matrices(self, teacher: ModelOutputs, permute: bool = True) -> list[Tensor]:
        feats = teacher.features
        return [self._permuted(fsp_matrix(feats[a], feats[b]), a, b) if permute else fsp_matrix(feats[a], feats[b])
                for a, b in self.params.teacher_pairs_or_same]

    def _permuted(self, g: Tensor, a: str, b: str) -> Tensor:
        """G of the channel-permuted teacher: rows permuted as layer a's channels, columns as layer b's."""
        if a in self._permutations:
            g = g[:, self._permutations[a], :]
        if b in self._permutations:
            g = g[:, :, self._permutations[b]]
        return g

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        if self._stored is not None:
            if index is None:
                raise ValueError("fsp with stored teacher matrices needs the batch's dataset indices: "
                                 "call method(student_out, None, targets, index)")
            pairs = p.teacher_pairs_or_same
            rows = index.to(self._stored[0].device)
            teacher_g = [self._permuted(store[rows].to(index.device), a, b)
                         for store, (a, b) in zip(self._stored, pairs)]
        else:
            if teacher is None:
                raise ValueError("fsp needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
            teacher_g = self._teacher_matrices(teacher)
        student_g = [fsp_matrix(student.features[a], student.features[b]) for a, b in p.pairs]
        return {"fsp": fsp_loss(student_g, teacher_g, p.weights)}

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """Stage 1 FSP, stage 2 the main task with cross-entropy, as in the paper.

        Stage 1 uses AdamW at learning rate 0.001 without weight decay: the FSP loss sums m·n squared
        entries of unnormalised features per pair, so its scale (hundreds to tens of thousands)
        depends on the nets and the data, and Adam's step does not. (On a 1,500-image Fashion-MNIST
        subset, ResNet-14 → ResNet-8, SGD at 0.001 left the student worse than trained alone, AdamW
        did not.) Other settings come from ``student.train``.
        """
        return [{"method": {"name": cls.name}, "train": {"optimizer": STAGE1_OPTIMIZER}}, {"method": {"name": "ce"}}]

