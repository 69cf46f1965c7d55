"""The panel's first click in Slicer's own Python (5.8.1: Python 3.9, 5.12.3: Python 3.12).

Our ``.venv`` is not Slicer's Python. For each supported release these tests build an environment
from exactly the packages that release ships (``shared/slicer-python``, see ``slicer_python_env``)
and do what the panel does there:

1. import the module's library and list the installed models, before anything is installed;
2. run the dependency check for Segment and Fine-tune (in that Python, as Slicer runs it);
3. install what the check offers, the way the panel does (:class:`dependencies.PipInstallRun`:
   pip with every installed version as a constraint), and check that numpy, scipy, SimpleITK,
   pydicom — every package Slicer ships — are unchanged;
4. segment the shipped sample CT exactly as :class:`slicer_logic.SegmentationRun` launches the
   engine (with that Python), and compare the labels with the command line's in ``.venv``;
5. fine-tune through :class:`slicer_logic.FineTuneRun`'s command (a few steps) with the
   TensorFlow that pip chose for that Python, and register the new model version.

The base environments and pip's downloads are cached between runs (first run: a few minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from slicer_python_env import fresh_environment, pinned_versions, python_version_of  # noqa: E402

from MedSegAILib.data import dataset  # noqa: E402
from MedSegAILib.slicer_bridge import dependencies, engine_process, mrml, slicer_logic  # noqa: E402
from MedSegAILib.core.image import Volume  # noqa: E402
from MedSegAILib.model.modelcard import DEFAULT_MODEL_ID, builtin_models_dir, find_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CT = REPO_ROOT / "MedSegAI" / "Resources" / "SampleData" / "abdomen-ct.nii.gz"
SLICER_RELEASES = ["5.8.1", "5.12.3"]
SHIPPED_BY_SLICER = ("numpy", "scipy", "simpleitk", "pydicom")
INSTALL_TIMEOUT = 1500
RUN_TIMEOUT = 900

# What the panel runs in Slicer's Python when it opens: list the models, check the dependencies.
PANEL_OPENS = """
import json, sys
from MedSegAILib.slicer_bridge import dependencies
from MedSegAILib.model.modelcard import DEFAULT_MODEL_ID, find_model, list_models
cards = list_models()
default = find_model(DEFAULT_MODEL_ID)
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "models": [{"id": c.id, "version": c.version, "name": c.name, "channels": list(c.channel_names),
                "labels": [label.name for label in c.labels]} for c in cards],
    "segment": dependencies.missing_packages("segment", "auto", None, default),
    "fine-tune": dependencies.missing_packages("fine-tune"),
    "offer": {p: dependencies.requirements_to_install(dependencies.missing_packages(p, "auto", None, default))
              for p in ("segment", "fine-tune")},
}))
"""


def _slicer_environment() -> dict[str, str]:
    """What the module folder on Slicer's module path amounts to: MedSegAILib importable, nothing else of ours."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = os.pathsep.join(engine_process._python_path_entries())  # noqa: SLF001 - the engine's own path
    return env


def _panel_opens(python: Path, tmp_path: Path) -> dict:
    completed = subprocess.run([str(python), "-c", PANEL_OPENS], capture_output=True, text=True, timeout=300,
                               env=_slicer_environment(), cwd=tmp_path, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _install_as_the_panel_does(lines: list[str], python: Path) -> None:
    run = dependencies.PipInstallRun(lines, str(python)).start()
    code = run.wait(timeout=INSTALL_TIMEOUT)
    assert code == 0, "\n".join(list(run.log_lines)[-40:])
    assert run.finish() == lines


def _sample_node(scene):
    volume = Volume.from_sitk(sitk.ReadImage(str(SAMPLE_CT)))
    return mrml.add_volume_node(scene, volume, "abdomen-ct"), volume


@pytest.fixture(scope="module", params=SLICER_RELEASES)
def slicer_release(request, tmp_path_factory) -> tuple[str, Path]:
    """(release, Python of a fresh copy of that release's environment)."""
    release = request.param
    try:
        python = fresh_environment(release, tmp_path_factory.mktemp(f"slicer-{release}") / "env")
    except RuntimeError as e:
        pytest.fail(str(e))
    return release, python


@pytest.fixture(scope="module")
def cli_labels(tmp_path_factory) -> np.ndarray:
    """The command line's labels of the sample CT in .venv (the reference for the Slicer path)."""
    output = tmp_path_factory.mktemp("cli") / "labels.nrrd"
    completed = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", "segment", str(SAMPLE_CT), "-o", str(output), "--device", "cpu",
         "--progress", "none"], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=engine_process.engine_environment(),
        check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output)))


