"""FSP matrices, the "flow of solution procedure" of Yim et al. (CVPR 2017), stage 1 of a two-stage run.

Knowledge is the relation between two layers: for maps F1 (m channels) and F2 (n channels) of one
network over the same positions, G_ij = Σ_positions F1[i]·F2[j] / (number of positions) (the larger
map max-pooled first). Stage 1 trains the student to reproduce the teacher's G over the chosen
layer pairs; stage 2 trains the main task (``ce``) from those weights. ``distillery distill
--method fsp`` runs both; the shipped recipe ``fsp`` is the paper's set-up at laptop scale.

Options beyond the paper's defaults:

- ``store_teacher`` (``auto``): compute the teacher's matrices once per training example and read
  them back each step instead of running the teacher (the paper's speed-up). See
  :mod:`distillery.stored_targets` for when ``auto`` stores; the entries are named
  ``fsp_<a>__<b>``, one per teacher pair.
- ``shuffle_seed``: permute the teacher's channels (one fixed permutation per layer), an equivalent
  teacher whose G has permuted rows and columns; students trained on differently shuffled targets
  are less correlated, so their ensemble is stronger. The stored matrices are the un-shuffled
  ones, permuted as they are read, so one stored copy serves every seed.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distillery.losses import fsp_loss, fsp_matrix
from distillery.methods.base import Method, MethodParams, ModelOutputs
from distillery.methods.features import (
    STAGE1_OPTIMIZER,
    StoredRows,
    check_poolable,
    store_dir_field,
    store_teacher_field,
)
from distillery.methods.registry import register_method
from distillery.taps import UnknownLayerError
from distillery.teacher import StoreMode, TargetRequest, Teacher, entry_name, probe_student

Pair = tuple[str, str]
RESNET_STAGE_PAIRS: list[Pair] = [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]


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
        if self.pair_weights is not None and any(not 0 <= w < float("inf") for w in self.pair_weights):
            raise ValueError(f"pair_weights must be finite and >= 0, got {self.pair_weights}")
        return self

    @property
    def teacher_pairs_or_same(self) -> list[Pair]:
        return list(self.teacher_pairs) if self.teacher_pairs is not None else list(self.pairs)

    @property
    def weights(self) -> list[float]:
        return list(self.pair_weights) if self.pair_weights is not None else [1.0] * len(self.pairs)


@register_method("fsp")
class FSP(Method):
    """L_FSP = (1/N) Σ_x Σ_i λ_i · ‖G_i^T(x) − G_i^S(x)‖²₂ over the layer pairs i (λ_i = ``pair_weights``).

    Teacher and student must have the same channel counts at paired layers; spatial sizes may
    differ between the nets (G averages over positions). The classifier is not used, so the teacher
    may come from another task or class count.
    """

    Params = FSPParams
    trains_classifier = False

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        self.student_layers = tuple(dict.fromkeys(name for pair in p.pairs for name in pair))
        self.teacher_layers = tuple(dict.fromkeys(name for pair in p.teacher_pairs_or_same for name in pair))
        self._permutations: dict[str, Tensor] = {}
        self._channels: dict[str, int] = {}  # the teacher layers' channel counts, known after setup
        self._stored: StoredRows | None = None

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        try:
            super().setup(student, teacher, example)
        except UnknownLayerError as err:
            raise UnknownLayerError(f"method 'fsp' (parameters pairs / teacher_pairs): {err} The default pairs "
                                    "fit the ResNets of the shipped recipe (--config fsp).") from None
        assert teacher is not None
        s_feats = probe_student(student, example, self.student_layers).features
        t_feats = teacher(example, self.teacher_layers).features
        check_fsp_pairs(self.params, s_feats, t_feats)
        self._channels = {name: t_feats[name].shape[1] for name in self.teacher_layers}
        self._permutations = {}
        if self.params.shuffle_seed is not None:
            for k, name in enumerate(self.teacher_layers):
                generator = torch.Generator().manual_seed(self.params.shuffle_seed * 1000 + k)
                perm = torch.randperm(t_feats[name].shape[1], generator=generator)
                self._permutations[name] = perm.to(example.device)

    # ------------------------------------------------------------------ stored teacher matrices

    @property
    def entry_names(self) -> list[str]:
        """The teacher-output cache entry of each teacher pair: ``fsp_<a>__<b>``."""
        return [entry_name("fsp", a, b) for a, b in self.params.teacher_pairs_or_same]

    def target_request(self) -> TargetRequest | None:
        if self.params.store_teacher is False:
            return None
        if not self._channels:
            raise RuntimeError("fsp: call setup(student, teacher, example) before asking for stored targets")
        pairs, names = self.params.teacher_pairs_or_same, self.entry_names
        return TargetRequest(
            self.name, self.params.store_teacher, self.params.store_dir,
            entries={name: (self._channels[a], self._channels[b]) for name, (a, b) in zip(names, pairs)},
            layers=self.teacher_layers, targets=lambda out: dict(zip(names, self._teacher_matrices(out, False))))

    def use_stored_targets(self, targets: dict[str, Tensor]) -> None:
        self._stored = StoredRows(self.name, targets)

    @property
    def runs_teacher_every_step(self) -> bool:
        return self._stored is None

    # ------------------------------------------------------------------ the loss

    def _teacher_matrices(self, teacher: ModelOutputs, permute: bool = True) -> list[Tensor]:
        feats = teacher.features
        matrices = [fsp_matrix(feats[a], feats[b]) for a, b in self.params.teacher_pairs_or_same]
        return [self._permuted(g, a, b) for g, (a, b) in zip(matrices, self.params.teacher_pairs_or_same)] \
            if permute else matrices

    def _permuted(self, g: Tensor, a: str, b: str) -> Tensor:
        """G of the channel-permuted teacher: rows permuted as layer a's channels, columns as layer b's."""
        if a in self._permutations:
            g = g[:, self._permutations[a], :]
        if b in self._permutations:
            g = g[:, :, self._permutations[b]]
        return g

    def _stored_matrices(self, index: Tensor | None) -> list[Tensor]:
        assert self._stored is not None
        return [self._permuted(self._stored.rows(name, index), a, b)
                for name, (a, b) in zip(self.entry_names, self.params.teacher_pairs_or_same)]

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        if self._stored is not None:
            teacher_g = self._stored_matrices(index)
        elif teacher is None:
            raise ValueError("fsp needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
        else:
            teacher_g = self._teacher_matrices(teacher)
        student_g = [fsp_matrix(student.features[a], student.features[b]) for a, b in p.pairs]
        return {"fsp": fsp_loss(student_g, teacher_g, p.weights)}

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """Stage 1 FSP, stage 2 the main task with cross-entropy, as in the paper; stage 1 uses the
        feature methods' optimiser (:data:`~distillery.methods.features.STAGE1_OPTIMIZER`): the FSP
        loss sums m·n squared entries of unnormalised features, so its scale depends on the nets."""
        return [{"method": {"name": cls.name}, "train": {"optimizer": STAGE1_OPTIMIZER}}, {"method": {"name": "ce"}}]


def check_fsp_pairs(p: FSPParams, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor]) -> None:
    """Each pair's two maps pool to a common size, in both nets; paired layers have equal channels."""
    for i, ((sa, sb), (ta, tb)) in enumerate(zip(p.pairs, p.teacher_pairs_or_same), start=1):
        check_poolable(f"fsp pair {i}: student", (sa, s_feats[sa]), (sb, s_feats[sb]))
        check_poolable(f"fsp pair {i}: teacher", (ta, t_feats[ta]), (tb, t_feats[tb]))
        for s_name, t_name in ((sa, ta), (sb, tb)):
            c_s, c_t = s_feats[s_name].shape[1], t_feats[t_name].shape[1]
            if c_s != c_t:
                raise ValueError(
                    f"fsp pair {i}: student layer {s_name!r} has {c_s} channels but teacher layer {t_name!r} "
                    f"has {c_t}; FSP matrices compare channel by channel, so paired layers need equal counts"
                )
