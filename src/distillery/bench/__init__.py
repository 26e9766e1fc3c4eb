"""``distillery bench``: what distillation costs on top of training the student alone.

One run measures a fixed workload (Fashion-MNIST, batch 128, SGD) for two teacher → student pairs,
ResNet-20 → ResNet-8 and MLP 1200-1200 → 800-800, and prints one table of images/s with each row's
ratio to the first row of its pair (the student trained alone with cross-entropy: the physical
limit of distillation). Rows (:mod:`distillery.bench.rows`):

    ce alone              our Trainer, method ``ce`` (no teacher)
    kd reference          a minimal hand-written PyTorch KD loop (:func:`reference_kd_loop`)
    kd on the fly         our Trainer, method ``hinton``, teacher run every step
    kd cached             the same with the teacher-output cache (built beforehand, not timed)
    fsp1 on the fly       our Trainer, FSP stage 1 (method ``fsp``, default ResNet stage pairs, its
                          stage-1 AdamW; ResNets only), teacher run every step (store_teacher=false)
    fsp1 stored           the same with the teacher's FSP matrices read from the teacher cache
                          (store_teacher=true; stored beforehand, not timed)
    ce alone, augmented   ``ce`` with random crops (padding 2) and flips (ResNets only)
    kd stored, augmented  ``hinton`` on the same augmentation, reading the teacher store of 2 epochs
                          of views (:mod:`distillery.teacher_store`; built beforehand, not timed)
    eval evaluate()       distillery.train.evaluate at batch 256
    eval bare model(x)    ``model(x)`` on ready-made normalised batches, under inference_mode
    ce alone (again)      the first row once more: an A/A control, whose ratio to the first row
                          shows how far two identical rows disagree in this run

and one wall-clock row (:mod:`distillery.bench.tune_row`): a 20-trial ``distillery tune`` with
augmentation reading the teacher store, against the same student trained alone (target: the
search's wall ≤ 1.15 × 20 student-alone runs + the store's build time).

Speed: one subprocess per workload sets up all its rows, each running in its own thread for a
warm-up epoch and then the timed epochs of :data:`CHUNK` steps, and lets them take one step at a
time in turn (:class:`TurnTaking`, back and forth along :data:`RUN_ORDER`, where each target's two
rows are neighbours), so they alternate step by step. Trainer rows are timed through the Trainer's
public callbacks (:class:`ClockedSteps`), which also read each step's teacher seconds from the
Trainer's cost clock. images/s comes from the lower-quartile step time (interference only ever
slows a step down); the median CPU time per image is reported too. Each target
(:mod:`distillery.bench.targets`) is judged on paired steps: a quantity of the two rows' k-th
steps, taken for every k; the median of these, with a distribution-free 95 % interval
(:func:`distillery.stats.median_interval`), says "met" when the whole interval clears the target,
"NOT MET" when it lies wholly below, "within noise" otherwise. Pairing is what makes a 3 % target
measurable on a shared 2-core VM: its speed drifts by up to ±25 % over seconds (one MLP step's
time correlates 0.8 with the next's), which rows timed seconds apart would mix into their ratio.
FSP's stored row is judged against its limit: the on-the-fly step time over that step less its
teacher forward, both measured in the run. Memory: one more subprocess per row measures the rise of
its peak resident set (``VmHWM``, reset via ``/proc/self/clear_refs``) over the level after loading
its data and models; CPU only, no CUDA. Networks are randomly initialised: speed does not depend on
the weights. Benchmarks are noisy on a shared machine; compare ratios within one run, and prefer
``--threads 1`` there (two OpenMP threads competing with other processes for two cores slow down
erratically).
"""

from distillery.bench.clocks import ClockedSteps, PeakMemory, StepClock, TurnTaking, typical_of
from distillery.bench.rows import PAIRS, ROWS, memory_of_row, reference_kd_loop, rows_for, speed_of_rows
from distillery.bench.run import run_bench
from distillery.bench.targets import (
    BATCH,
    CHUNK,
    CONTROL,
    EVAL_BATCH,
    MLP,
    RESNET,
    RUN_ORDER,
    TARGETS,
    Result,
    Target,
    format_table,
    target_checks,
)

__all__ = [
    "BATCH", "CHUNK", "CONTROL", "EVAL_BATCH", "MLP", "PAIRS", "RESNET", "ROWS", "RUN_ORDER", "TARGETS",
    "ClockedSteps", "PeakMemory", "Result", "StepClock", "Target", "TurnTaking", "format_table", "memory_of_row",
    "reference_kd_loop", "rows_for", "run_bench", "speed_of_rows", "target_checks", "typical_of",
]
