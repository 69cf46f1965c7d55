"""``medsegai train``: the command-line front of :func:`medsegai_training.trainer.train`.

TensorFlow is imported only when the command runs, so ``medsegai --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, TextIO

from MedSegAILib.core.argtypes import number_type
from MedSegAILib.core.errors import CancelledError, MedSegAIInputError

__all__ = ["add_train_command", "run_train", "EpochBarReporter", "quiet_tensorflow"]


_positive_int = number_type(int, 1)
_non_negative_int = number_type(int, 0)


class EpochBarReporter:
    """Progress for training: one line per epoch with a bar, loss and validation Dice (stderr).

    Other stages (``preprocess``, ``export``) are drawn on one updating line.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._start = time.monotonic()
        self._open_line = False

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        fraction = min(1.0, done / total) if total > 0 else 0.0
        filled = int(round(self.width * fraction))
        bar = "#" * filled + "." * (self.width - filled)
        if stage == "train":
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            elapsed = time.monotonic() - self._start
            self.stream.write(f"epoch {done:>4d}/{total:<4d} [{bar}] {message} ({elapsed:.0f} s total)\n")
        else:
            self.stream.write(f"\r{stage:<10} [{bar}] {done}/{total} {message}"[:150].ljust(60))
            self._open_line = done < total
            if not self._open_line:
                self.stream.write("\n")
        self.stream.flush()


def quiet_tensorflow(debug: bool = False) -> None:
    """Keep TensorFlow's C++/absl start-up lines (oneDNN, cpu_feature_guard, absl::InitializeLog) and
    its Python INFO/WARNING logs off the terminal and the Slicer panel's log, unless ``debug``.

    Must run before TensorFlow is imported (it sets ``TF_CPP_MIN_LOG_LEVEL``); a value the user set
    is kept.
    """
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    for name in ("tensorflow", "absl", "tf2onnx", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _reporter(kind: str | None) -> Callable[[str, int, int, str], None] | None:
    if kind is None:
        kind = "bar" if sys.stderr.isatty() else "none"
    if kind == "bar":
        return EpochBarReporter()
    if kind == "json":
        from MedSegAILib.progress import make_reporter

        return make_reporter("json")
    return None


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the ``medsegai`` sub-commands; the handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a dataset folder",
        description=(
            "Train a segmentation model on a MedSegAI dataset folder and write a model folder "
            "(model.keras, model.onnx, model.json) that `medsegai segment` and the Slicer module use."
        ),
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of unexpected errors")
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder (dataset.json, images/, labels/)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL_FOLDER",
                        help="model folder to create (must not exist, unless --resume)")
    parser.add_argument("--init", default=None, metavar="MODEL_ID_OR_FOLDER",
                        help="fine-tune from this model (it is only read, never changed)")
    parser.add_argument("--config", default=None, metavar="FILE", help="training recipe (.json, or .yaml with PyYAML)")
    parser.add_argument("--folds", type=_positive_int, default=None, metavar="K",
                        help="k-fold cross-validation by patient (use with --fold)")
    parser.add_argument("--fold", type=_non_negative_int, default=None, metavar="I",
                        help="validation fold, 0..K-1 (default 0)")
    parser.add_argument("--epochs", type=_positive_int, default=None, metavar="N")
    parser.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                        help="hard cap on the number of training batches")
    parser.add_argument("--strategy", choices=("auto", "mirrored", "multiworker"), default="auto",
                        help="tf.distribute strategy (multiworker reads TF_CONFIG)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in MODEL_FOLDER")
    parser.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="with --init: keep the parent's encoder weights fixed (default: train the whole network)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="write model.keras only (no model.onnx); --backend auto then uses TensorFlow")
    parser.add_argument("--plan", action="store_true",
                        help="with --init: print the fine-tuning plan (steps, learning rate, early stopping, "
                             "estimated time) as JSON on stdout and exit without training")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                        help="progress display (default: bar on a terminal)")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``medsegai train``; returns the exit code.

    User problems raise :class:`MedSegAIInputError` (``medsegai`` prints ``error: ...``, exit 2);
    SIGTERM stops after the current batch and returns 130 with a message saying whether
    ``--resume`` can continue the run.
    """
    from pathlib import Path

    if args.fold is not None and args.folds is None:
        raise MedSegAIInputError("--fold needs --folds (e.g. --folds 5 --fold 0).")
    if args.folds is not None and args.folds < 2:
        raise MedSegAIInputError(f"--folds {args.folds} is too few; use 2 or more.")
    if args.folds is not None and args.fold is not None and args.fold >= args.folds:
        raise MedSegAIInputError(f"--fold {args.fold} does not exist with --folds {args.folds}; use 0..{args.folds - 1}.")
    if args.freeze_encoder and not args.init:
        raise MedSegAIInputError("--freeze-encoder needs --init (the model whose encoder to keep).")
    if args.plan and not args.init:
        raise MedSegAIInputError("--plan needs --init (it shows how that model would be fine-tuned).")
    if not (Path(args.dataset) / "dataset.json").is_file():
        raise MedSegAIInputError(
            f"{args.dataset} is not a MedSegAI dataset folder (no dataset.json); create one with "
            "`medsegai dataset add` or `medsegai dataset import-nnunet`."
        )

    if args.plan:
        from .finetune import fine_tune_plan
        from .trainer import parent_card

        plan = fine_tune_plan(args.dataset, parent_card(args.init), max_steps=args.max_steps,
                              freeze_encoder=args.freeze_encoder)
        print(json.dumps({**plan.to_dict(), "summary": plan.describe()}))
        return 0

    quiet_tensorflow(debug=bool(getattr(args, "debug", False)))
    from .trainer import ExportError, resolve_config, train

    overrides = {"epochs": args.epochs, "max_steps": args.max_steps, "folds": args.folds,
                 "fold": (0 if args.folds is not None and args.fold is None else args.fold)}
    config: Any = None
    if args.config is not None or any(v is not None for v in overrides.values()) or not args.resume:
        parent = None
        if args.init:
            from .trainer import parent_card

            parent = parent_card(args.init)
        config = resolve_config(args.config, parent=parent, dataset=args.dataset,
                                freeze_encoder=args.freeze_encoder, **overrides)

    cancelled = {"flag": False}

    def handler(signum: int, frame: Any) -> None:
        cancelled["flag"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM,)}
    try:
        output = train(
            args.dataset,
            args.output,
            config=config,
            init=args.init,
            resume=args.resume,
            progress=_reporter(args.progress),
            strategy=args.strategy,
            freeze_encoder=args.freeze_encoder,
            should_cancel=lambda: cancelled["flag"],
            onnx=not args.no_onnx,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)  # the run is kept; the message says how to finish it
        return 1
    except CancelledError as e:
        print(f"error: {e}", file=sys.stderr)  # says whether --resume can continue the run
        return 130
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    card = json.loads((output / "model.json").read_text(encoding="utf-8")) if (output / "model.json").is_file() else {}
    skipped = (card.get("provenance") or {}).get("onnx_skipped")
    if skipped:
        print(f"warning: no model.onnx: {skipped}", file=sys.stderr)
    validation = card.get("metrics", {}).get("validation", {})
    mean = validation.get("mean_dice")
    summary = f"wrote model folder {output}"
    if card:
        summary += f" ({card.get('id')} {card.get('version')})"
    if mean is not None:
        summary += f"; validation mean Dice {mean:.3f}"
    print(summary, file=sys.stderr)
    return 0
