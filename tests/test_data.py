"""Datasets: readers on fixture files written in the exact on-disk formats, loaders, errors."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from resode import data as D


@pytest.fixture
def no_system_data(monkeypatch):
    """Hide $RESODE_DATA and the Debian install so that only the given root is searched."""
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", ())


def _write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """IDX as in the original files, written independently of resode's writer."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fmnist_fixture(root: Path, n_train: int = 12, n_test: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        _write_idx_gz(root / f"{name}.gz", arr)
    return arrays


def test_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x.idx", "x.idx.gz"):
        D.write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(D.read_idx(tmp_path / name), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")


def test_fashion_mnist_from_root(tmp_path, no_system_data):
    arrays = _fmnist_fixture(tmp_path / "fashion-mnist")
    data = D.get_dataset("fashion_mnist", root=tmp_path, download=False)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.train.images.shape == (12, 1, 28, 28) and data.train.images.dtype == torch.uint8
    train_images = arrays["train-images-idx3-ubyte"]
    np.testing.assert_array_equal(data.train.images[:, 0].numpy(), train_images)
    np.testing.assert_array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.test.labels.dtype == torch.int64
    # loader: normalised floats, in order for the test split, nothing dropped
    loader = data.loader("test", batch_size=4)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 3]
    x0 = batches[0][0]
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][:4]).float()
    expect = (raw / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x0[:, 0], expect)


def test_fashion_mnist_from_env_and_system_dir(tmp_path, monkeypatch, no_system_data, caplog):
    _fmnist_fixture(tmp_path / "env")
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path / "env"))
    assert len(D.fashion_mnist(download=False).train) == 12
    monkeypatch.delenv(D.DATA_ENV)
    _fmnist_fixture(tmp_path / "sys", n_train=5)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", (str(tmp_path / "sys"),))
    # the given root is searched first, then the system directory (announced, and recorded)
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="resode.data"):
        data = D.fashion_mnist(root=tmp_path / "empty", download=False)
    assert len(data.train) == 5 and data.root == str(tmp_path / "sys")
    assert f"not in the data root {tmp_path / 'empty'}" in caplog.text
    _fmnist_fixture(tmp_path / "empty" / "fashion-mnist", n_train=3)
    data = D.fashion_mnist(root=tmp_path / "empty", download=False)
    assert len(data.train) == 3 and data.root == str(tmp_path / "empty" / "fashion-mnist")


