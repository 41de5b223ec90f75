"""Every experiment's ``paper`` preset starts, trains, checkpoints and resumes on files in the
exact formats of the paper's datasets (CIFAR-10 python pickle batches, ImageNet class folders),
written here in miniature: ``--max-steps 2`` runs every training section for one epoch of two
steps and cuts the sweeps, so the whole preset runs in seconds to a minute.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resode.reproduce import EXPERIMENTS, get_experiment, run_experiment
from resode.reproduce.files import read_complete

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_LABELS = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                  b"horse", b"ship", b"truck"]  # fmt: skip
WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_cifar10(root: Path, per_batch: int = 60, n_test: int = 100, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` as the official archive holds it: ``data_batch_1..5`` and
    ``test_batch`` (pickled dicts with bytes keys ``batch_label``, ``labels``, ``data`` uint8
    ``(n, 3072)``, ``filenames``) and ``batches.meta``, pickled with protocol 2 as Python 2
    wrote them."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def batch(name: str, label: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        obj = {b"batch_label": label.encode(), b"labels": labels, b"data": data,
               b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}  # fmt: skip
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for i in range(1, 6):
        batch(f"data_batch_{i}", f"training batch {i} of 5", per_batch)
    batch("test_batch", "testing batch 1 of 1", n_test)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_LABELS, b"num_vis": 3072}
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return d


def write_imagenet(root: Path, per_class: int = 12, n_val: int = 4, seed: int = 0) -> Path:
    """``root/imagenet/{train,val}/<wnid>/*.JPEG`` (ILSVRC2012 layout, val/ already sorted into
    class folders), small random RGB JPEGs of varied sizes."""
    from PIL import Image

    base = root / "imagenet"
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", n_val)):
        for c, wnid in enumerate(WNIDS):
            d = base / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                val = f"ILSVRC2012_val_{c:04d}{i:04d}.JPEG"
                name = f"{wnid}_{i}.JPEG" if split == "train" else val
                Image.fromarray(img).save(d / name, format="JPEG", quality=90)
    return base


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root)
    write_imagenet(root)
    return root


def test_written_files_read_back_in_the_paper_formats(data_root):
    from resode.data import STATS, get_dataset, read_cifar_batch

    x, y = read_cifar_batch(data_root / "cifar-10-batches-py" / "data_batch_3")
    with open(data_root / "cifar-10-batches-py" / "data_batch_3", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(x.reshape(len(x), -1), raw[b"data"])
    assert y.tolist() == raw[b"labels"]
    data = get_dataset("cifar10", root=data_root, download=False)
    assert (len(data.train), len(data.test), data.num_classes) == (300, 100, 10)
    xb, yb = next(iter(data.loader("test", 100, shuffle=False)))
    test_x, test_y = read_cifar_batch(data_root / "cifar-10-batches-py" / "test_batch")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in STATS["cifar10"])
    torch.testing.assert_close(xb, (torch.from_numpy(test_x).float() / 255 - mean) / std)
    assert yb.tolist() == test_y.tolist()
    inet = get_dataset("imagenet", root=data_root, image_size=32, num_workers=0)
    assert (len(inet.train), len(inet.test), inet.num_classes) == (36, 12, 3)
    xi, yi = next(iter(inet.loader("test", 12, shuffle=False)))
    assert xi.shape == (12, 3, 32, 32) and sorted(set(yi.tolist())) == [0, 1, 2]


#: what keeps a paper preset small on two CPU cores (the model, the optimiser and the data format
#: stay the paper's): small batches, 32-pixel ImageNet crops, no loader workers, and the sweep
#: points run in this process (the command-line test below uses the preset's own launcher)
SMALL = dict(train_overrides=dict(batch_size=8, test_batch_size=8), launcher="inline")
IMAGENET_SMALL = dict(data_kwargs=dict(image_size=32, num_workers=0))
#: measurement batches of the experiments (none may exceed the 36 training images written here)
MEASURE_SMALL = {"adjoint-failure": dict(grad_batch=8)}


def _training_runs(out: Path, exp_id: str) -> list[Path]:
    return sorted(p.parent for p in (out / exp_id).rglob("metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("exp_id", list(EXPERIMENTS))
def test_paper_preset_runs_checkpoints_and_resumes(data_root, tmp_path, exp_id):
    exp = get_experiment(exp_id)
    extra = dict(SMALL, **(IMAGENET_SMALL if exp.paper_dataset == "imagenet" else {}),
                 **MEASURE_SMALL.get(exp_id, {}))  # fmt: skip
    kw = dict(out=tmp_path, device="cpu", data_root=str(data_root), max_steps=2, **extra)
    first = run_experiment(exp_id, "paper", **kw)
    assert first["preset"] == "paper" and first["max_steps"] == 2 and first["claims"]
    assert "--max-steps 2" in first["device_note"]
    for run in _training_runs(tmp_path, exp_id):
        epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert [e["steps"] for e in epochs] == [2], run  # one epoch of two steps
        ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 1 and ckpt["train_config"]["max_steps_per_epoch"] == 2
    # the second run reuses every finished point (checkpoints validated) and recomputes nothing
    second = run_experiment(exp_id, "paper", **kw)
    assert second.get("reused") is True, f"{exp_id}: the rerun recomputed points"
    assert [c["verdict"] for c in second["claims"]] == [c["verdict"] for c in first["claims"]]
    prov = json.loads((tmp_path / exp_id / "provenance.json").read_text())
    assert prov["config"]["max_steps"] == 2


@pytest.mark.slow
def test_paper_preset_from_the_command_line_resumes_an_interrupted_run(data_root, tmp_path):
    """``resode run gradient-error --preset paper --max-steps 2`` at the paper's batch sizes; a
    training run cut after its checkpoint is resumed, not restarted, by the rerun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "resode.cli", "run", "gradient-error", "--preset", "paper",
           "--max-steps", "2", "--out", str(tmp_path), "--data-root", str(data_root),
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient-error: wrote" in proc.stdout
    s = read_complete(tmp_path / "gradient-error" / "summary.json")
    assert s["preset"] == "paper" and s["max_steps"] == 2
    runs = _training_runs(tmp_path, "gradient-error")
    assert len(runs) == 2  # Euler and Heun base models, batch 256 as in the paper
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())["train_config"]
        assert cfg["batch_size"] == 256 and cfg["max_steps_per_epoch"] == 2
    # interrupt: the sweep file of one training point is lost, its checkpoint kept
    point = tmp_path / "gradient-error" / "train" / f"{runs[0].name}.json"
    point.unlink()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((runs[0] / "config.json").read_text())["resumes"]
    assert resumed and resumed[-1]["epoch"] == 1  # resumed from the checkpoint of epoch 1
    prov = json.loads((tmp_path / "gradient-error" / "provenance.json").read_text())
    assert prov["points_computed"] == 1  # only the lost point, and nothing it fed changed
