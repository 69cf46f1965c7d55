"""The PACS loop: poll a DICOMweb server for studies of one modality and segment each once.

``watch`` asks the server (QIDO-RS) for studies whose ``ModalitiesInStudy`` hold the modality
(from ``--since`` on), and segments every study it has not handled yet with the model that takes
that modality (``dicomweb.segment_study``), storing the DICOM SEG into the study. A JSON state
file records each handled study (keyed by a SHA-256 of its StudyInstanceUID, so the file holds no
identifier); it is replaced atomically after each study, so a kill mid-study leaves the previous
state and that study is done again next time. A study that already holds a SEG of this model
(stored just before a kill) is recorded without segmenting it again. When the server goes away
the loop says so and retries with doubling waits (up to 5 minutes); it stops cleanly on Ctrl-C or
SIGTERM, after ``max_studies`` segmented studies or after ``duration`` seconds.

Log lines name studies by the first 12 hex digits of that hash, never by their UIDs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import CancelledError, MedSegAIInputError

__all__ = ["WatchState", "choose_watch_model", "study_key", "watch"]

STATE_VERSION = 1
_MAX_BACKOFF_S = 300.0


def study_key(study_uid: str) -> str:
    """The state file's key of a study: SHA-256 of its StudyInstanceUID (hex)."""
    return hashlib.sha256(study_uid.encode("utf-8")).hexdigest()


@dataclass
class WatchState:
    """Studies already handled: ``{key: {"status": ..., "at": ISO time, ...}}``."""

    path: Path
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WatchState:
        """Read the state file (a missing file is an empty state).

        Raises:
            MedSegAIInputError: the file exists but is not a MedSegAI watch state.
        """
        path = Path(path).expanduser()
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            studies = data["studies"]
            if data.get("version") != STATE_VERSION or not isinstance(studies, dict):
                raise ValueError("unexpected layout")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MedSegAIInputError(
                f"{path} is not a MedSegAI watch state file ({type(e).__name__}); pass another --state file."
            ) from e
        return cls(path, dict(studies))

    def save(self) -> None:
        """Replace the state file atomically."""
        from ..io.imageio import atomic_output

        text = json.dumps({"version": STATE_VERSION, "studies": self.studies}, indent=1, sort_keys=True)
        with atomic_output(self.path, overwrite=True) as temp:
            temp.write_text(text + "\n", encoding="utf-8")

    def record(self, study_uid: str, status: str, **details: Any) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.studies[study_key(study_uid)] = {"status": status, "at": now, **details}
        self.save()


def choose_watch_model(modality: str | None, model: str | None) -> tuple[Any, str]:
    """The model card and modality to watch for.

    With ``model``: that model (one input channel), its channel's modality unless ``modality``
    is given (then they must agree). Without: the installed one-channel models taking
    ``modality``, the default model first.

    Raises:
        MedSegAIInputError: no modality known, a multi-channel model, disagreement, or no model.
    """
    from ..model.modelcard import DEFAULT_MODEL_ID, find_model, list_models

    wanted = modality.strip().upper() if modality else None
    if model is not None:
        card = find_model(model)
        if len(card.channels) != 1:
            raise MedSegAIInputError(
                f"watch segments one series per study, but model '{card.id}' takes {len(card.channels)} inputs "
                f"({', '.join(card.channel_names)}); use `medsegai segment --dicomweb ... --series ...` for it."
            )
        own = (card.channels[0].modality or "").upper()
        if wanted and own and own != wanted:
            raise MedSegAIInputError(f"model '{card.id}' takes {own}, not {wanted}; pass a matching --modality or --model.")
        if not (wanted or own):
            raise MedSegAIInputError(f"model '{card.id}' does not name its modality; pass --modality.")
        return card, wanted or own
    if not wanted:
        raise MedSegAIInputError("pass --modality (e.g. CT) or --model to say which studies to segment.")
    cards = [c for c in list_models() if len(c.channels) == 1 and (c.channels[0].modality or "").upper() == wanted]
    if not cards:
        raise MedSegAIInputError(f"no installed model takes a single {wanted} series; see `medsegai models` or pass --model.")
    cards.sort(key=lambda c: c.id != DEFAULT_MODEL_ID)
    return cards[0], wanted


def _since_filter(since: str | None) -> str | None:
    if since is None:
        return None
    text = since.strip().replace("-", "")
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError as e:
        raise MedSegAIInputError(f"--since must be a date like 2024-01-31, not {since!r}.") from e
    return f"{text}-"


def _find_studies(connection: Any, modality: str, since: str | None) -> list[str]:
    from .dicomweb import _value

    filters = {"ModalitiesInStudy": modality}
    if since:
        filters["StudyDate"] = since
    found = connection.call("search for studies", connection.client.search_for_studies, search_filters=filters)
    return [str(_value(entry, "0020000D")) for entry in found if _value(entry, "0020000D")]


