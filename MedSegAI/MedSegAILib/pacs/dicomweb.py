"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS): segment a study on a PACS and store the DICOM SEG back.

``segment_study`` lists the study's series, picks one per model channel (``--series``, or the
study's only image series), checks its modality against the model, retrieves it into a private
temporary folder, runs the ordinary pipeline (``pipeline.run_segmentation``, so every check on
the series applies) with a DICOM SEG output, and stores that SEG into the same study. Nothing is
stored unless the segmentation succeeded; a refused store is one error and leaves no local output.

Credentials come from ``MEDSEGAI_DICOMWEB_USER``/``MEDSEGAI_DICOMWEB_PASSWORD`` or a netrc file
(``$NETRC`` or ``~/.netrc``), never from the URL or the command line, and are never printed; TLS
certificates are verified unless the caller turns that off. ``dicomweb-client`` is imported here
only (Slicer ships it; the CLI's plain segment path does not need it).
"""

from __future__ import annotations

import logging
import netrc
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from ..core.errors import MedSegAIInputError

__all__ = [
    "PASSWORD_VARIABLE",
    "USER_VARIABLE",
    "CredentialsRefusedError",
    "DicomWebConnection",
    "SeriesEntry",
    "ServerUnavailableError",
    "StoredSegmentation",
    "choose_series",
    "connect",
    "list_series",
    "retrieve_series",
    "seg_series_by_model",
    "segment_study",
    "store_seg",
]

USER_VARIABLE = "MEDSEGAI_DICOMWEB_USER"
PASSWORD_VARIABLE = "MEDSEGAI_DICOMWEB_PASSWORD"
_NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "DOC", "REG", "OT"}
_TIMEOUT_S = 60


class ServerUnavailableError(MedSegAIInputError):
    """The server cannot be reached or answered with a temporary failure (5xx); worth retrying later."""


class CredentialsRefusedError(MedSegAIInputError):
    """The server refused the credentials (HTTP 401/403): retrying cannot help."""


@dataclass(frozen=True)
class SeriesEntry:
    """One series of a study as the server lists it (no patient data)."""

    uid: str
    description: str
    modality: str
    instances: int

    def summary(self) -> str:
        return f"{self.uid}  {self.description or '(no description)'!r}  {self.modality or '?'}  {self.instances} images"


@dataclass
class DicomWebConnection:
    """A ``dicomweb_client.DICOMwebClient`` and the URL to show (without credentials)."""

    client: Any
    display_url: str

    def call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client request, turning transport and HTTP failures into one clear error."""
        import requests

        try:
            return function(*args, **kwargs)
        except requests.exceptions.SSLError as e:
            raise MedSegAIInputError(
                f"the TLS certificate of {self.display_url} could not be verified ({what}); fix the server's certificate, "
                "point REQUESTS_CA_BUNDLE at your CA file, or pass --no-verify-tls if you trust this network."
            ) from e
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ServerUnavailableError(
                f"cannot reach the DICOMweb server at {self.display_url} ({what}: connection refused, dropped or timed out); "
                "check the URL and that the server is running."
            ) from e
        except requests.exceptions.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if status in (401, 403):
                raise CredentialsRefusedError(
                    f"the DICOMweb server at {self.display_url} refused the credentials (HTTP {status}, {what}); set "
                    f"{USER_VARIABLE}/{PASSWORD_VARIABLE} or the netrc entry for its host."
                ) from e
            if status >= 500 or status in (408, 429):
                raise ServerUnavailableError(
                    f"the DICOMweb server at {self.display_url} failed ({what}: HTTP {status}); try again later."
                ) from e
            raise MedSegAIInputError(f"the DICOMweb server at {self.display_url} refused to {what} (HTTP {status}).") from e


@dataclass
class StoredSegmentation:
    """What ``segment_study`` did."""

    result: Any
    seg_series_uid: str
    source_series: list[SeriesEntry]


def _credentials(host: str) -> tuple[str, str] | None:
    user, password = os.environ.get(USER_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    if user:
        return user, password or ""
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    if not Path(path).is_file():
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError) as e:
        raise MedSegAIInputError(f"the netrc file {path} could not be read ({type(e).__name__}); fix or remove it.") from e
    if entry is None:
        return None
    login, _, password = entry
    return login or "", password or ""


def connect(url: str, verify_tls: bool = True) -> DicomWebConnection:
    """A client for the DICOMweb service root ``url`` (``http(s)://host[:port]/path``).

    Raises:
        MedSegAIInputError: not an http(s) URL, or credentials written into the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MedSegAIInputError(f"--dicomweb needs an http:// or https:// URL of the DICOMweb service, not {url!r}.")
    if parts.username or parts.password:
        raise MedSegAIInputError(
            f"do not put credentials in the --dicomweb URL; set {USER_VARIABLE}/{PASSWORD_VARIABLE} or use a netrc file."
        )
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError as e:
        raise MedSegAIInputError(
            "talking to a PACS needs the dicomweb-client package; install it with `pip install dicomweb-client` "
            "(or `pip install -e .[dicom]` in the MedSegAI folder)."
        ) from e
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name study UIDs
    session = requests.Session()
    session.verify = bool(verify_tls)
    session.trust_env = False  # no proxies or netrc lookups behind our back: credentials are chosen here
    credentials = _credentials(parts.hostname)
    if credentials is not None:
        session.auth = credentials
    display = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    try:
        client = DICOMwebClient(display, session=session, timeout=_TIMEOUT_S)
    except TypeError:  # dicomweb-client < 0.60 (Slicer 5.8) has no timeout argument
        client = DICOMwebClient(display, session=session)
    client.set_http_retry_params(retry=False)
    return DicomWebConnection(client, display)


def _value(entry: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = entry.get(tag, {}).get("Value") or [default]
    return values[0]


def list_series(connection: DicomWebConnection, study_uid: str) -> list[SeriesEntry]:
    """The series of ``study_uid`` on the server.

    Raises:
        MedSegAIInputError: the server has no such study.
    """
    found = connection.call("list the study's series", connection.client.search_for_series, study_instance_uid=study_uid)
    if not found:
        raise MedSegAIInputError(f"the DICOMweb server at {connection.display_url} has no study {study_uid}; check the StudyInstanceUID.")
    series = [
        SeriesEntry(
            uid=str(_value(entry, "0020000E")),
            description=str(_value(entry, "0008103E")),
            modality=str(_value(entry, "00080060")),
            instances=int(_value(entry, "00201209", 0) or 0),
        )
        for entry in found
    ]
    return sorted(series, key=lambda s: (s.description, s.uid))


def _describe(series: Sequence[SeriesEntry]) -> str:
    return "\n".join(f"  {entry.summary()}" for entry in series)


def choose_series(series: Sequence[SeriesEntry], card: Any, wanted: Sequence[str] | None) -> list[SeriesEntry]:
    """One series per model channel: ``wanted`` (in channel order) or the study's only image series.

    Raises:
        MedSegAIInputError: a wanted series is not in the study, the count does not match the
            model's channels, the study has several candidate series, or a modality differs
            from the one the model's channel takes.
    """
    images = [entry for entry in series if entry.modality.upper() not in _NON_IMAGE_MODALITIES]
    channels = card.channels
    if wanted:
        by_uid = {entry.uid: entry for entry in series}
        unknown = [uid for uid in wanted if uid not in by_uid]
        if unknown:
            raise MedSegAIInputError(
                f"series {unknown[0]} is not in the study; pass --series with one of these UIDs (UID, description, "
                f"modality, images):\n{_describe(series)}"
            )
        if len(wanted) != len(channels):
            raise MedSegAIInputError(
                f"model '{card.id}' needs {len(channels)} series ({', '.join(card.channel_names)}); pass --series once per "
                f"channel in that order (got {len(wanted)})."
            )
        chosen = [by_uid[uid] for uid in wanted]
    elif len(images) == len(channels) == 1:
        chosen = images
    elif not images:
        raise MedSegAIInputError(f"the study holds no image series (only {', '.join(sorted({s.modality for s in series}))}).")
    else:
        raise MedSegAIInputError(
            f"the study holds {len(images)} image series and model '{card.id}' takes {', '.join(card.channel_names)}; "
            f"choose with --series UID (once per channel, in that order) among (UID, description, modality, images):\n"
            + _describe(images)
        )
    for entry, channel in zip(chosen, channels):
        expected = (getattr(channel, "modality", "") or "").upper()
        if expected and entry.modality.upper() != expected:
            raise MedSegAIInputError(
                f"series {entry.uid} is {entry.modality or 'of unknown modality'}, but model '{card.id}' takes {expected} for "
                f"its '{channel.name}' input; choose another series or another model (--model)."
            )
    return chosen


def retrieve_series(connection: DicomWebConnection, study_uid: str, entry: SeriesEntry, folder: Path) -> None:
    """WADO-RS: store the series' instances as files in ``folder`` (transfer syntax as stored)."""
    datasets = connection.call(
        "retrieve the series",
        connection.client.retrieve_series,
        study_uid,
        entry.uid,
        media_types=(("application/dicom", "*"),),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for index, dataset in enumerate(datasets):
        dataset.save_as(folder / f"{index:05d}.dcm")


def store_seg(connection: DicomWebConnection, study_uid: str, path: Path) -> str:
    """STOW-RS the SEG file at ``path`` into ``study_uid`` and check that the server kept it.

    Some servers answer success for an instance that a rule then drops (Orthanc's Lua filters),
    so the SEG is looked up (QIDO-RS) after the store.

    Returns:
        The SEG's SeriesInstanceUID.

    Raises:
        MedSegAIInputError: the server refused it (HTTP error, a failed-SOP answer) or did not keep it.
    """
    import pydicom

    dataset = pydicom.dcmread(path)
    answer = connection.call("store the DICOM SEG", connection.client.store_instances, [dataset], study_instance_uid=study_uid)
    failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise MedSegAIInputError(
            f"the DICOMweb server at {connection.display_url} refused to store the DICOM SEG (failure reason {reason}); "
            "nothing was stored."
        )
    series_uid, instance_uid = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
    kept = connection.call(
        "check the stored DICOM SEG",
        connection.client.search_for_instances,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        search_filters={"SOPInstanceUID": instance_uid},
    )
    if not any(str(_value(entry, "00080018")) == instance_uid for entry in kept or []):
        raise MedSegAIInputError(
            f"the DICOMweb server at {connection.display_url} refused to store the DICOM SEG (it answered the upload "
            "but does not hold the SEG; a server rule may reject segmentations); nothing was stored."
        )
    return series_uid


def seg_series_by_model(connection: DicomWebConnection, study_uid: str, model_id: str) -> list[str]:
    """UIDs of the SEG series in ``study_uid`` made by ``model_id`` (MedSegAI's series description)."""
    found = connection.call(
        "list the study's SEG series",
        connection.client.search_for_series,
        study_instance_uid=study_uid,
        search_filters={"Modality": "SEG"},
        fields=["0008103E", "00081090"],
    )
    return [str(_value(entry, "0020000E")) for entry in found if str(_value(entry, "00081090")) == model_id]


def segment_study(
    connection: DicomWebConnection,
    study_uid: str,
    series: Sequence[str] | None = None,
    output: str | Path | None = None,
    model: str | Path | None = None,
    overwrite: bool = False,
    **segment_options: Any,
) -> StoredSegmentation:
    """Retrieve, segment and store back: what ``medsegai segment --dicomweb URL --study UID`` does.

    Args:
        connection: from :func:`connect`.
        study_uid: StudyInstanceUID on the server.
        series: SeriesInstanceUIDs, one per model channel in channel order; ``None`` takes the
            study's only image series.
        output: optional local copy (``.seg.nrrd``, labelmap or ``.dcm``).
        model: model id or folder (default model when ``None``).
        overwrite: replace an existing local ``output``.
        segment_options: further ``pipeline.run_segmentation`` arguments (backend, device,
            options, measurements, progress, should_cancel).

    Raises:
        MedSegAIInputError: see :func:`choose_series`, the pipeline and :func:`store_seg`.
        ServerUnavailableError: the server went away.
    """
    from ..io.dicomseg import require_highdicom
    from ..model.modelcard import find_model
    from ..inference.pipeline import output_kind, run_segmentation

    require_highdicom()
    card = find_model(model)
    local = Path(output).expanduser() if output is not None else None
    if local is not None:
        output_kind(local)
        if local.exists() and not overwrite:
            raise MedSegAIInputError(f"{local} already exists; choose another output name or pass --overwrite.")
    chosen = choose_series(list_series(connection, study_uid), card, series)
    with tempfile.TemporaryDirectory(prefix="medsegai-dicomweb-") as temp:
        folders = []
        for index, entry in enumerate(chosen):
            folder = Path(temp) / f"channel{index}"
            retrieve_series(connection, study_uid, entry, folder)
            folders.append(folder)
        seg_path = Path(temp) / "segmentation.dcm"
        if local is not None and local.name.lower().endswith(".dcm"):
            seg_path = local
        result = run_segmentation(
            folders, local if seg_path != local else None, model=model, dicom_seg=seg_path, overwrite=overwrite,
            **segment_options,
        )
        try:
            seg_series_uid = store_seg(connection, study_uid, seg_path)
        except BaseException:
            if local is not None:
                local.unlink(missing_ok=True)
            measurements = segment_options.get("measurements")
            if measurements:
                Path(measurements).expanduser().unlink(missing_ok=True)
            raise
    return StoredSegmentation(result=result, seg_series_uid=seg_series_uid, source_series=chosen)
