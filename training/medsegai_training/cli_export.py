"""``medsegai export``: the command-line front of :func:`medsegai_training.deploy.export_deployment`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from MedSegAILib.argtypes import number_type

__all__ = ["add_export_command"]

_positive_int = number_type(int, 1)


def add_export_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to the ``medsegai`` sub-commands."""
    from .deploy import FORMATS, QUANTIZATIONS

    parser = subparsers.add_parser(
        "export",
        help="export a model as a TF Serving SavedModel, TFLite or ONNX, checked against Keras",
        description=(
            "Write MODEL as a deployment format into the new folder OUT (model.json, NOTICE, README.md and the "
            "graph). The export segments cases of --data through the engine and must reproduce the Keras labels "
            "(float formats) or keep the Dice within 0.02 of the float model (int8)."
        ),
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of unexpected errors")
    parser.add_argument("model", metavar="MODEL", help="model id or folder (needs model.keras)")
    parser.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                        help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to create")
    parser.add_argument("--quantize", default=None, metavar="TYPE", help=f"TFLite only: {' or '.join(QUANTIZATIONS)}")
    parser.add_argument("--data", default=None, metavar="DATASET",
                        help="dataset folder of real cases for the check and the int8 calibration")
    parser.add_argument("--cases", type=_positive_int, default=2, metavar="N", help="cases of --data to check on (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT once the new export passed its check")
    parser.add_argument("--force", action="store_true", help="write an int8 model even if its Dice drops by more than 0.02")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from .deploy import export_deployment

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    check = export_deployment(
        args.model, args.fmt, args.output, data=args.data, quantize=args.quantize, max_cases=args.cases,
        overwrite=args.overwrite, force=args.force, progress=say,
    )
    summary = (f"wrote {args.output} ({check['format']} {check['quantize']}): labels identical to Keras on "
               f"{100 * check['voxel_agreement']:.3f} % of voxels")
    if check.get("dice_change") is not None:
        summary += f"; Dice {check['dice_float']:.4f} -> {check['dice_export']:.4f} ({check['dice_change']:+.4f})"
    say(summary)
    return 0
