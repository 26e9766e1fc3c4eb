"""FSP matrices, the "flow of solution procedure" of Yim et al. (CVPR 2017), stage 1 of a two-stage run.

Knowledge is the relation between two layers: for maps F1 (h×w×m) and F2 (h×w×n) of one network,
G_ij = Σ_{s,t} F1[s,t,i]·F2[s,t,j] / (h·w) (the larger map max-pooled first). Stage 1 trains the
student to reproduce the teacher's G over the chosen layer pairs; stage 2 trains the main task
(``ce``) from those weights. ``distillery distill --method fsp`` runs both; the shipped recipe
``fsp`` is the paper's set-up at laptop scale.

Options beyond the paper's defaults:

- ``store_teacher``: compute the teacher's matrices once per training example and store them in a
  file keyed by the teacher's weights and the data (the paper's speed-up); valid only for stages
  without augmentation, which is checked.
- ``shuffle_seed``: permute the teacher's channels (one fixed permutation per layer), an equivalent
  teacher whose G has permuted rows and columns; students trained on differently shuffled targets
  are less correlated, so their ensemble is stronger.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distillery.data.datasets import ImageDataset
from distillery.data.loader import BatchLoader
from distillery.losses import fsp_loss, fsp_matrix, pool_to_common_size
from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, probe_student
from distillery.taps import UnknownLayerError

Pair = tuple[str, str]
RESNET_STAGE_PAIRS: list[Pair] = [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
STORE_PREFIX = "fsp_teacher_"
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
    store_teacher: bool = Field(False, description="compute the teacher's matrices once and store them "
                                                   "(training without augmentation only)")
    store_dir: str | None = Field(None, description="folder for the stored matrices (default: the run's folder)")

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
        self._stored: list[Tensor] | None = None
        self.store_file: Path | None = None

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
        self._permutations = {}
        if p.shuffle_seed is not None:
            for k, name in enumerate(self.teacher_layers):
                generator = torch.Generator().manual_seed(p.shuffle_seed * 1000 + k)
                perm = torch.randperm(t_feats[name].shape[1], generator=generator)
                self._permutations[name] = perm.to(example.device)

    # ------------------------------------------------------------------ stored teacher matrices

    def prepare(self, teacher: Teacher | None, loader: BatchLoader, cache_dir: Path | None = None) -> None:
        """With ``store_teacher``: load the teacher's per-example matrices, or compute and save them."""
        p = self.params
        if not p.store_teacher:
            return
        if loader.shuffle and loader.augment.active:
            raise ValueError(
                "fsp store_teacher=true keeps one teacher FSP matrix per training example, which is only valid "
                f"without augmentation, but this stage augments (crop_padding={loader.augment.crop_padding}, "
                f"hflip={loader.augment.hflip}); turn the stage's train.augment off or set store_teacher=false"
            )
        if teacher is None:
            raise ValueError("fsp store_teacher=true needs the teacher to compute the matrices once")
        key = self.store_key(teacher, loader.dataset)
        folder = Path(p.store_dir) if p.store_dir else cache_dir
        self.store_file = folder / f"{STORE_PREFIX}{key[:20]}.pt" if folder is not None else None
        if self.store_file is not None and self.store_file.exists():
            from distillery.train.checkpoint import load_checkpoint

            state = load_checkpoint(self.store_file, map_location=loader.device)
            if state.get("key") == key:
                self._stored = list(state["matrices"])
                return
        self._stored = self._compute_store(teacher, loader)
        if self.store_file is not None:
            from distillery.train.checkpoint import save_checkpoint

            save_checkpoint({"kind": "fsp-teacher-matrices", "key": key, "pairs": self.params.teacher_pairs_or_same,
                             "matrices": self._stored}, self.store_file)

    def store_key(self, teacher: Teacher, dataset: ImageDataset) -> str:
        """A hash of everything the stored matrices depend on: teacher weights, images, normalisation, pairs."""
        digest = hashlib.sha256()
        digest.update(repr((self.params.teacher_pairs_or_same, dataset.mean, dataset.std)).encode())
        for member in teacher.members:
            for name, tensor in member.state_dict().items():
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor))
        digest.update(_tensor_bytes(dataset.images))
        return digest.hexdigest()

    @torch.no_grad()
    def _compute_store(self, teacher: Teacher, loader: BatchLoader) -> list[Tensor]:
        plain = BatchLoader(loader.dataset, max(loader.batch_size, 256), device=loader.device)
        stored: list[Tensor] | None = None
        for batch in plain.epoch(0):
            matrices = self._teacher_matrices(teacher(batch.inputs, self.teacher_layers), permute=False)
            if stored is None:
                stored = [g.new_empty((len(loader.dataset), *g.shape[1:])) for g in matrices]
            for store, g in zip(stored, matrices):
                store[batch.index] = g
        assert stored is not None
        return stored

    def teacher_outputs(self, teacher: Teacher | None, inputs: Tensor,
                        index: Tensor | None = None) -> ModelOutputs | None:
        if self._stored is not None:
            return None  # the stored matrices replace the teacher's forward pass
        return super().teacher_outputs(teacher, inputs, index)

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
            teacher_g = [self._permuted(store[index], a, b) for store, (a, b) in zip(self._stored, pairs)]
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


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
