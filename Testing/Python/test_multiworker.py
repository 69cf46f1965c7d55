"""Two training workers on 127.0.0.1 with MultiWorkerMirroredStrategy (TF_CONFIG) train a few steps
on the real brain-tumour studies and end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedSegAILib.data.dataset import add_case
from MedSegAILib.io.imageio import read_volume

pytestmark = pytest.mark.slow

WORKER = r"""
import json, os, sys
index, ports, dataset, output = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": index}})
from medsegai_training.trainer import train
config = {"model": {"builder": "unet_2d", "base_filters": 4, "depth": 2, "norm": "instance"},
          "spatial": {"mode": "2d", "axis": "axial", "patch_size": [32, 32], "target_spacing": [4.0, 4.0, None],
                      "divisible_by": 4},
          "channels": [{"name": "T1post", "normalization": {"method": "zscore", "nonzero": True}}],
          "epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "augmentation": {"enabled": False}, "seed": 3}
print(train(dataset, output, config=config, strategy="multiworker"))
"""


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_two_workers_end_with_identical_weights(shared_data: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "brain"
    for study in ("PGBM-001/1991-11-19", "PGBM-003/1995-03-29"):
        folder = shared_data / "mr-brain-tumor" / study
        image = read_volume(folder / "T1post.nrrd")
        label = image.with_array(read_volume(folder / "MaskTumor.nrrd").array)
        add_case(dataset, [image], label, ["T1post"], {"tumor": 1}, patient_key=study.split("/")[0])
    ports = ",".join(str(p) for p in _free_ports(2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    outputs = [tmp_path / f"worker{i}" for i in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i), ports, str(dataset), str(outputs[i])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=420)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]

    for output in outputs:
        run = json.loads((output / "training" / "run.json").read_text())
        assert run["status"] == "finished"
        assert run["runtime"]["strategy"] == "multiworker" and run["runtime"]["workers"] == 2
        assert run["runtime"]["replicas"] == 2 and run["state"]["epochs_done"] == 2
    # the chief (worker 0) exports the model folder; the other worker only trains
    assert (outputs[0] / "model.json").is_file() and not (outputs[1] / "model.json").exists()
    first, second = (_weights(o / "training" / "final.weights.h5") for o in outputs)
    assert first.keys() == second.keys() and len(first) > 10
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # both saw the same (all-reduced) losses
    histories = [(o / "training" / "history.csv").read_text() for o in outputs]
    assert histories[0] == histories[1] and histories[0].count("\n") == 3
