"""`medsegai quantize` and `segment --precision`: int8 ONNX beside the float model, validated on a real CT.

The model is the analytic bone-threshold network (``normalization: none``, so the int8 input
step is about 12 HU): its float labels are exactly ``CT > 300.5 HU``, which is also the dataset's
reference, so the Dice the int8 graph loses is what its rounding near the threshold costs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from MedSegAILib.cli import main
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.io.imageio import read_volume
from MedSegAILib.inference.segment import SegmentOptions
from MedSegAILib.model.modelcard import ModelCard
from MedSegAILib.inference.pipeline import segment_case

THRESHOLD_HU = 300.5


@pytest.fixture(scope="module")
def bone_dataset(ct_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from MedSegAILib.data.dataset import add_case

    image = read_volume(ct_small)
    label = image.with_array((np.asarray(image.array) > THRESHOLD_HU).astype(np.uint8))
    folder = tmp_path_factory.mktemp("quantize") / "bone-dataset"
    add_case(folder, [image], label, ["CT"], {"bone": 1})
    return folder


@pytest.fixture(scope="module")
def quantized(bone_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from analytic_models import threshold_model_folder
    from medsegai_training.quantize import quantize_model

    folder = threshold_model_folder(tmp_path_factory.mktemp("quantize") / "bone-int8", mode="2d", backends=("onnx",))
    lines: list[str] = []
    record = quantize_model(folder, bone_dataset, max_cases=1, progress=lines.append)
    assert lines[-1].startswith("wrote ") and "model.int8.onnx" in lines[-1]
    return folder, record


def _set_record(folder: Path, **changes: object) -> None:
    card_path = folder / "model.json"
    data = json.loads(card_path.read_text())
    data["metrics"]["int8"].update(changes)
    card_path.write_text(json.dumps(data))


def test_quantize_writes_a_validated_int8_file_the_engine_runs(quantized, ct_small) -> None:
    folder, record = quantized
    card = ModelCard.from_folder(folder)  # schema-valid with files.onnx_int8 and metrics.int8
    assert card.files["onnx_int8"] == "model.int8.onnx" and (folder / "model.int8.onnx").is_file()
    assert card.raw["metrics"]["int8"] == record
    bone = record["per_label"]["bone"]
    assert record["passed"] is True and record["max_dice_drop"] == 0.01 and record["cases"] == ["case_0001"]
    assert bone["reference"] == "dataset" and bone["dice_float"] == 1.0  # the float network is the threshold
    assert -0.01 <= bone["change"] < 0 and bone["dice_int8"] == pytest.approx(1.0 + bone["change"], abs=1e-4)
    assert record["worst_change"] == bone["change"]

    image = read_volume(ct_small)
    truth = np.asarray(image.array) > THRESHOLD_HU
    int8, _ = segment_case([image], card, options=SegmentOptions(precision="int8"))
    fp32, _ = segment_case([image], card, options=SegmentOptions(precision="fp32"))
    np.testing.assert_array_equal(np.asarray(fp32.array) == 1, truth)
    labels = np.asarray(int8.array) == 1
    assert labels.shape == truth.shape and int8.spacing == image.spacing and int8.origin == image.origin
    dice = 2 * np.count_nonzero(labels & truth) / (np.count_nonzero(labels) + np.count_nonzero(truth))
    assert dice == pytest.approx(bone["dice_int8"], abs=1e-4)


def test_auto_takes_int8_only_when_validated_faster_and_unchanged(quantized) -> None:
    from MedSegAILib.model.precision import resolve_int8

    folder, record = quantized
    try:
        _set_record(folder, speedup=2.0)
        card = ModelCard.from_folder(folder)
        assert resolve_int8(card, "auto", "auto", "cpu") == folder / "model.int8.onnx"
        assert resolve_int8(card, "auto", "tensorflow", "cpu") is None
        assert resolve_int8(card, "fp32", "auto", "cpu") is None
        _set_record(folder, speedup=1.0)  # validated, but not faster where it was measured
        card = ModelCard.from_folder(folder)
        assert resolve_int8(card, "auto", "auto", "cpu") is None
        assert resolve_int8(card, "int8", "onnx", "cpu") == folder / "model.int8.onnx"
        _set_record(folder, speedup=2.0, sha256="0" * 64)  # the file is not the one validated
        card = ModelCard.from_folder(folder)
        assert resolve_int8(card, "auto", "auto", "cpu") is None
        with pytest.raises(MedSegAIInputError, match="not the file that was validated"):
            resolve_int8(card, "int8", "auto", "cpu")
    finally:
        _set_record(folder, **{k: record[k] for k in ("speedup", "sha256")})


def test_quantize_refuses_a_lossy_int8_model_and_writes_nothing(bone_dataset, tmp_path) -> None:
    from analytic_models import threshold_model_folder
    from medsegai_training.quantize import quantize_model

    folder = threshold_model_folder(tmp_path / "bone", mode="2d", backends=("onnx",))
    before = (folder / "model.json").read_bytes()
    with pytest.raises(MedSegAIInputError, match=r"int8 model loses more than 0 Dice on bone -0\.0\d+ .*nothing was written"):
        quantize_model(folder, bone_dataset, max_cases=1, max_dice_drop=0.0)
    assert (folder / "model.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx"]


def test_precision_int8_without_an_int8_file_is_one_error_line(ct_small, tmp_path, capsys) -> None:
    from analytic_models import threshold_model_folder

    model = threshold_model_folder(tmp_path / "bone", mode="2d", backends=("onnx",))
    output = tmp_path / "labels.nrrd"
    code = main(["segment", str(ct_small), "-o", str(output), "--model", str(model), "--precision", "int8",
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and not output.exists()
    assert err.count("\n") == 1 and err.startswith("error: --precision int8: model 'analytic-bone-2d' has no int8 file")
    assert "medsegai quantize analytic-bone-2d --data DATASET" in err
    with pytest.raises(SystemExit) as exited:
        main(["segment", str(ct_small), "-o", str(output), "--model", str(model), "--precision", "int4"])
    assert exited.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_int8_graph_gets_one_softmax_over_the_last_axis(ct_small) -> None:
    """The export's decomposed channel softmax becomes Transpose + Softmax(axis=-1): same probabilities."""
    import onnx
    import onnx.numpy_helper
    import onnxruntime as ort
    from medsegai_training.quantize import softmax_on_the_last_axis
    from MedSegAILib.model.modelcard import find_model

    card = find_model("ct-abdomen-organs")
    decomposed = onnx.load(str(card.weights_path("onnx")))
    assert [n.op_type for n in decomposed.graph.node[-6:]] == ["ReduceMax", "Sub", "Exp", "ReduceSum", "Div", "Transpose"]
    other_axis = onnx.load(str(card.weights_path("onnx")))
    axes = next(t for t in other_axis.graph.initializer if t.name.endswith("/medsegai_softmax/axes"))
    axes.CopyFrom(onnx.numpy_helper.from_array(np.array([2], np.int64), axes.name))
    assert softmax_on_the_last_axis(other_axis) is False  # not the channel axis: left alone
    rewritten = onnx.load(str(card.weights_path("onnx")))
    assert softmax_on_the_last_axis(rewritten) is True
    assert softmax_on_the_last_axis(rewritten) is False  # nothing left to rewrite
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops[-2:] == ["Transpose", "Softmax"] and ops.count("Softmax") == 1 and "Exp" not in ops
    assert [o.name for o in rewritten.graph.output] == [o.name for o in decomposed.graph.output]

    hu = np.asarray(read_volume(ct_small).array, dtype=np.float32)[10:14]  # 4 real axial slices, 101x122
    windows = np.zeros((4, 112, 128, 1), np.float32)
    windows[:, :101, :122, 0] = np.clip((hu + 200.0) / 500.0, 0.0, 1.0)
    before = ort.InferenceSession(decomposed.SerializeToString()).run(None, {"image": windows})[0]
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"image": windows})[0]
    assert after.shape == before.shape == (4, 112, 128, card.num_classes)
    np.testing.assert_allclose(after, before, atol=1e-6)
    np.testing.assert_array_equal(after.argmax(-1), before.argmax(-1))
    assert len(np.unique(before.argmax(-1))) > 1  # real anatomy, not an all-background window

    shipped = onnx.load(str(card.folder / "model.int8.onnx"))  # the shipped int8 file carries the rewrite
    assert [n.op_type for n in shipped.graph.node].count("Softmax") == 1 and softmax_on_the_last_axis(shipped) is False
