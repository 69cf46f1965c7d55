"""Reproduce a shipped model from the shared data: dataset, cross-validation, final training, ship.

    python training/recipes/build_models.py {ct-abdomen-organs,mr-brain-tumor,all} \
        [--shared ../shared/data] [--work build/models] [--dest MedSegAI/Resources/Models] \
        [--skip-cv] [--epochs N] [--steps-per-epoch N]

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

Everything under ``<work>/<id>`` is a build directory and is deleted at the start of a run. The
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


def _medsegai(*args: str) -> None:
    """Run the ``medsegai`` command line in a child process (fresh TensorFlow state per run)."""
    command = [sys.executable, "-m", "MedSegAILib.cli", *args]
    print("$ medsegai " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


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


def cross_validate(model_id: str, dataset: Path, recipe: dict[str, Any], work: Path,
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """Leave-one-patient-out cross-validation; returns the ``metrics["cross_validation"]`` dict."""
    from MedSegAILib.dataset import load_dataset

    info = load_dataset(dataset)
    patients = sorted(info.patients().values(), key=lambda cases: sorted(cases)[0])
    labels = [label["name"] for label in recipe["labels"]]
    folds = []
    for index, cases in enumerate(patients):
        cases = sorted(cases)
        fold_dir = work / "cv" / f"fold_{index}"
        fold_recipe = dict(recipe, test_cases=cases, validation_fraction=0.0)
        fold_recipe.update(overrides)
        _write_json(fold_dir / "recipe.json", fold_recipe)
        started = time.monotonic()
        _medsegai("train", str(dataset), "-o", str(fold_dir / "model"), "--config", str(fold_dir / "recipe.json"),
                  "--progress", "none")
        seconds = time.monotonic() - started
        _medsegai("evaluate", str(dataset), "--model", str(fold_dir / "model"), "--cases", *cases,
                  "-o", str(fold_dir / "report"), "--backend", "onnx")
        report = json.loads((fold_dir / "report" / "metrics.json").read_text(encoding="utf-8"))
        per_case = {}
        for case in report["cases"]:
            rows = {row["label"]: row for row in case["labels"]}
            per_case[case["case"]] = {
                name: {"dice": _clean(rows[name]["dice"]), "hd95_mm": _clean(rows[name]["hd95_mm"])}
                for name in labels if name in rows
            }
        fold = {
            "fold": index,
            "test_cases": cases,
            "train_cases": sorted(c.id for c in info.cases if c.id not in cases),
            "dice": {name: _mean([per_case[c][name]["dice"] for c in cases if name in per_case[c]]) for name in labels},
            "hd95_mm": {name: _mean([per_case[c][name]["hd95_mm"] for c in cases if name in per_case[c]])
                        for name in labels},
            "per_case": per_case,
            "train_seconds": round(seconds, 1),
        }
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
        "note": "means over folds of the per-fold means over the held-out cases; labels absent from a "
                "held-out case (both masks empty) are left out",
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def ship(model_id: str, trained: Path, dest_root: Path, recipe: dict[str, Any], cv: dict[str, Any] | None,
         command: str) -> Path:
    """Copy the final model into ``dest_root/model_id`` with the CV figures and provenance."""
    from MedSegAILib.modelcard import ModelCard, validate_model_dict

    card = json.loads((trained / "model.json").read_text(encoding="utf-8"))
    metrics = card.setdefault("metrics", {})
    validation = metrics.pop("validation", None)
    if validation is not None:
        validation["note"] = "final model: validation cases are the training cases (no independent data left)"
        metrics["training_fit"] = validation
    if cv is not None:
        metrics["cross_validation"] = cv
    provenance = card.setdefault("provenance", {})
    provenance.update({
        "training_data": recipe.get("description", ""),
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
                overrides: dict[str, Any]) -> Path:
    recipe = _recipe(model_id)
    work = work_root / model_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dataset = build_dataset(model_id, shared, work / "dataset")
    print(f"{model_id}: dataset {dataset}", flush=True)
    cv = None if skip_cv else cross_validate(model_id, dataset, recipe, work, overrides)
    if cv is not None:
        _write_json(work / "cv_results.json", cv)
    final_recipe = dict(recipe, validation_fraction=0.0, **overrides)
    _write_json(work / "final" / "recipe.json", final_recipe)
    _medsegai("train", str(dataset), "-o", str(work / "final" / "model"), "--config", str(work / "final" / "recipe.json"),
              "--progress", "none")
    command = f"python training/recipes/build_models.py {model_id}"
    for key, value in overrides.items():
        command += f" --{key.replace('_', '-')} {value}"
    if cv is not None:
        print_table(model_id, cv)
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
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("steps_per_epoch", args.steps_per_epoch)) if v is not None}
    for model_id in MODEL_IDS if args.model == "all" else (args.model,):
        build_model(model_id, args.shared, args.work, args.dest, args.skip_cv, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
