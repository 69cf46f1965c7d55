"""Reproduce a shipped model from the shared data: dataset, cross-validation, final training, ship.

    python training/recipes/build_models.py {ct-abdomen-organs,mr-brain-tumor,all} \
        [--shared ../shared/data] [--work build/models] [--dest MedSegAI/Resources/Models] \
        [--skip-cv | --cv-only] [--epochs N] [--steps-per-epoch N] [--jobs N] [--resume]
        [--recipe FILE]

(``make models`` runs it with ``all``.) For each model id, with the recipe
``training/recipes/<id>.json``:

1. builds the dataset folder ``<work>/<id>/dataset`` from the shared data
   (``build_datasets.py``; patient keys are the patient folder names);
2. leave-one-patient-out cross-validation: for each patient, ``medsegai train`` with that
   patient's cases as held-out ``test_cases`` (never used for training or model selection;
   ``validation_fraction`` 0, so the kept weights are chosen on the training cases only), then
   ``medsegai evaluate`` of the fold model on the held-out cases (Dice and HD95 per label, on the
   original image grid, with the model card's post-processing);
3. trains the final model on every case;
4. writes ``<dest>/<id>/`` (``model.json``, ``model.keras``, ``model.onnx``, ``NOTICE``) with the
   cross-validation figures in ``model.json["metrics"]["cross_validation"]``, replacing the folder
   shipped before (the new folder is complete before the old one is moved away).

Everything under ``<work>/<id>`` is a build directory and is deleted at the start of a run (kept,
and finished trainings/evaluations reused, with ``--resume``). The
figures are also written to ``<work>/<id>/cv_results.json`` and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from build_datasets import DEFAULT_SHARED, MODEL_IDS, build_ct_dataset, build_mr_dataset  # noqa: E402

DEFAULT_WORK = REPO_ROOT / "build" / "models"
DEFAULT_DEST = REPO_ROOT / "MedSegAI" / "Resources" / "Models"
MAX_FOLDER_BYTES = 20 * 1024 * 1024
SHIPPED_FILES = ("model.json", "model.keras", "model.onnx", "NOTICE")
# Window size written into model.json for inference. The networks are fully convolutional and
# trained on 160x160 windows (cheap on a CPU); at inference one 256x256 window covers a whole
# slice of up to 512 mm at 2 mm (CT) or 256 mm at 1 mm (MR) instead of 4-9 overlapping 160x160
# windows (measured: 2.4x less CPU time for a 512x512x200 CT). Cross-validation evaluates the fold
# models with the same setting, so the reported figures are those of the shipped configuration.
INFERENCE_PATCH = {"ct-abdomen-organs": [256, 256], "mr-brain-tumor": [256, 256]}
TRAINING_DATA = {
    "ct-abdomen-organs": (
        "TotalSegmentator test reference files (shared data ct-abdomen/): patient 1 = example_ct_sm + "
        "example_seg (non-contrast CT, 122x101x30 at 3 mm), patient 2 = example_ct_dicom + example_seg_dicom "
        "(contrast-enhanced CT, 512x512x20 at 0.98x0.98x2 mm, no kidneys in the field of view); reference "
        "labels are TotalSegmentator v2 outputs, not manual"
    ),
    "mr-brain-tumor": (
        "TCIA Brain-Tumor-Progression (shared data mr-brain-tumor/): PGBM-001 (2 studies, one DICOM), "
        "PGBM-003 (2 studies), PGBM-006 (1 study; its study without T1post/FLAIR is not used); series "
        "T1post, T1prereg, FLAIR (registered), reference MaskTumor (manual)"
    ),
}
CV_CAVEATS = {
    "ct-abdomen-organs": (
        "two patients only. Fold 0 trains on the contrast-enhanced patient, whose field of view has no "
        "kidneys, so it cannot learn the kidneys (Dice 0 on the held-out patient); fold 1's held-out patient "
        "has no kidneys (Dice undefined, false-positive volumes listed per case). The kidney figures therefore "
        "say nothing about the final model, which learned the kidneys from patient 1. The two patients differ "
        "in contrast phase (aorta 43 vs 151 HU), which the aorta/stomach figures reflect."
    ),
    "mr-brain-tumor": (
        "three patients only (5 studies); each fold trains on two patients. Post-processing (largest "
        "component, min island 100 mm3) was fixed before the cross-validation. The recipe was chosen among "
        "several tried on these same folds (training/recipes/README.md), so the mean is optimistic for a new "
        "patient; the same recipe with another training seed gave 0.392."
    ),
}


def _medsegai(*args: str) -> None:
    """Run the ``medsegai`` command line in a child process (fresh TensorFlow state per run)."""
    command = [sys.executable, "-m", "MedSegAILib.cli", *args]
    print("$ medsegai " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def set_inference_patch(model_folder: Path, patch: list[int] | None) -> None:
    """Write ``patch`` as ``spatial.patch_size`` into ``model_folder/model.json`` (None: keep)."""
    if patch is None:
        return
    card_path = model_folder / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    divisor = int(card["spatial"].get("divisible_by", 1))
    if any(p % divisor for p in patch):
        raise ValueError(f"inference patch {patch} is not divisible by {divisor}")
    card["spatial"]["patch_size"] = list(patch)
    card.setdefault("training", {})["training_patch_size"] = card["training"].get("config", {}).get(
        "spatial", {}).get("patch_size")
    _write_json(card_path, card)


def _recipe(model_id: str) -> dict[str, Any]:
    return json.loads((HERE / f"{model_id}.json").read_text(encoding="utf-8"))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe number: NaN -> None, inf -> "inf", rounded floats."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf"
        return round(value, 4)
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return "inf"
    return value


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return round(sum(finite) / len(finite), 4) if finite else None


def build_dataset(model_id: str, shared: Path, folder: Path) -> Path:
    if model_id == "ct-abdomen-organs":
        return build_ct_dataset(shared, folder)
    return build_mr_dataset(shared, folder)


def _patients(dataset: Path) -> tuple[Any, list[list[str]]]:
    from MedSegAILib.data.dataset import load_dataset

    info = load_dataset(dataset)
    return info, [sorted(cases) for cases in sorted(info.patients().values(), key=lambda c: sorted(c)[0])]


def _train_commands(model_id: str, dataset: Path, recipe: dict[str, Any], work: Path, overrides: dict[str, Any],
                    with_cv: bool) -> list[tuple[Path, list[str]]]:
    """(model folder, ``medsegai train`` arguments) of every fold and of the final model."""
    runs = []
    if with_cv:
        _, patients = _patients(dataset)
        for index, cases in enumerate(patients):
            fold_dir = work / "cv" / f"fold_{index}"
            _write_json(fold_dir / "recipe.json", dict(recipe, test_cases=cases, validation_fraction=0.0, **overrides))
            runs.append((fold_dir / "model", ["train", str(dataset), "-o", str(fold_dir / "model"),
                                              "--config", str(fold_dir / "recipe.json"), "--progress", "none"]))
    final_dir = work / "final"
    _write_json(final_dir / "recipe.json", dict(recipe, validation_fraction=0.0, **overrides))
    runs.append((final_dir / "model", ["train", str(dataset), "-o", str(final_dir / "model"),
                                       "--config", str(final_dir / "recipe.json"), "--progress", "none"]))
    return runs


def run_trainings(runs: list[tuple[Path, list[str]]], jobs: int, model_id: str) -> dict[Path, float]:
    """Run the trainings, ``jobs`` at a time (each in its own process); return seconds per model folder."""
    pending = [run for run in runs if not (run[0] / "model.json").is_file()]
    seconds: dict[Path, float] = {}
    active: list[tuple[Path, subprocess.Popen, float, Any]] = []
    while pending or active:
        while pending and len(active) < max(1, jobs):
            folder, args = pending.pop(0)
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished run of an earlier attempt
            folder.parent.mkdir(parents=True, exist_ok=True)
            log = open(folder.parent / "train.log", "w", encoding="utf-8")
            print("$ medsegai " + " ".join(args) + f"   (log: {folder.parent / 'train.log'})", flush=True)
            process = subprocess.Popen([sys.executable, "-m", "MedSegAILib.cli", *args], stdout=log,
                                       stderr=subprocess.STDOUT)
            active.append((folder, process, time.monotonic(), log))
        time.sleep(2)
        for item in list(active):
            folder, process, started, log = item
            if process.poll() is None:
                continue
            log.close()
            active.remove(item)
            if process.returncode != 0:
                for _, other, _, other_log in active:
                    other.terminate()
                    other.wait()
                    other_log.close()
                raise RuntimeError(f"training {folder} failed (exit {process.returncode}); see {folder.parent / 'train.log'}")
            seconds[folder] = time.monotonic() - started
            set_inference_patch(folder, INFERENCE_PATCH.get(model_id))
            print(f"trained {folder} in {seconds[folder]:.0f} s", flush=True)
    return seconds


def cross_validate(model_id: str, dataset: Path, recipe: dict[str, Any], work: Path,
                   seconds: dict[Path, float]) -> dict[str, Any]:
    """Evaluate the fold models on their held-out patient; returns ``metrics["cross_validation"]``."""
    info, patients = _patients(dataset)
    labels = [label["name"] for label in recipe["labels"]]
    folds = []
    for index, cases in enumerate(patients):
        fold_dir = work / "cv" / f"fold_{index}"
        if not (fold_dir / "report" / "metrics.json").is_file():
            shutil.rmtree(fold_dir / "report", ignore_errors=True)
            _medsegai("evaluate", str(dataset), "--model", str(fold_dir / "model"), "--cases", *cases,
                      "-o", str(fold_dir / "report"), "--backend", "onnx")
        report = json.loads((fold_dir / "report" / "metrics.json").read_text(encoding="utf-8"))
        per_case: dict[str, dict[str, Any]] = {}
        for case in report["cases"]:
            rows = {row["label"]: row for row in case["labels"]}
            per_case[case["case"]] = {}
            for name in labels:
                if name not in rows:
                    continue
                row = rows[name]
                if not row.get("reference_ml"):
                    # structure absent from the reference: Dice/HD95 undefined, report false positives
                    per_case[case["case"]][name] = {"dice": None, "hd95_mm": None, "absent_in_reference": True,
                                                    "false_positive_ml": _clean(float(row.get("prediction_ml") or 0.0))}
                else:
                    per_case[case["case"]][name] = {"dice": _clean(row["dice"]), "hd95_mm": _clean(row["hd95_mm"])}
        fold = {
            "fold": index,
            "test_cases": cases,
            "train_cases": sorted(c.id for c in info.cases if c.id not in cases),
            "dice": {name: _mean([per_case[c][name]["dice"] for c in cases if name in per_case[c]]) for name in labels},
            "hd95_mm": {name: _mean([per_case[c][name]["hd95_mm"] for c in cases if name in per_case[c]])
                        for name in labels},
            "hd95_inf_cases": {name: sum(1 for c in cases if per_case[c].get(name, {}).get("hd95_mm") == "inf")
                               for name in labels},
            "per_case": per_case,
        }
        if fold_dir / "model" in seconds:
            fold["train_seconds"] = round(seconds[fold_dir / "model"], 1)
        fold["mean_dice"] = _mean(list(fold["dice"].values()))
        folds.append(fold)
        print(f"fold {index} (test {', '.join(cases)}): mean Dice {fold['mean_dice']}, "
              + ", ".join(f"{n} {fold['dice'][n]}" for n in labels), flush=True)
    summary_dice = {name: _mean([f["dice"][name] for f in folds]) for name in labels}
    summary_hd95 = {name: _mean([f["hd95_mm"][name] for f in folds]) for name in labels}
    return {
        "method": f"leave-one-patient-out ({len(folds)} folds), {len(info.cases)} cases",
        "evaluated_with": "medsegai evaluate (original image grid, model-card post-processing, ONNX Runtime)",
        "selection": "held-out patient never used for training or model selection (validation = training cases)",
        "dice": summary_dice,
        "hd95_mm": summary_hd95,
        "mean_dice": _mean([f["mean_dice"] for f in folds]),
        "folds": folds,
        "note": "means over folds of the per-fold means over the held-out cases; a structure absent from "
                "a held-out case's reference is left out of the Dice/HD95 means (its false-positive volume is "
                "listed per case); HD95 'inf' (prediction empty) is left out of the HD95 mean and counted",
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def ship(model_id: str, trained: Path, dest_root: Path, recipe: dict[str, Any], cv: dict[str, Any] | None,
         command: str) -> Path:
    """Copy the final model into ``dest_root/model_id`` with the CV figures and provenance."""
    from MedSegAILib.model.modelcard import ModelCard, validate_model_dict

    card = json.loads((trained / "model.json").read_text(encoding="utf-8"))
    metrics = card.setdefault("metrics", {})
    validation = metrics.pop("validation", None)
    if validation is not None:
        validation["note"] = "final model: validation cases are the training cases (no independent data left)"
        metrics["training_fit"] = validation
    if cv is not None:
        metrics["cross_validation"] = dict(cv, caveats=CV_CAVEATS.get(model_id, ""))
    provenance = card.setdefault("provenance", {})
    provenance.update({
        "training_data": TRAINING_DATA.get(model_id, recipe.get("description", "")),
        "data_license": recipe.get("license", ""),
        "citation": recipe.get("citation", ""),
        "reproduce": command,
        "recipe": f"training/recipes/{model_id}.json",
    })
    problems = validate_model_dict(card)
    if problems:
        raise RuntimeError(f"the trained model.json is invalid: {problems}")
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = dest_root / f".{model_id}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in SHIPPED_FILES[1:]:
        if (trained / name).is_file():
            shutil.copy2(trained / name, staging / name)
    _write_json(staging / "model.json", card)
    size = _folder_bytes(staging)
    if size > MAX_FOLDER_BYTES:
        raise RuntimeError(f"model folder is {size / 1e6:.1f} MB, over the 20 MB limit; use a smaller network")
    ModelCard.from_folder(staging)
    final = dest_root / model_id
    old = dest_root / f".{model_id}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"shipped {final} ({size / 1e6:.1f} MB)", flush=True)
    return final


def build_model(model_id: str, shared: Path, work_root: Path, dest_root: Path, skip_cv: bool,
                overrides: dict[str, Any], jobs: int = 1, resume: bool = False,
                recipe_path: Path | None = None, cv_only: bool = False) -> Path | None:
    recipe = json.loads(Path(recipe_path).read_text(encoding="utf-8")) if recipe_path else _recipe(model_id)
    work = work_root / model_id
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "dataset"
    if not (resume and (dataset / "dataset.json").is_file()):
        shutil.rmtree(dataset, ignore_errors=True)
        build_dataset(model_id, shared, dataset)
    print(f"{model_id}: dataset {dataset}", flush=True)
    runs = _train_commands(model_id, dataset, recipe, work, overrides, not skip_cv)
    if cv_only:
        runs = runs[:-1]
    seconds = run_trainings(runs, jobs, model_id)
    cv = None if skip_cv else cross_validate(model_id, dataset, recipe, work, seconds)
    if cv is not None:
        _write_json(work / "cv_results.json", cv)
        print_table(model_id, cv)
    if cv_only:
        return None
    command = f"python training/recipes/build_models.py {model_id}"
    for key, value in overrides.items():
        command += f" --{key.replace('_', '-')} {value}"
    return ship(model_id, work / "final" / "model", dest_root, recipe, cv, command)


def print_table(model_id: str, cv: dict[str, Any]) -> None:
    names = list(cv["dice"])
    print(f"\n{model_id}: {cv['method']}")
    print("fold  test cases            " + "  ".join(f"{n[:12]:>12}" for n in names))
    for fold in cv["folds"]:
        cells = "  ".join(f"{_fmt(fold['dice'][n]):>12}" for n in names)
        print(f"{fold['fold']:>4}  {','.join(fold['test_cases']):<22}{cells}")
    print("mean  Dice                  " + "  ".join(f"{_fmt(cv['dice'][n]):>12}" for n in names))
    print("mean  HD95 (mm)             " + "  ".join(f"{_fmt(cv['hd95_mm'][n]):>12}" for n in names))


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=(*MODEL_IDS, "all"))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="build folder (deleted per model)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where model folders are shipped")
    parser.add_argument("--skip-cv", action="store_true", help="train and ship the final model only")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (quick runs)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="override the recipe's steps per epoch")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at the same time (folds and final model are independent)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the work folder and skip trainings/evaluations already finished there")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="use this recipe instead of training/recipes/<id>.json (experiments)")
    parser.add_argument("--cv-only", action="store_true", help="cross-validate only; train and ship no final model")
    args = parser.parse_args(argv)
    if args.recipe is not None and args.model == "all":
        parser.error("--recipe needs one model id, not 'all'")
    if args.skip_cv and args.cv_only:
        parser.error("--skip-cv and --cv-only exclude each other")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("steps_per_epoch", args.steps_per_epoch)) if v is not None}
    for model_id in MODEL_IDS if args.model == "all" else (args.model,):
        build_model(model_id, args.shared, args.work, args.dest, args.skip_cv, overrides, args.jobs, args.resume,
                    args.recipe, args.cv_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