@pytest.mark.parametrize("download", [False, True])
def test_a_root_that_does_not_exist_is_an_error_not_a_fallback(
    tmp_path, monkeypatch, no_system_data, download
):
    _fmnist_fixture(tmp_path / "sys")
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", (str(tmp_path / "sys"),))
    monkeypatch.setattr(D, "_download", None)  # never reached
    typo = tmp_path / "dtaa"
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.get_dataset("fashion_mnist", root=typo, download=download)
    msg = str(e.value)
    assert msg.startswith(f"data root {typo} does not exist.")
    assert f"Fashion-MNIST was found in {tmp_path / 'sys'}" in msg
    assert ("create it first" in msg) == download
    _cifar_fixture(tmp_path / "env", "cifar10")
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(D.DatasetNotFoundError, match="CIFAR10 was found in .*env"):
        D.get_dataset("cifar10", root=typo, download=download)
    assert D.get_dataset("cifar10", download=False).root == str(
        tmp_path / "env" / "cifar-10-batches-py"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(D.DatasetNotFoundError, match="is not a folder"):
        D.get_dataset("cifar10", root=tmp_path / "file", download=download)


def test_fashion_mnist_missing_offline(tmp_path, monkeypatch, no_system_data):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.get_dataset("fmnist", root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg
    assert "apt install dataset-fashion-mnist" in msg

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(D, "_download", offline)
    with pytest.raises(D.DatasetNotFoundError, match="Download failed.*no network"):
        D.get_dataset("fmnist", root=tmp_path, download=True)


def _cifar_fixture(root: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR python batches: pickled dicts with bytes keys, data (N, 3072) uint8 row-major."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        d, key = root / "cifar-10-batches-py", b"labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        d, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    d.mkdir(parents=True)
    out = {}
    for i, f in enumerate(files):
        n = 3 + i
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        payload = {b"batch_label": b"fixture", key: y, b"data": x, b"filenames": [b"a"] * n}
        if name == "cifar100":
            payload[b"coarse_labels"] = [0] * n
        with open(d / f, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
        out[f] = (x, np.array(y))
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, name, no_system_data):
    batches = _cifar_fixture(tmp_path, name)
    data = D.get_dataset(name, root=tmp_path, download=False)
    train_files = [f for f in batches if f not in ("test_batch", "test")]
    x_all = np.concatenate([batches[f][0] for f in train_files])
    assert data.train.images.shape == (len(x_all), 3, 32, 32)
    # channel-major rows: the first 1024 values are the red plane
    np.testing.assert_array_equal(data.train.images[0, 0].numpy().ravel(), x_all[0, :1024])
    np.testing.assert_array_equal(data.train.images[1, 2].numpy().ravel(), x_all[1, 2048:])
    test_file = "test_batch" if name == "cifar10" else "test"
    np.testing.assert_array_equal(data.test.labels.numpy(), batches[test_file][1])
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.augment


def test_cifar_missing_offline(tmp_path, no_system_data):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.get_dataset("cifar10", root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg


def test_imagenet_folder_tree(tmp_path, no_system_data):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            d = tmp_path / "imagenet" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{cls}_{i}.png")
    data = D.get_dataset("imagenet", root=tmp_path, image_size=16, num_workers=0)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.test) == 4
    loader = data.loader("train", batch_size=4, seed=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 1  # 6 // 4, last partial batch dropped for training
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    xs, ys = zip(*data.loader("test", batch_size=3), strict=True)
    assert [len(v) for v in ys] == [3, 1] and xs[0].shape == (3, 3, 16, 16)
    assert torch.cat(ys).tolist() == [0, 0, 1, 1]
    with pytest.raises(D.DatasetNotFoundError, match="image-net.org"):
        D.get_dataset("imagenet", root=tmp_path / "nothing")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="cifar10.*fashion_mnist.*imagenet.*synthetic"):
        D.get_dataset("mnist3d")


def test_random_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 2, 6, 7, generator=g)
    offsets = torch.randint(0, 9, (5, 2), generator=g)
    flip = torch.tensor([True, False, True, False, True])
    out = D.random_crop_flip(x, offsets, flip, padding=4)
    for i in range(5):
        padded = torch.zeros(2, 14, 15)
        padded[:, 4:10, 4:11] = x[i]
        dy, dx = offsets[i].tolist()
        ref = padded[:, dy : dy + 6, dx : dx + 7]
        if flip[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=0)


def test_loader_order_is_seeded_and_sharded():
    data = D.synthetic(num_train=40, num_test=8, image_size=4, augment=True)

    def epoch(seed, e, rank=0, world=1):
        loader = data.loader("train", 8, seed=seed, rank=rank, world_size=world)
        loader.set_epoch(e)
        return list(loader)

    a, b = epoch(0, 0), epoch(0, 0)
    assert len(a) == 5
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(epoch(0, 1)[0][0], a[0][0])
    assert not torch.equal(epoch(1, 0)[0][0], a[0][0])
    # two ranks: the union of their batches (augmentation included) is the global batch
    r0, r1 = epoch(0, 0, 0, 2), epoch(0, 0, 1, 2)
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1, strict=True):
        assert len(y0) == len(y1) == 4
        torch.testing.assert_close(torch.stack([x0, x1], 1).flatten(0, 1), x, rtol=0, atol=0)
        assert torch.equal(torch.stack([y0, y1], 1).flatten(), y)
    with pytest.raises(ValueError, match="divisible"):
        data.loader("train", 7, world_size=2)


def test_synthetic_is_deterministic():
    a, b = D.synthetic(seed=3, num_train=16), D.synthetic(seed=3, num_train=16)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


@pytest.mark.skipif(
    not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    data = D.get_dataset("fashion_mnist", download=False)
    assert data.train.images.shape == (60000, 1, 28, 28) and data.test.labels.shape == (10000,)
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
