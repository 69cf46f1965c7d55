"""Build the training dataset folders of the shipped models from the shared real data.

    python training/recipes/build_datasets.py {ct-abdomen-organs,mr-brain-tumor,all} \
        [--shared ../shared/data] [--output build/datasets]

Writes ``<output>/<model id>/`` in the MedSegAI dataset format (``dataset.json``, ``images/``,
``labels/``) with :func:`MedSegAILib.data.dataset.add_case`, the same function the Slicer export and
``medsegai dataset add`` use. Patient keys (stored only as salted hashes) are the patient folder
names, so cross-validation keeps every study of a patient on one side:

- ``ct-abdomen-organs``: two CT patients from ``ct-abdomen/`` (TotalSegmentator test files,
  Apache-2.0). ``example_ct_sm`` (122x101x30 at 3 mm) is voxel for voxel slices 82-111 of the
  unlabelled ``example_ct`` (same patient, so it adds no independent case); ``example_ct_dicom``
  (512x512x20) is a different patient. Its labels ``example_seg_dicom.nii.gz`` cover the same
  physical grid with the y axis stored in reverse, so they are resampled (nearest neighbour,
  identical voxel centres) onto the DICOM grid. TotalSegmentator ids become the model's labels
  (liver 5 -> 1, spleen 1 -> 2, kidney_left 3 -> 3, kidney_right 2 -> 4, stomach 6 -> 5,
  aorta 52 -> 6); every other structure becomes background.
- ``mr-brain-tumor``: every study of ``mr-brain-tumor/`` (TCIA Brain-Tumor-Progression,
  CC BY) that has all of ``T1post``, ``T1prereg`` and ``FLAIR``; the label is ``MaskTumor``
  (tumour = 1). ``PGBM-006/1997-02-11`` has no T1post/FLAIR and is skipped. The recipe's
  ``channels`` picks which of the three series the model uses.

An existing dataset folder is never modified: the command refuses it (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUTPUT = REPO_ROOT / "build" / "datasets"

CT_LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "stomach": 5, "aorta": 6}
# TotalSegmentator v2 CT ids (ct-abdomen/total_ct_labels.json) of each model label
CT_SOURCE_IDS = {"liver": 5, "spleen": 1, "kidney_left": 3, "kidney_right": 2, "stomach": 6, "aorta": 52}
MR_CHANNELS = ("T1post", "T1prereg", "FLAIR")
MR_LABELS = {"tumor": 1}
MODEL_IDS = ("ct-abdomen-organs", "mr-brain-tumor")

__all__ = ["build_ct_dataset", "build_mr_dataset", "build_dataset", "main", "CT_LABELS", "MR_LABELS", "MR_CHANNELS"]


def _refuse_existing(folder: Path) -> None:
    if folder.exists():
        from MedSegAILib.core.errors import MedSegAIInputError

        raise MedSegAIInputError(f"dataset folder {folder} already exists; delete it to rebuild or choose another --output.")


def _map_totalsegmentator(label_array: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids -> model label values (uint8, other structures -> 0)."""
    lookup = np.zeros(int(max(label_array.max(), 255)) + 1, dtype=np.uint8)
    for name, source in CT_SOURCE_IDS.items():
        lookup[source] = CT_LABELS[name]
    return lookup[label_array.astype(np.int64)]


def _resample_nearest(label, reference):
    """``label`` (Volume) resampled onto ``reference``'s grid, nearest neighbour."""
    import SimpleITK as sitk

    from MedSegAILib.core.image import Volume

    moved = sitk.Resample(label.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return Volume.from_sitk(moved)


def build_ct_dataset(shared: Path, output: Path) -> Path:
    """Write the ``ct-abdomen-organs`` dataset (2 patients, 2 cases) to ``output``; return it."""
    from MedSegAILib.data.dataset import add_case
    from MedSegAILib.io.imageio import read_volume

    _refuse_existing(output)
    source = Path(shared) / "ct-abdomen"
    image = read_volume(source / "example_ct_sm.nii.gz")
    label = read_volume(source / "example_seg.nii.gz")
    add_case(output, [image], label.with_array(_map_totalsegmentator(label.array)), ["CT"], CT_LABELS,
             patient_key="ct-abdomen/example_ct")
    image = read_volume(source / "example_ct_dicom")
    label = _resample_nearest(read_volume(source / "example_seg_dicom.nii.gz"), image)
    add_case(output, [image], label.with_array(_map_totalsegmentator(label.array)), ["CT"], CT_LABELS,
             patient_key="ct-abdomen/example_ct_dicom")
    return output


def _series_path(study: Path, series: str) -> Path | None:
    for candidate in (study / f"{series}.nrrd", study / "dicom" / series):
        if candidate.exists():
            return candidate
    return None


def build_mr_dataset(shared: Path, output: Path, channels: Sequence[str] = MR_CHANNELS) -> Path:
    """Write the ``mr-brain-tumor`` dataset (one case per complete study) to ``output``; return it."""
    from MedSegAILib.data.dataset import add_case
    from MedSegAILib.io.imageio import read_volume

    _refuse_existing(output)
    root = Path(shared) / "mr-brain-tumor"
    added = 0
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        for study in sorted(s for s in patient.iterdir() if s.is_dir()):
            paths = [_series_path(study, name) for name in (*channels, "MaskTumor")]
            if any(p is None for p in paths):
                continue
            volumes = [read_volume(p) for p in paths]
            images, mask = volumes[:-1], volumes[-1]
            tumour = (np.asarray(mask.array) > 0).astype(np.uint8)
            add_case(output, images, mask.with_array(tumour), list(channels), MR_LABELS, patient_key=patient.name)
            added += 1
    if not added:
        from MedSegAILib.core.errors import MedSegAIInputError

        raise MedSegAIInputError(f"no study under {root} has all of {', '.join(channels)} and MaskTumor; check --shared.")
    return output


def build_dataset(model_id: str, shared: Path = DEFAULT_SHARED, output_root: Path = DEFAULT_OUTPUT) -> Path:
    """Build the dataset of ``model_id`` into ``output_root/model_id``; return the folder."""
    if model_id == "ct-abdomen-organs":
        return build_ct_dataset(shared, Path(output_root) / model_id)
    if model_id == "mr-brain-tumor":
        return build_mr_dataset(shared, Path(output_root) / model_id)
    raise ValueError(f"model_id must be one of {MODEL_IDS}, got {model_id!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=(*MODEL_IDS, "all"))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the dataset folders")
    args = parser.parse_args(argv)
    from MedSegAILib.core.errors import MedSegAIInputError

    try:
        for model_id in MODEL_IDS if args.model == "all" else (args.model,):
            folder = build_dataset(model_id, args.shared, args.output)
            print(f"{model_id}: {folder}")
    except MedSegAIInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
