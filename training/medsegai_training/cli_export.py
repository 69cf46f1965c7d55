"""``medsegai export`` and ``medsegai quantize``: the command-line fronts of
:func:`medsegai_training.deploy.export_deployment` and :func:`medsegai_training.quantize.quantize_model`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from MedSegAILib.core.argtypes import number_type

__all__ = ["add_export_command", "add_quantize_command"]

_positive_int = number_type(int, 1)
_drop = number_type(float, 0, below=1)


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


def add_quantize_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``quantize`` to the ``medsegai`` sub-commands."""
    from .quantize import MAX_INT8_DICE_DROP

    parser = subparsers.add_parser(
        "quantize",
        help="write a validated int8 ONNX file beside a model's model.onnx (used by segment --precision auto|int8)",
        description=(
            "Quantise MODEL's model.onnx to int8 with ONNX Runtime (static, calibrated on the windows the engine feeds "
            "the network on cases of --data), segment the same cases with both, and write model.int8.onnx and its "
            "per-label Dice record (metrics.int8 in model.json) only if no label loses more than --max-dice-drop."
        ),
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of unexpected errors")
    parser.add_argument("model", metavar="MODEL", help="model id or folder (needs model.onnx; written in place)")
    parser.add_argument("--data", required=True, metavar="DATASET", help="dataset folder of real cases for calibration and the check")
    parser.add_argument("--cases", type=_positive_int, default=2, metavar="N", help="cases of --data to use (default 2)")
    parser.add_argument("--max-dice-drop", type=_drop, default=MAX_INT8_DICE_DROP, metavar="D",
                        help=f"largest Dice loss allowed on any label (default {MAX_INT8_DICE_DROP})")
    parser.set_defaults(func=run_quantize)
    return parser


def run_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_model

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    record = quantize_model(args.model, args.data, max_cases=args.cases, max_dice_drop=args.max_dice_drop, progress=say)
    speed = record["model_seconds"]
    say(f"int8 validated on {len(record['cases'])} case(s): worst Dice change {record['worst_change']:+.4f} "
        f"(allowed -{record['max_dice_drop']:g}); network {speed['fp32']:.1f} s fp32 -> {speed['int8']:.1f} s int8")
    return 0
