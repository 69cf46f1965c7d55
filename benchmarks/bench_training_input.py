"""Training input pipeline (tf.data, augmentation on) vs the model's consumption rate, same batch size (CPU).

    python benchmarks/bench_training_input.py                                  # ct-abdomen-organs recipe
    python benchmarks/bench_training_input.py --recipe training/recipes/mr-brain-tumor.json --batches 40

1. A dataset folder is built in a temporary folder from the real shared data
   (``training/recipes/build_datasets.py``: the ``ct-abdomen-organs`` cases, TotalSegmentator
   test files) — the same code path as ``medsegai dataset add``.
2. The recipe's data plan, normalisation fit, preprocessing, foreground-oversampling sampler and
   ``make_train_dataset`` (augmentation from the recipe, parallel map, prefetch) are set up
   exactly as ``medsegai train`` does.
3. Producer: batches/s drawn from the dataset alone (after a warm-up); for diagnosis also without
   augmentation, and the numpy window sampler alone (single thread).
4. Consumer: training steps/s of the recipe's network, optimiser and loss on one fixed batch held
   in memory (``train_on_batch``; the input pipeline is not involved).
5. Together: steps/s of ``model.fit`` fed by the pipeline, to show whether training is input-bound.

Target (issue 4/6): producer ≥ 3 × consumer. Note that on this 2-core machine the producer and the
consumer share the same cores during real training; (5) shows the combined effect.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, print_report

TARGET_RATIO = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "training" / "recipes" / "ct-abdomen-organs.json")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batches", type=int, default=30, help="batches timed for each rate")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    sys.path.insert(0, str(REPO / "training" / "recipes"))
    import build_datasets
    from medsegai_training import losses, models
    from medsegai_training.config import load_config
    from medsegai_training.data import (
        Sampler,
        fit_normalization,
        load_cases,
        make_data_plan,
        make_train_dataset,
    )
    from MedSegAILib.model.backends import import_tensorflow
    from MedSegAILib.data.dataset import load_dataset, read_case

    tf = import_tensorflow()
    import keras

    cfg = load_config(args.recipe, batch_size=args.batch_size)
    model_id = cfg.model_id
    with tempfile.TemporaryDirectory(prefix="medsegai-bench-") as folder:
        dataset_dir = Path(folder) / model_id
        if model_id == "mr-brain-tumor":
            build_datasets.build_mr_dataset(args.shared, dataset_dir)
        else:
            build_datasets.build_ct_dataset(args.shared, dataset_dir)
        info = load_dataset(dataset_dir)
        plan = make_data_plan(cfg, info.channels, info.labels)
        case_ids = [case["id"] if isinstance(case, dict) else case.id for case in info.cases]

        def read_for_fit(case_id: str):
            images, label = read_case(info, case_id)
            return [images[i] for i in plan.channel_indices], label

        fit_normalization(read_for_fit, case_ids, plan)
        start = time.perf_counter()
        cases = load_cases(info, case_ids, plan, cache_dir=None, seed=cfg.seed)
        preprocess_s = time.perf_counter() - start

    sampler = Sampler(cases, cfg.spatial, plan.num_classes, cfg.foreground_fraction, cfg.seed)
    augmentation = cfg.augmentation_config()
    dataset = make_train_dataset(sampler, cfg.batch_size, augmentation, num_parallel_calls=cfg.num_workers)

    def drain(data):
        iterator = iter(data)
        for _ in range(args.warmup):
            last = next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            last = next(iterator)
        return args.batches / (time.perf_counter() - start), last

    producer, batch = drain(dataset)
    plain, _ = drain(make_train_dataset(sampler, cfg.batch_size, None, num_parallel_calls=cfg.num_workers))
    start = time.perf_counter()
    for index in range(args.batches * cfg.batch_size):
        sampler.window(index)
    sampler_only = args.batches / (time.perf_counter() - start)

    model_cfg = dict(cfg.model)
    model_cfg["in_channels"] = len(plan.channels)
    model_cfg["num_classes"] = plan.num_classes
    keras.utils.set_random_seed(cfg.seed)
    model = models.build_model(models.resolve_config(model_cfg))
    optimizer = keras.optimizers.AdamW(learning_rate=float(cfg.optimizer.get("learning_rate", 1e-3)),
                                       weight_decay=float(cfg.optimizer.get("weight_decay", 1e-4)))
    model.compile(optimizer=optimizer, loss=losses.get_loss(cfg.loss), jit_compile=False)
    images, labels = batch
    for _ in range(args.warmup):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(args.batches):
        model.train_on_batch(images, labels)
    consumer = args.batches / (time.perf_counter() - start)

    steps = args.batches
    model.fit(dataset, epochs=1, steps_per_epoch=args.warmup, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    together = steps / (time.perf_counter() - start)

    ratio = producer / consumer
    row = {
        "recipe": args.recipe.name,
        "batch_size": cfg.batch_size,
        "patch": "x".join(str(p) for p in cfg.spatial["patch_size"]),
        "augmentation": "on" if augmentation and augmentation.get("enabled", True) is not False else "off",
        "cases": len(cases),
        "preprocess_s": round(preprocess_s, 2),
        "pipeline_batches_per_s": round(producer, 2),
        "pipeline_no_augmentation_batches_per_s": round(plain, 2),
        "sampler_only_batches_per_s": round(sampler_only, 2),
        "train_steps_per_s_fixed_batch": round(consumer, 2),
        "ratio": round(ratio, 2),
        "meets_3x": ratio >= TARGET_RATIO,
        "fit_steps_per_s_with_pipeline": round(together, 2),
        "input_bound_slowdown": round(consumer / together, 2),
        "tensorflow": tf.__version__,
        "machine": machine(),
    }
    print_report("bench_training_input", [row], ["recipe", "batch_size", "patch", "pipeline_batches_per_s",
                                                 "pipeline_no_augmentation_batches_per_s", "sampler_only_batches_per_s",
                                                 "train_steps_per_s_fixed_batch", "ratio", "meets_3x",
                                                 "fit_steps_per_s_with_pipeline", "input_bound_slowdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
