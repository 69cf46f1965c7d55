"""MedSegAI side by side with MONAI and nnU-Net v2 inference: the same CT, file in to label file out (uncompressed NIfTI).

    pip install -e .[bench]          # torch, monai, nnunetv2 (a separate venv is fine: --peer-python)
    python benchmarks/bench_peers.py [--input CT] [--repeat 2] [--widths 16 32] [--threads 2] \
        [--peer-python VENV/bin/python] [--model-16 FOLDER] [--pipelines medsegai,medsegai-int8,monai,nnunet]

One run of this script alternates the pipelines (A B C A B C ..., the order rotated each round),
each in a fresh child process so that its peak memory is its own (``wait4``'s ``ru_maxrss``):

* ``medsegai``: :func:`MedSegAILib.inference.pipeline.run_segmentation` (what ``medsegai segment`` does) with
  a 2D U-Net model folder: base width 16 is the shipped ``ct-abdomen-organs`` folder (real
  weights; ``medsegai-int8`` is the same folder with ``--precision int8`` when it carries a
  validated int8 file), other widths are random-weight stand-ins of the same card
  (:func:`make_width_model`). Resampled to the card's 1.5 mm in-plane spacing, z kept.
* ``monai``: ``LoadImaged → EnsureChannelFirstd → Orientationd → Spacingd(1.5, 1.5, z kept) →
  ScaleIntensityRanged(-200..300) → SliceInferer`` (2D slices, roi 256, batch 16, overlap 0.5,
  Gaussian) ``→ argmax → KeepLargestConnectedComponentd → FillHolesd → Invertd → SaveImaged``,
  with :class:`TorchUNet2d` (the same layers as MedSegAI's ``unet_2d``: same widths, depth and
  parameter count), random weights.
* ``nnunet``: ``nnUNetPredictor.predict_from_files_sequential`` (no worker processes) after
  ``manual_initialization`` with a minimal 2D plan (1.5 mm in-plane, patch 256, CT
  normalisation, nnU-Net's default resampling), the same :class:`TorchUNet2d`, random weights, no
  mirroring, Gaussian, step 0.5.

All children get the same thread count (``--threads``; ``MEDSEGAI_THREADS``, ``OMP_NUM_THREADS``,
``torch.set_num_threads``). Each reports in-process end-to-end seconds (file read to label file
written, model construction included, imports excluded), the seconds inside the network, its
output's grid against the input's; the parent adds the child's wall time and peak RSS and prints
medians and the MedSegAI : peer ratios (peer seconds / MedSegAI seconds: above 1 = MedSegAI faster).

Outputs go to a temporary folder and are removed. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MARK = "@@peer-result@@"
ROI = 256
BATCH = 16
SPACING_XY = 1.5
NUM_CLASSES = 7
DEPTH = 4


# ---------------------------------------------------------------------------------------------
# the torch network: MedSegAI's unet_2d (medsegai_training.models._unet) in torch
# ---------------------------------------------------------------------------------------------
def torch_unet(base: int, depth: int = DEPTH, in_channels: int = 1, classes: int = NUM_CLASSES) -> Any:
    """conv3x3(no bias)-BN-ReLU ×2 per level, max-pool, ConvTranspose 2×2 up, concat skip, 1×1 head."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    widths = [base * 2 ** level for level in range(depth + 1)]

    class TorchUNet2d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList([block(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)])
            self.bottleneck = block(widths[depth - 1], widths[depth])
            self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)])
            self.decoder = nn.ModuleList([block(2 * widths[i], widths[i]) for i in range(depth)])
            self.head = nn.Conv2d(widths[0], classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for level in range(depth):
                x = self.encoder[level](x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for level in reversed(range(depth)):
                x = torch.cat([self.up[level](x), skips[level]], dim=1)
                x = self.decoder[level](x)
            return self.head(x)

    torch.manual_seed(0)
    return TorchUNet2d().eval()


class _Clock:
    """Seconds spent inside a callable (the network's forward)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _grid(path: str) -> dict[str, Any]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return {"size": list(reader.GetSize()), "spacing": [round(v, 5) for v in reader.GetSpacing()],
            "origin": [round(v, 4) for v in reader.GetOrigin()], "direction": [round(v, 5) for v in reader.GetDirection()]}


def _same_grid(a: dict[str, Any], b: dict[str, Any]) -> bool:
    close = lambda u, v, tol: all(abs(x - y) <= tol for x, y in zip(u, v))
    return a["size"] == b["size"] and close(a["spacing"], b["spacing"], 1e-3) and close(a["origin"], b["origin"], 1e-2) \
        and close(a["direction"], b["direction"], 1e-4)


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------
def run_medsegai(input_path: str, output: str, model: str, precision: str) -> dict[str, Any]:
    from MedSegAILib.model import backends
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.inference.pipeline import run_segmentation

    clock = _Clock(backends.OnnxPredictor.predict)
    backends.OnnxPredictor.predict = lambda self, batch: clock(self, batch)  # type: ignore[method-assign]
    start = time.perf_counter()
    result = run_segmentation([input_path], output, model, backend="onnx", device="cpu",
                              options=SegmentOptions(precision=precision), progress=None)
    return {"end_to_end_s": time.perf_counter() - start, "model_s": clock.seconds, "ran": f"{result.backend} {result.precision}"}


def run_monai(input_path: str, output: str, base: int, threads: int) -> dict[str, Any]:
    import torch
    from monai.inferers import SliceInferer
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        FillHolesd,
        Invertd,
        KeepLargestConnectedComponentd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    torch.set_num_threads(threads)
    start = time.perf_counter()
    network = torch_unet(base)
    clock = _Clock(network)
    pre = Compose([
        LoadImaged(keys="image", image_only=False), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(SPACING_XY, SPACING_XY, -1), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True),
    ])
    out_dir = os.path.dirname(output)
    post = Compose([
        AsDiscreted(keys="pred", argmax=True),
        KeepLargestConnectedComponentd(keys="pred", applied_labels=list(range(1, NUM_CLASSES))),
        FillHolesd(keys="pred", applied_labels=[1, 2, 3, 4]),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True),
        SaveImaged(keys="pred", output_dir=out_dir, output_postfix="", output_ext=".nii", separate_folder=False,
                   resample=False, output_dtype="uint8", print_log=False),
    ])
    data = pre({"image": input_path})
    inferer = SliceInferer(roi_size=(ROI, ROI), sw_batch_size=BATCH, overlap=0.5, mode="gaussian", spatial_dim=2,
                           progress=False)
    with torch.inference_mode():
        # a plain tensor into the network: a MetaTensor would add its metadata bookkeeping to every layer call
        logits = inferer(data["image"].as_tensor()[None].float(), clock)
    data["pred"] = logits[0]
    del logits
    item = post(data)
    written = [p for p in os.listdir(out_dir) if p.endswith(".nii")]  # a fresh folder: only this output
    os.replace(os.path.join(out_dir, written[0]), output)
    del item
    return {"end_to_end_s": time.perf_counter() - start, "model_s": clock.seconds, "ran": f"torch {torch.__version__}"}


def run_nnunet(input_path: str, output: str, base: int, threads: int) -> dict[str, Any]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(threads)
    start = time.perf_counter()
    network = torch_unet(base)
    clock = _Clock(network.forward)
    network.forward = clock  # type: ignore[method-assign]
    labels = {"background": 0, **{f"label{i}": i for i in range(1, NUM_CLASSES)}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii"}
    resample = "resample_data_or_seg_to_shape"
    plans = {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [200, 512, 512], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "manual",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 300.0, "mean": 50.0, "median": 50.0, "min": -200.0,
                                                              "percentile_00_5": -200.0, "percentile_99_5": 300.0, "std": 250.0}},
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": BATCH,
            "patch_size": [ROI, ROI], "median_image_size_in_voxels": [341, 341], "spacing": [SPACING_XY, SPACING_XY],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": resample, "resampling_fn_seg": resample, "resampling_fn_probabilities": resample,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "bench_peers.TorchUNet2d", "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": True,
        }},
    }
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration("2d"), [network.state_dict()],
                                    dataset_json, "nnUNetTrainer", None)
    stem = output[: -len(".nii")]
    predictor.predict_from_files_sequential([[input_path]], [stem], save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    return {"end_to_end_s": time.perf_counter() - start, "model_s": clock.seconds, "ran": f"torch {torch.__version__}"}


def child(args: argparse.Namespace) -> int:
    threads = args.threads
    if args.pipeline.startswith("medsegai"):
        result = run_medsegai(args.input, args.output, args.model, "int8" if args.pipeline.endswith("int8") else "fp32")
    elif args.pipeline == "monai":
        result = run_monai(args.input, args.output, args.base, threads)
    else:
        result = run_nnunet(args.input, args.output, args.base, threads)
    result["same_grid_as_input"] = _same_grid(_grid(args.input), _grid(args.output))
    result["output_grid"] = _grid(args.output)
    print(MARK + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: models, alternation, figures
# ---------------------------------------------------------------------------------------------
def make_width_model(base: int, folder: Path) -> Path:
    """The shipped CT card with a random-weight unet_2d of ``base`` filters (needs TensorFlow)."""
    import copy

    import keras
    import numpy as np
    from medsegai_training.export import export_model_folder
    from medsegai_training.models import build_model, resolve_config

    shipped = json.loads((REPO / "MedSegAI/Resources/Models/ct-abdomen-organs/model.json").read_text())
    keras.utils.set_random_seed(0)
    config = resolve_config({**shipped["architecture"]["config"], "base_filters": base})
    card = {k: copy.deepcopy(shipped[k]) for k in ("schema_version", "channels", "labels", "spatial", "postprocessing")}
    card.update({"id": f"bench-unet2d-w{base}", "name": f"Benchmark unet_2d width {base}", "version": "0.0.1",
                 "description": "Random weights; for the peers benchmark only.", "license": "Apache-2.0",
                 "architecture": {"builder": "unet_2d", "config": config},
                 "provenance": {"kind": "benchmark stand-in", "weights": "random (seed 0)"}})
    sample = np.random.default_rng(0).normal(size=(2, ROI, ROI, 1)).astype(np.float32)
    return export_model_folder(build_model(copy.deepcopy(config)), card, folder, sample)


def parameter_counts(base: int, peer_python: str) -> dict[str, Any]:
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import bench_peers as b; "
            f"n=b.torch_unet({base}); print(sum(p.numel() for p in n.parameters()), "
            "sum(b.numel() for b in n.buffers() if b.dtype.is_floating_point))")
    out = subprocess.run([peer_python, "-c", code], capture_output=True, text=True, check=False).stdout.split()
    return {"torch_parameters": int(out[0]), "torch_bn_buffers": int(out[1])} if len(out) == 2 else {}


def run_one(python: str, pipeline: str, args: argparse.Namespace, base: int, model: str | None, out_dir: str) -> dict[str, Any]:
    output = os.path.join(out_dir, f"{pipeline}-w{base}.nii")
    work = tempfile.mkdtemp(dir=out_dir)
    command = [python, str(Path(__file__).resolve()), "--child", pipeline, "--input", args.input, "--output",
               os.path.join(work, "labels.nii"), "--base", str(base), "--threads", str(args.threads)]
    if model:
        command += ["--model", model]
    env = dict(os.environ, MEDSEGAI_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), nnUNet_raw="/nonexistent", nnUNet_preprocessed="/nonexistent",
               nnUNet_results="/nonexistent", PYTHONPATH=os.pathsep.join([str(REPO / "MedSegAI"), str(REPO / "training"), str(BENCH)]))
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    status = process.returncode
    row: dict[str, Any] = {"pipeline": pipeline, "width": base, "process_s": round(wall, 2)}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            row.update(json.loads(line[len(MARK):]))
    if "end_to_end_s" not in row:
        row["error"] = f"exit {status}: " + " | ".join((stderr or stdout).strip().splitlines()[-3:])
    row["peak_rss_mb"] = _last_child_peak_mb()
    row["load_1m"] = round(os.getloadavg()[0], 2)
    for key in ("end_to_end_s", "model_s"):
        if key in row:
            row[key] = round(row[key], 2)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    Path(output).unlink(missing_ok=True)
    return row


def _last_child_peak_mb() -> float | None:
    """Peak RSS of the child just reaped: RUSAGE_CHILDREN's maximum only grows, so each child is run
    after a fresh fork of this parent (see :func:`run_isolated`)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def run_isolated(python: str, pipeline: str, args: argparse.Namespace, base: int, model: str | None, out_dir: str) -> dict[str, Any]:
    """:func:`run_one` in a forked copy of this process, so RUSAGE_CHILDREN holds that one child only."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            row = run_one(python, pipeline, args, base, model, out_dir)
        except BaseException as e:  # noqa: BLE001 - report, never propagate out of the fork
            row = {"pipeline": pipeline, "width": base, "error": repr(e)}
        os.write(write, json.dumps(row).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks).decode())


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def _versions(peer_python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m\nfor p in ('torch','monai','nnunetv2','SimpleITK','nibabel','scikit-image'):\n"
            "    try: print(p, m.version(p))\n    except Exception: pass")
    found = dict(line.split() for line in subprocess.run([peer_python, "-c", code], capture_output=True, text=True, check=False).stdout.splitlines())
    from importlib.metadata import version

    found["onnxruntime"] = version("onnxruntime")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help="CT file (default: the 512x512x200 CT of bench_inference.py, _common.synthetic_ct)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds (each runs every pipeline once)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipelines", default="medsegai,medsegai-int8,monai,nnunet")
    parser.add_argument("--peer-python", default=sys.executable, help="Python with torch, monai and nnunetv2")
    parser.add_argument("--model-16", default=str(REPO / "MedSegAI/Resources/Models/ct-abdomen-organs"),
                        help="model folder for width 16 (default: the shipped CT model)")
    parser.add_argument("--models-dir", default=str(BENCH / ".cache" / "peers-models"))
    args = parser.parse_args()
    if args.child:
        args.pipeline = args.child
        return child(args)

    sys.path.insert(0, str(BENCH))
    from _common import machine, synthetic_ct

    if not args.input:
        import SimpleITK as sitk

        source = synthetic_ct((512, 512, 200))
        args.input = str(source.with_suffix(".nii"))  # NIfTI, uncompressed: a format all three read
        if not Path(args.input).is_file():
            sitk.WriteImage(sitk.ReadImage(str(source)), args.input, useCompression=False)
    pipelines = args.pipelines.split(",")
    models: dict[int, str] = {}
    for base in args.widths:
        if base == 16:
            models[base] = args.model_16
        else:
            folder = Path(args.models_dir) / f"bench-unet2d-w{base}"
            if not folder.is_dir():
                folder.parent.mkdir(parents=True, exist_ok=True)
                make_width_model(base, folder)
            models[base] = str(folder)
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.model.precision import int8_weights

    rows: list[dict[str, Any]] = []
    info = {"machine": machine(), "input": args.input, "threads": args.threads, "versions": _versions(args.peer_python)}
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as out_dir:
        for base in args.widths:
            runnable = [p for p in pipelines if p != "medsegai-int8" or int8_weights(find_model(models[base]))[0] is not None]
            for round_index in range(args.repeat):
                shift = round_index % len(runnable)
                for pipeline in runnable[shift:] + runnable[:shift]:
                    python = sys.executable if pipeline.startswith("medsegai") else args.peer_python
                    row = run_isolated(python, pipeline, args, base, models[base] if pipeline.startswith("medsegai") else None,
                                       out_dir)
                    row["round"] = round_index
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {"info": info, "widths": {}}
    for base in args.widths:
        entry: dict[str, Any] = {"model": models[base], **parameter_counts(base, args.peer_python)}
        try:
            import onnx

            graph = onnx.load(str(Path(models[base]) / "model.onnx")).graph
            entry["onnx_parameters"] = int(sum(__import__("numpy").prod(t.dims) for t in graph.initializer))
        except Exception as e:  # noqa: BLE001 - informative only
            entry["onnx_parameters"] = repr(e)
        for pipeline in pipelines:
            mine = [r for r in rows if r["pipeline"] == pipeline and r["width"] == base and "error" not in r]
            if not mine:
                errors = [r.get("error") for r in rows if r["pipeline"] == pipeline and r["width"] == base]
                entry[pipeline] = {"error": errors[:1]}
                continue
            entry[pipeline] = {key: _median([r.get(key) for r in mine])
                               for key in ("end_to_end_s", "model_s", "process_s", "peak_rss_mb")}
            entry[pipeline]["same_grid_as_input"] = all(r.get("same_grid_as_input") for r in mine)
            entry[pipeline]["runs"] = len(mine)
        for ours in ("medsegai", "medsegai-int8"):
            for peer in ("monai", "nnunet"):
                a, b = entry.get(ours, {}), entry.get(peer, {})
                if "end_to_end_s" in a and "end_to_end_s" in b:
                    entry[f"{peer}/{ours}"] = {key: round(b[key] / a[key], 2) for key in
                                               ("end_to_end_s", "model_s", "process_s", "peak_rss_mb") if a.get(key) and b.get(key)}
        summary["widths"][str(base)] = entry
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
