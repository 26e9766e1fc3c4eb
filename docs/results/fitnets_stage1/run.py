"""Which stage-1 learning rate should FitNets default to? A grid on two pairs, three seeds each.

Pairs: a CNN teacher → MLP 100-100 student (hint: the teacher's 128-unit hidden layer, guided: the
student's first hidden layer) and ResNet-20 → ResNet-8 (stage2 → stage2), on a Fashion-MNIST
subset. Stage 1: FitNets with AdamW at each learning rate; stage 2: the default KD stage. Prints
and writes results.json: test accuracy after each stage, and whether the student collapsed.

    python docs/results/fitnets_stage1/run.py --out runs/fitnets_stage1    # resumable
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillery.config import ModelConfig, TrainConfig
from distillery.methods import create_method
from distillery.runner import Runner, default_folder
from distillery.spec import CacheSpec, DataSpec, RunSpec, StageSpec, TeacherRef

PAIRS = {
    "cnn→mlp": ({"name": "cnn"}, {"name": "mlp", "kwargs": {"hidden": [100, 100]}}, "head.3", "hidden1"),
    "resnet20→resnet8": ({"name": "resnet20"}, {"name": "resnet8"}, "stage2", "stage2"),
}
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def specs(pair: str, seed: int, lr: float, out: Path, train: int, epochs: tuple[int, int]) -> tuple[RunSpec, RunSpec]:
    teacher_model, student_model, hint, guided = PAIRS[pair]
    data = DataSpec(train_size=train, test_size=2000, split_seed=0)
    sgd = {"batch_size": 128, "optimizer": {"name": "sgd", "lr": 0.05}}
    cache = CacheSpec(str(out / "cache"))
    teacher = RunSpec(f"{pair} teacher", ModelConfig.model_validate(teacher_model),
                      (StageSpec(create_method("ce").params, TrainConfig(epochs=3, **sgd)),), data, 0, cache=cache)
    fitnets = create_method("fitnets", teacher_layer=hint, student_layer=guided).params
    stage1 = TrainConfig(epochs=epochs[0], batch_size=128, optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.0})
    kd = create_method("hinton", temperature=3.0, kd_weight=0.9, ce_weight=0.1).params
    student = RunSpec(f"{pair} fitnets lr={lr:g}", ModelConfig.model_validate(student_model),
                      (StageSpec(fitnets, stage1), StageSpec(kd, TrainConfig(epochs=epochs[1], **sgd))), data, seed,
                      (TeacherRef(run=teacher),), cache=cache)
    return teacher, student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/fitnets_stage1")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    runner = Runner(resume=True, overwrite=True, progress=False, folder_for=default_folder(out), echo=lambda m: None)
    rows = []
    for pair in PAIRS:
        for lr in LRS:
            for seed in range(args.seeds):
                _, student = specs(pair, seed, lr, out, args.train, (1, 3))
                history = runner.train(student).history
                after = {r["stage"]: r["test_accuracy"] for r in history}
                rows.append({"pair": pair, "lr": lr, "seed": seed, "after_stage1": after[1], "after_stage2": after[2]})
                print(json.dumps(rows[-1]), flush=True)
    (Path(__file__).parent / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
