"""The engine protocol (MedSegAILib.protocol): both sides read the same stages, lines and exit codes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from MedSegAILib import protocol
from MedSegAILib.cli import main
from MedSegAILib.slicer_bridge.engine_process import EngineProcess, engine_environment
from MedSegAILib.inference.pipeline import run_segmentation
from MedSegAILib.progress import JsonReporter


@pytest.mark.parametrize("stage", protocol.STAGES)
def test_every_stage_round_trips(stage: str) -> None:
    stream = io.StringIO()
    JsonReporter(stream)(stage, 3, 7, "case 2 — naïve ~^ message")
    assert protocol.parse_progress_line(stream.getvalue()) == (stage, 3, 7, "case 2 — naïve ~^ message")


def test_unknown_stage_is_refused_and_other_text_is_not_progress() -> None:
    with pytest.raises(ValueError, match="not one of the protocol's stages"):
        protocol.encode_progress("inferring", 1, 2)
    for line in ("", "loading model", "{not json", '{"done": 1}', "[1, 2]"):
        assert protocol.parse_progress_line(line) is None


def test_stage_weights_cover_known_stages_and_sum_to_one() -> None:
    for weights in (protocol.SEGMENTATION_STAGE_WEIGHTS, protocol.TRAINING_STAGE_WEIGHTS):
        assert set(weights) <= set(protocol.STAGES)
        assert sum(weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("message", ["cancelled; no output was written.", "model folder X has no model.json"])
def test_error_line_round_trips(message: str) -> None:
    line = protocol.encode_error(message)
    assert protocol.parse_error_line(line) == message
    assert protocol.parse_error_line("Error:  " + message) == message
    assert protocol.parse_error_line("warning: " + message) is None


def test_segmentation_reports_only_weighted_stages_in_run_order(analytic_model_dir: Path, ct_small: Path, tmp_path: Path) -> None:
    """What the engine reports is what the panel's progress bar weighs: a renamed stage fails here."""
    seen: list[str] = []
    run_segmentation([ct_small], tmp_path / "labels.nrrd", model=analytic_model_dir,
                     progress=lambda stage, done, total, message="": seen.append(stage))
    order = list(protocol.SEGMENTATION_STAGE_WEIGHTS)
    stages = list(dict.fromkeys(seen))
    assert set(stages) == set(order)
    assert stages == sorted(stages, key=order.index)


@pytest.mark.parametrize("code", protocol.EXIT_CODES)
def test_exit_codes_and_error_line_reach_the_engine_process(code: int, tmp_path: Path) -> None:
    """Each exit code, with the engine's one error line, as the panel's EngineProcess reads them."""
    script = (
        "import sys; from MedSegAILib import protocol; "
        "print(protocol.encode_progress(protocol.MODEL, 1, 2, 'half'), flush=True); "
        f"print(protocol.encode_error('code {code}: check the input'), file=sys.stderr) if {code} else None; "
        f"sys.exit({code})"
    )
    run = EngineProcess()
    run._launch([sys.executable, "-c", script], engine_environment(), cwd=str(tmp_path))  # noqa: SLF001 - the engine's own launch
    events = []
    assert run.wait(timeout=120, progress=events.append) == code
    assert [(event.stage, event.done, event.total) for event in events] == [(protocol.MODEL, 1, 2)]
    if code:
        assert run.error_message() == f"Code {code}: check the input"


def test_command_line_exit_codes(tmp_path: Path, ct_small: Path) -> None:
    assert main(["models"]) == protocol.EXIT_OK
    missing = ["segment", str(ct_small), "-o", str(tmp_path / "x.nrrd"), "--model", str(tmp_path / "none")]
    assert main(missing) == protocol.EXIT_USAGE
    assert not (tmp_path / "x.nrrd").exists()