@pytest.mark.slow
@pytest.mark.timeout(3000)  # a first run builds the environment and downloads TensorFlow
def test_first_click_in_slicers_python(slicer_release, cli_labels: np.ndarray, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    release, python = slicer_release
    monkeypatch.setenv("MEDSEGAI_HOME", str(tmp_path / "medsegai-home"))
    shipped = pinned_versions(release)

    # 1-2: the panel opens in a fresh Slicer: models listed, what Segment and Fine-tune need is named.
    opened = _panel_opens(python, tmp_path)
    assert opened["python"] == python_version_of(release)
    listed = {model["id"]: model for model in opened["models"]}
    assert set(listed) >= {"ct-abdomen-organs", "mr-brain-tumor"}
    assert listed["ct-abdomen-organs"]["channels"] == ["CT"]
    assert listed["ct-abdomen-organs"]["labels"] == ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta"]
    assert listed["mr-brain-tumor"]["channels"] == ["T1post", "T1prereg", "FLAIR"]
    assert opened["segment"] == ["onnxruntime"]
    assert opened["fine-tune"] == ["tensorflow", "tf2onnx", "onnx", "onnxruntime"]
    requirements = dependencies.read_requirements()
    assert opened["offer"] == {"segment": [requirements["onnxruntime"]],
                               "fine-tune": [requirements[n] for n in ("tensorflow", "tf2onnx", "onnx", "onnxruntime")]}

    # 3: install what is offered (Segment's, then Fine-tune's); nothing Slicer ships changes.
    before = dependencies.installed_versions(str(python))
    for name in SHIPPED_BY_SLICER:
        assert before[name] == shipped[name]
    assert dependencies.baseline_versions(str(python)) == before
    _install_as_the_panel_does(opened["offer"]["segment"], python)
    _install_as_the_panel_does(_panel_opens(python, tmp_path)["offer"]["fine-tune"], python)
    after = dependencies.installed_versions(str(python))
    assert {name: after.get(name) for name in shipped} == shipped, "a package Slicer ships was changed"
    reopened = _panel_opens(python, tmp_path)
    assert reopened["segment"] == [] and reopened["fine-tune"] == []

    # 4: Segment, exactly as the panel launches the engine, with Slicer's Python.
    scene = slicer.vtkMRMLScene()
    node, volume = _sample_node(scene)
    options = slicer_logic.EngineOptions(device="cpu", python_executable=str(python))
    run = slicer_logic.SegmentationRun([node], DEFAULT_MODEL_ID, options=options, temp_root=tmp_path).start()
    assert run.command[:3] == [str(python), "-m", "MedSegAILib.cli"]
    run.wait(timeout=RUN_TIMEOUT)
    result = run.finish(scene)
    labels = np.asarray(result.labels.array)
    assert labels.shape == cli_labels.shape and result.labels.same_grid(volume)
    assert set(np.unique(labels)) == set(np.unique(cli_labels)) == set(range(7))
    disagreeing = np.count_nonzero(labels != cli_labels)
    # Another ONNX Runtime build (1.19 on 3.9, newer on 3.12) may round a few logits differently.
    assert disagreeing <= 1e-5 * labels.size, f"{disagreeing} voxels differ from the command line's labels"
    segment_names = [result.segmentation_node.GetSegmentation().GetSegment(i).GetName() for i in result.segment_ids]
    assert segment_names == listed["ct-abdomen-organs"]["labels"]

    # 5: Fine-tune through FineTuneRun's command with that Python and the TensorFlow pip chose.
    dataset_dir = tmp_path / "dataset"
    card = find_model(DEFAULT_MODEL_ID)
    label_values = {"background": 0, **{label.name: label.value for label in card.labels}}
    dataset.add_case(dataset_dir, [volume], result.labels, ["CT"], label_values, patient_key="sample")
    store = tmp_path / "store"
    fine_tune = slicer_logic.start_fine_tune(dataset_dir, str(builtin_models_dir() / DEFAULT_MODEL_ID), store_dir=store,
                                             python_executable=str(python),
                                             extra_arguments=["--epochs", "1", "--max-steps", "2"])
    assert fine_tune.command[:4] == [str(python), "-m", "MedSegAILib.cli", "train"]
    code = fine_tune.wait(timeout=RUN_TIMEOUT)
    assert code == 0, "\n".join(list(fine_tune.log_lines)[-30:])
    new = fine_tune.finish()
    assert new.id == card.id and new.version != card.version
    assert new.folder.parent == store.resolve() and (new.folder / "model.keras").is_file()
