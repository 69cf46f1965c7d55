"""The ``medsegai`` command line.

Exit codes: 0 done; 2 bad usage or bad input (one ``error:`` line on stderr); 1 unexpected failure
(traceback only with ``--debug``); 130 cancelled (Ctrl-C or SIGTERM). Failed or cancelled runs leave
no output file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import Any, Sequence

from . import __version__
from .model.backends import BACKENDS, DEVICES
from .model.precision import PRECISIONS
from .core.argtypes import number_type
from .core.errors import CancelledError, MedSegAIInputError
from .protocol import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, encode_error

__all__ = ["main", "build_parser"]

class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, encode_error(f"{message} (see `{self.prog} --help`)") + "\n")


class _CancelFlag:
    """Set by SIGTERM/SIGINT; polled by the engine between batches."""

    def __init__(self) -> None:
        self.cancelled = False

    def __call__(self) -> bool:
        return self.cancelled

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.cancelled = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)


_overlap = number_type(float, 0, below=1)
_positive_int = number_type(int, 1)
_non_negative = number_type(float, 0)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of unexpected errors")
    return common


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """How the network runs: the options ``segment`` and ``rank`` share (``EngineOptions.inference_arguments``)."""
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="int8: the folder's validated int8 ONNX file (medsegai quantize); auto: int8 when the "
                             "folder has one and the run is on the CPU, else fp32 (default auto)")
    parser.add_argument("--overlap", type=_overlap, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--tta", action="store_true",
                        help="flip test-time augmentation (an uncertainty map is then of the flip mean)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, metavar="N", help="windows per network call")


def _add_segment_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "segment",
        parents=[_common_options()],
        help="segment one case",
        description="Segment one case: one INPUT per model channel, in the model's channel order.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help=".nrrd, .nii, .nii.gz, .mha/.mhd file or DICOM folder (one per model channel)")
    parser.add_argument("-o", "--output", default=None, metavar="OUTPUT",
                        help=".seg.nrrd (Slicer segmentation), .dcm (DICOM SEG) or .nrrd/.nii.gz/.nii labelmap "
                             "(optional with --dicomweb)")
    parser.add_argument("--dicom-seg", default=None, metavar="FILE.dcm",
                        help="also write a DICOM Segmentation referencing the input DICOM series")
    parser.add_argument("--model", default=None, metavar="ID_OR_FOLDER", help="model id or folder (default: the default model)")
    parser.add_argument("--series", action="append", default=None, metavar="UID",
                        help="DICOM SeriesInstanceUID when a folder or study holds several series "
                             "(with --dicomweb: once per model channel, in channel order)")
    web = parser.add_argument_group(
        "PACS (DICOMweb)",
        "credentials come from MEDSEGAI_DICOMWEB_USER/MEDSEGAI_DICOMWEB_PASSWORD or a netrc file (~/.netrc or $NETRC)",
    )
    web.add_argument("--dicomweb", default=None, metavar="URL",
                     help="DICOMweb service root: retrieve the study's series, segment, store the DICOM SEG back")
    web.add_argument("--study", default=None, metavar="UID", help="StudyInstanceUID to segment (with --dicomweb)")
    web.add_argument("--no-verify-tls", action="store_true", help="do not verify the server's TLS certificate")
    _add_inference_options(parser)
    parser.add_argument("--measurements", default=None, metavar="FILE", help="write per-segment measurements (.csv or .json)")
    parser.add_argument("--report", default=None, metavar="FILE.pdf",
                        help="also write a one-page PDF case report (model, input, views, measurements, validation)")
    parser.add_argument("--report-identify", action="store_true",
                        help="put the DICOM input's patient name, id and birth date into the report (off by default)")
    parser.add_argument("--uncertainty", default=None, metavar="FILE",
                        help="also write the uint8 uncertainty map on the input's grid (.nrrd/.nii.gz): "
                             "0 certain ... 255 maximal (normalised entropy of the softmax; with --tta, of its flip mean)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                        help="progress display (default: bar on a terminal)")
    post = parser.add_argument_group("post-processing (defaults come from the model)")
    post.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                      help="keep only the largest connected component of each label")
    post.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None, help="fill holes inside each label")
    post.add_argument("--min-island-mm3", type=_non_negative, default=None, metavar="MM3", help="remove islands smaller than this")
    post.add_argument("--no-postprocessing", action="store_true", help="plain argmax, no post-processing")
    parser.set_defaults(func=_run_segment)


def _postprocessing_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.no_postprocessing:
        return {"largest_component": False, "fill_holes": False, "min_island_mm3": 0}
    overrides: dict[str, Any] = {}
    if args.largest_component is not None:
        overrides["largest_component"] = args.largest_component
    if args.fill_holes is not None:
        overrides["fill_holes"] = args.fill_holes
    if args.min_island_mm3 is not None:
        overrides["min_island_mm3"] = args.min_island_mm3
    return overrides or None


def _run_segment(args: argparse.Namespace) -> int:
    from .inference.segment import SegmentOptions
    from .inference.pipeline import run_segmentation
    from .progress import make_reporter

    cancel = _CancelFlag()
    cancel.install()
    options = SegmentOptions(
        overlap=args.overlap, tta=args.tta, batch_size=args.batch_size,
        postprocessing=_postprocessing_overrides(args), precision=args.precision,
    )
    common = dict(
        model=args.model, backend=args.backend, device=args.device, options=options, measurements=args.measurements,
        overwrite=args.overwrite, progress=make_reporter(args.progress), should_cancel=cancel,
        report=args.report, report_identify=args.report_identify,
    )
    if args.dicomweb is not None or args.study is not None:
        if args.uncertainty is not None:
            raise MedSegAIInputError("--uncertainty is not available with --dicomweb; segment the downloaded series as files instead.")
        return _run_segment_dicomweb(args, common)
    if not args.inputs:
        raise MedSegAIInputError("no INPUT given; pass one file or DICOM folder per model channel (or --dicomweb URL --study UID).")
    if args.output is None and args.dicom_seg is None:
        raise MedSegAIInputError("no output given; pass -o OUTPUT (.seg.nrrd, .dcm, .nrrd, .nii.gz).")
    if args.series and len(args.series) > 1:
        raise MedSegAIInputError("--series may be given once for DICOM folders (it applies to every folder).")
    result = run_segmentation(
        args.inputs, args.output, series_uid=args.series[0] if args.series else None, dicom_seg=args.dicom_seg,
        uncertainty=args.uncertainty, **common
    )
    found = [row["name"] for row in result.measurements if row.get("voxel_count", 0) > 0]
    written = " and ".join(str(p) for p in (result.output, result.dicom_seg, result.uncertainty_path) if p is not None)
    run_on = f"{result.backend}{' int8' if result.precision == 'int8' else ''}, {result.device}"
    summary = f"wrote {written} with model {result.card.id} {result.card.version} ({run_on})"
    if args.measurements:
        summary += f"; measurements in {args.measurements}"
        if not found:
            summary += "; no label was found"
    if args.report:
        summary += f"; report in {args.report}"
    print(summary, file=sys.stderr)
    return EXIT_OK


def _run_segment_dicomweb(args: argparse.Namespace, common: dict[str, Any]) -> int:
    from .pacs.dicomweb import connect, segment_study

    if args.dicomweb is None or args.study is None:
        raise MedSegAIInputError("--dicomweb URL and --study UID go together; pass both.")
    if args.inputs:
        raise MedSegAIInputError("with --dicomweb the images come from the server; drop the INPUT arguments.")
    if args.dicom_seg is not None:
        raise MedSegAIInputError("with --dicomweb the DICOM SEG is stored on the server; drop --dicom-seg (use -o for a local copy).")
    connection = connect(args.dicomweb, verify_tls=not args.no_verify_tls)
    stored = segment_study(connection, args.study, series=args.series, output=args.output, **common)
    summary = (
        f"stored DICOM SEG series {stored.seg_series_uid} in the study on {connection.display_url} "
        f"with model {stored.result.card.id} {stored.result.card.version}"
    )
    if args.output:
        summary += f"; wrote {args.output}"
    print(summary, file=sys.stderr)
    return EXIT_OK


def _add_rank_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rank",
        parents=[_common_options()],
        help="segment several cases and order them by expected error (which case to correct next)",
        description="Segment each case and write a CSV ordered by expected error (highest first), from the "
                    "model's uncertainty. One-channel models: each INPUT is an image or DICOM series folder. "
                    "Several channels: each INPUT is a case folder holding <channel>.nrrd/.nii.gz/... or <channel>/ "
                    "DICOM folders named after the model's channels.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="one case per INPUT")
    parser.add_argument("-o", "--output", required=True, metavar="RANKING.csv", help="the ranking to write")
    parser.add_argument("--model", default=None, metavar="ID_OR_FOLDER", help="model id or folder (default: the default model)")
    _add_inference_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ranking")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                        help="progress display (default: bar on a terminal)")
    parser.set_defaults(func=_run_rank)


def _run_rank(args: argparse.Namespace) -> int:
    from .inference.segment import SegmentOptions
    from .progress import make_reporter
    from .inference.ranking import rank_cases

    cancel = _CancelFlag()
    cancel.install()
    options = SegmentOptions(overlap=args.overlap, tta=args.tta, batch_size=args.batch_size, precision=args.precision)
    rows = rank_cases(args.inputs, args.output, model=args.model, backend=args.backend, device=args.device,
                      options=options, overwrite=args.overwrite, progress=make_reporter(args.progress), should_cancel=cancel)
    first = rows[0]
    print(f"wrote {args.output}: {len(rows)} case(s); correct first: case {first['case']} ({first['input']}, "
          f"expected error {first['expected_error']:.3f})", file=sys.stderr)
    return EXIT_OK


def _add_watch_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch",
        parents=[_common_options()],
        help="segment new studies on a PACS (DICOMweb) as they arrive",
        description="Poll a DICOMweb server for studies of one modality, segment each once, store the DICOM SEG "
                    "in the study. Credentials: MEDSEGAI_DICOMWEB_USER/MEDSEGAI_DICOMWEB_PASSWORD or a netrc file.",
    )
    parser.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb service root")
    parser.add_argument("--modality", default=None, metavar="MODALITY", help="e.g. CT (default: the model's)")
    parser.add_argument("--model", default=None, metavar="ID_OR_FOLDER",
                        help="one-channel model (default: the installed model for the modality)")
    parser.add_argument("--since", default=None, metavar="DATE", help="only studies from this date on (YYYY-MM-DD)")
    parser.add_argument("--state", default="medsegai-watch.json", metavar="FILE",
                        help="state file of the studies already handled (default: medsegai-watch.json)")
    parser.add_argument("--interval", type=number_type(float, 0.1), default=30.0, metavar="S", help="seconds between polls (default 30)")
    parser.add_argument("--max-studies", type=_positive_int, default=None, metavar="N", help="stop after N segmented studies")
    parser.add_argument("--duration", type=number_type(float, 0.1), default=None, metavar="S", help="stop after S seconds")
    parser.add_argument("--no-verify-tls", action="store_true", help="do not verify the server's TLS certificate")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.set_defaults(func=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from .pacs.dicomweb import connect
    from .pacs.watch import watch

    cancel = _CancelFlag()
    cancel.install()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    connection = connect(args.dicomweb, verify_tls=not args.no_verify_tls)
    watch(
        connection, modality=args.modality, model=args.model, state_path=args.state, since=args.since,
        interval_s=args.interval, max_studies=args.max_studies, duration_s=args.duration, should_stop=cancel,
        log=log, segment_options={"backend": args.backend, "device": args.device},
    )
    return EXIT_OK


def _add_report_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        parents=[_common_options()],
        help="write the PDF case report of an existing segmentation",
        description="Write the one-page PDF case report for INPUT(s) and a label map made (and maybe corrected) "
        "with MODEL: what `segment --report` writes, for a segmentation edited afterwards.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="the image(s) that were segmented, in the model's channel order")
    parser.add_argument("--labels", required=True, metavar="LABELS", help="label map on the first input's grid (.nrrd, .nii.gz, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.pdf", help="the report to write")
    parser.add_argument("--model", default=None, metavar="ID_OR_FOLDER", help="the model that made the labels (default: the default model)")
    parser.add_argument("--series", default=None, metavar="UID", help="DICOM SeriesInstanceUID when a folder holds several series")
    parser.add_argument("--report-identify", action="store_true",
                        help="put the DICOM input's patient name, id and birth date into the report (off by default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report.case_report import report_from_files

    path = report_from_files(args.inputs, args.labels, args.output, model=args.model, series_uid=args.series,
                             identify=args.report_identify, overwrite=args.overwrite)
    print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def _add_models_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", parents=[_common_options()], help="list installed models", description="List installed models.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .model.modelcard import DEFAULT_MODEL_ID, list_models

    cards = list_models()
    if args.json:
        print(json.dumps([card.summary() for card in cards], indent=2))
        return EXIT_OK
    if not cards:
        print("no models installed (search path: see `medsegai models --help`)")
        return EXIT_OK
    for card in cards:
        default = " (default)" if card.id == DEFAULT_MODEL_ID else ""
        print(f"{card.id} {card.version}{default}: {card.name}")
        print(f"    channels: {', '.join(card.channel_names)}")
        print(f"    labels:   {', '.join(label.name for label in card.labels)}")
        print(f"    mode:     {card.spatial.mode}   folder: {card.folder}")
    return EXIT_OK


def _add_training_commands(subparsers: Any) -> None:
    """``train``, ``export``, ``quantize``, ``evaluate`` and ``dataset`` come from the training package when it is installed."""
    try:
        from medsegai_training.cli_data import add_dataset_commands, add_evaluate_command
        from medsegai_training.cli_export import add_export_command, add_quantize_command
        from medsegai_training.cli_train import add_train_command
    except ImportError as e:
        missing = str(e)
        for name in ("train", "export", "quantize", "evaluate", "dataset"):
            parser = subparsers.add_parser(name, help=f"{name} (needs the training package)", add_help=False)
            parser.add_argument("rest", nargs=argparse.REMAINDER)
            parser.set_defaults(func=lambda args, why=missing: _training_missing(why))
        return
    add_train_command(subparsers)
    add_export_command(subparsers)
    add_quantize_command(subparsers)
    add_evaluate_command(subparsers)
    add_dataset_commands(subparsers)


def _training_missing(why: str) -> int:
    raise MedSegAIInputError(
        f"the training package is not available ({why}); install it with `pip install -e .[train]` from the MedSegAI folder."
    )


def build_parser() -> argparse.ArgumentParser:
    """The full ``medsegai`` parser."""
    parser = _Parser(prog="medsegai", description="MedSegAI: AI segmentation of CT and MRI volumes.")
    parser.add_argument("--version", action="version", version=f"medsegai {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_segment_command(subparsers)
    _add_rank_command(subparsers)
    _add_watch_command(subparsers)
    _add_report_command(subparsers)
    _add_models_command(subparsers)
    _add_training_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except MedSegAIInputError as e:
        print(encode_error(str(e)), file=sys.stderr)
        return EXIT_USAGE
    except (CancelledError, KeyboardInterrupt):
        print(encode_error("cancelled; no output was written."), file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:  # the reader went away (e.g. `medsegai models | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:  # anything else is a bug: say so, keep the traceback for --debug
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(encode_error(f"unexpected failure ({type(e).__name__}: {e}); rerun with --debug and report it."), file=sys.stderr)
        return EXIT_FAILURE


def run() -> None:
    """Console-script entry point: ``main()``, then exit with its code.

    A cancelled run exits at once, skipping interpreter teardown (which can take seconds with the
    inference libraries loaded), so Cancel in Slicer stops the engine within its two seconds. Its
    temporary files were already removed on the way out of the pipeline.
    """
    code = main()
    if code == EXIT_CANCELLED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