def _pick_series(connection: Any, study_uid: str, modality: str) -> Any | None:
    """The study's series of ``modality`` with the most images (None when it has none)."""
    from .dicomweb import list_series

    candidates = [s for s in list_series(connection, study_uid) if s.modality.upper() == modality]
    return max(candidates, key=lambda s: (s.instances, s.uid)) if candidates else None


def _studies(count: int) -> str:
    return f"{count} study" if count == 1 else f"{count} studies"


def watch(
    connection: Any,
    modality: str | None = None,
    model: str | None = None,
    state_path: str | os.PathLike = "medsegai-watch.json",
    since: str | None = None,
    interval_s: float = 30.0,
    max_studies: int | None = None,
    duration_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = print,
    segment_options: dict[str, Any] | None = None,
) -> int:
    """Run the PACS loop until stopped; returns the number of studies segmented.

    Args:
        connection: ``dicomweb.connect(...)``.
        modality: DICOM modality to watch (``CT``); default: the model's.
        model: model id or folder; default: the installed one-channel model for ``modality``.
        state_path: JSON state file (created when missing; locked while watching).
        since: only studies from this date on (``YYYY-MM-DD`` or ``YYYYMMDD``).
        interval_s: seconds between polls.
        max_studies: stop after this many segmented studies.
        duration_s: stop after this many seconds (a study under way is finished first).
        should_stop: polled between steps and during segmentation (Ctrl-C).
        log: receives one line per event (no UIDs, no patient data).
        segment_options: further ``pipeline.run_segmentation`` arguments (backend, device, options).

    Raises:
        MedSegAIInputError: bad arguments, a broken state file, another watch on the same state
            file, or a permanent server error (e.g. rejected credentials).
    """
    from .dicomweb import CredentialsRefusedError, ServerUnavailableError, seg_series_by_model, segment_study
    from ..io.dicomseg import require_highdicom
    from ..core.filelock import exclusive_lock
    from ..core.image import present_values

    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    require_highdicom()
    card, modality = choose_watch_model(modality, model)
    since_filter = _since_filter(since)
    state_path = Path(state_path).expanduser()
    if not state_path.parent.is_dir():
        raise MedSegAIInputError(f"the folder of the state file {state_path} does not exist; create it first.")
    stop = should_stop or (lambda: False)
    start = time.monotonic()
    deadline = start + duration_s if duration_s is not None else None
    segmented = 0
    busy = f"another `medsegai watch` uses the state file {state_path}; stop it or pass another --state."
    with exclusive_lock(state_path.with_name(state_path.name + ".lock"), 0, busy):
        state = WatchState.load(state_path)
        log(
            f"watching {connection.display_url} for {modality} studies with model {card.id} {card.version} "
            f"(state {state_path}, {len(state.studies)} studies already handled); Ctrl-C stops"
        )

        def finished() -> str | None:
            if stop():
                return "stopped"
            if max_studies is not None and segmented >= max_studies:
                return f"{_studies(segmented)} segmented (--max-studies)"
            if deadline is not None and time.monotonic() >= deadline:
                return "time is up (--duration)"
            return None

        def wait(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and finished() is None:
                time.sleep(min(0.2, max(0.0, end - time.monotonic())))

        backoff = interval_s
        while finished() is None:
            try:
                for study_uid in _find_studies(connection, modality, since_filter):
                    if finished() is not None:
                        break
                    key = study_key(study_uid)
                    if key in state.studies:
                        continue
                    name = f"study {key[:12]}"
                    if seg_series_by_model(connection, study_uid, card.id):
                        state.record(study_uid, "already-segmented")
                        log(f"{name}: already holds a {card.id} segmentation; recorded, not segmented again")
                        continue
                    series = _pick_series(connection, study_uid, modality)
                    if series is None:
                        state.record(study_uid, "no-series")
                        log(f"{name}: no {modality} image series; skipped")
                        continue
                    log(f"{name}: segmenting its {modality} series ({series.instances} images)")
                    try:
                        stored = segment_study(
                            connection, study_uid, series=[series.uid], model=card.folder, should_cancel=stop,
                            **(segment_options or {}),
                        )
                    except (ServerUnavailableError, CredentialsRefusedError):
                        raise
                    except CancelledError:
                        log(f"{name}: cancelled; nothing stored, it is segmented next time")
                        break
                    except MedSegAIInputError as e:
                        state.record(study_uid, "failed", error=str(e).splitlines()[0])
                        log(f"{name}: not segmented: {str(e).splitlines()[0]}")
                        continue
                    present = present_values(stored.result.labels.array)
                    found = [label.name for label in card.labels if label.value in present]
                    state.record(study_uid, "segmented", model=f"{card.id} {card.version}")
                    segmented += 1
                    log(f"{name}: DICOM SEG stored ({segmented} so far)" + (f"; found {', '.join(found)}" if found else ""))
                backoff = interval_s
                wait(interval_s)
            except ServerUnavailableError as e:
                log(f"server unavailable, retrying in {backoff:g} s: {str(e).rstrip('.')}")
                wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        log(f"watch ended: {finished()}; {_studies(segmented)} segmented this run")
    return segmented
