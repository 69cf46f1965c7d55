"""``medsegai dataset ...`` and ``medsegai evaluate`` subcommands.

Each subparser sets ``func=<handler(args) -> int>``. Handlers raise
:class:`MedSegAILib.core.errors.MedSegAIInputError` for user problems (``MedSegAILib.cli.main`` prints
``error: ...`` and exits 2). TensorFlow is never imported here; the evaluate handler imports the
engine only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from MedSegAILib.model.backends import BACKENDS, DEVICES
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.protocol import EXIT_OK, EXIT_USAGE

__all__ = ["add_dataset_commands", "add_evaluate_command", "run_dataset_check", "run_dataset_import",
           "run_dataset_add", "run_evaluate"]


def add_dataset_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dataset check|import-nnunet|add`` to a ``medsegai`` subparsers object."""
    parser = subparsers.add_parser(
        "dataset", help="inspect, validate and fill training dataset folders",
        description="Inspect, validate and fill MedSegAI training dataset folders.",
    )
    actions = parser.add_subparsers(dest="dataset_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    check = actions.add_parser(
        "check", help="list cases, channels, labels, voxel counts and every problem (exit 2 on errors)",
        description="Open every file of a dataset and report problems per case and file.",
    )
    check.add_argument("dataset", metavar="DATASET", help="dataset folder (holding dataset.json)")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    check.set_defaults(func=run_dataset_check)

    imp = actions.add_parser(
        "import-nnunet", help="import an nnU-Net v2 / Decathlon raw folder into a new dataset",
        description="Import the training cases of an nnU-Net v2 or Medical Segmentation Decathlon raw folder.",
    )
    imp.add_argument("raw", metavar="RAW", help="raw folder with dataset.json, imagesTr, labelsTr")
    imp.add_argument("dataset", metavar="DATASET", help="new dataset folder to create")
    imp.set_defaults(func=run_dataset_import)

    add = actions.add_parser(
        "add", help="add one case (images + labelmap); the same code as the Slicer export",
        description="Add one case to a dataset folder (created when absent). Patient keys are stored hashed.",
    )
    add.add_argument("dataset", metavar="DATASET", help="dataset folder")
    add.add_argument("--images", nargs="+", required=True, metavar="IMG",
                     help="one image file or DICOM folder per channel, in channel order")
    add.add_argument("--label", required=True, metavar="LABEL", help="labelmap file on the first image's grid")
    add.add_argument("--patient", metavar="KEY", default=None,
                     help="patient key (stored only as a salted hash) so that splits keep a patient together")
    add.add_argument("--channels", nargs="+", metavar="NAME", default=None,
                     help="channel names for a new dataset (default: the dataset's, else channel_0, ...)")
    add.add_argument("--labels", metavar="JSON", default=None,
                     help="label names and values for a new dataset, JSON text or file, e.g. '{\"liver\": 1}'")
    add.set_defaults(func=run_dataset_add)
    return parser


def add_evaluate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate --model M DATASET [--cases ...] -o REPORT_DIR``."""
    parser = subparsers.add_parser(
        "evaluate", help="Dice, HD95 and volume error of a model on dataset cases, with a PNG overlay",
        description="Segment dataset cases with a model and write metrics.csv, metrics.json and best_worst.png.",
    )
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder")
    parser.add_argument("--model", "-m", required=True, metavar="MODEL", help="model id or model folder")
    parser.add_argument("--cases", nargs="+", default=None, metavar="CASE", help="case ids (default: all)")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT_DIR",
                        help="new folder for the report (never overwritten)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.set_defaults(func=run_evaluate)
    return parser


def run_dataset_check(args: argparse.Namespace) -> int:
    """Print the dataset report; exit 2 when it has errors."""
    from MedSegAILib.data.dataset import check_dataset

    report = check_dataset(args.dataset)
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    if not report.ok:
        print(f"error: dataset {report.dataset_dir} has {len(report.errors)} error(s); "
              f"fix or remove the listed cases.", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def run_dataset_import(args: argparse.Namespace) -> int:
    from .dataset_tools import import_nnunet

    result = import_nnunet(args.raw, args.dataset)
    print(f"imported {len(result.case_ids)} case(s) from a {result.layout} folder into {result.dataset_dir} "
          f"(channels: {', '.join(result.channels)}; labels: "
          f"{', '.join(f'{n}={v}' for n, v in result.labels.items())})")
    return EXIT_OK


def run_dataset_add(args: argparse.Namespace) -> int:
    from MedSegAILib.data.dataset import load_dataset

    from .dataset_tools import add_from_files

    case_id = add_from_files(args.dataset, args.images, args.label, patient_key=args.patient,
                             channel_names=args.channels, labels=args.labels)
    count = len(load_dataset(args.dataset).cases)
    print(f"added {case_id} to {args.dataset} ({count} case(s) in the dataset)")
    return EXIT_OK


def _format_value(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model

    if args.cases is not None and not args.cases:
        raise MedSegAIInputError("--cases needs at least one case id.")
    report = evaluate_model(args.model, args.dataset, args.cases, args.output,
                            backend=args.backend, device=args.device)
    print(f"{'label':<24s} {'Dice':>7s} {'HD95 mm':>9s} {'vol err mL':>11s} cases")
    for name, row in report["summary"].items():
        print(f"{name:<24s} {_format_value(row['dice_mean']):>7s} {_format_value(row['hd95_mm_mean'], 2):>9s} "
              f"{_format_value(row['volume_error_ml_mean'], 2):>11s} {row['cases']}")
    print(f"best case: {report['best_case']}   worst case: {report['worst_case']}")
    for path in report["files"].values():
        print(f"wrote {path}")
    return EXIT_OK
