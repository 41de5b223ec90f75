"""Datasets: Fashion-MNIST, CIFAR-10/100, ImageNet and a synthetic set, behind one registry.

    data = resode.data.get_dataset("fashion_mnist", device="cuda")
    loader = data.loader("train", batch_size=128, seed=0)
    loader.set_epoch(0)
    for x, y in loader: ...          # x: (B, C, H, W) float32 on the device, normalised

Small datasets (Fashion-MNIST, CIFAR, synthetic) are held as uint8/float tensors on the
training device; batches are gathered, augmented (random crop with 4-pixel zero padding and
horizontal flip for CIFAR) and normalised there, in one batched operation, not per image.
ImageNet is read from class folders with torchvision's ``ImageFolder`` and its standard
transforms in DataLoader workers.

Where the files are looked for (Fashion-MNIST): the ``root`` argument, then ``$RESODE_DATA``,
then Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). CIFAR
and ImageNet: ``root``, then ``$RESODE_DATA``. A base directory may hold the files directly or
in the usual sub-folder (``fashion-mnist/``, ``FashionMNIST/raw/``, ``cifar-10-batches-py/``,
``imagenet/``). A ``root`` that does not exist is an error (it names the root and where the
dataset was found instead), never silently replaced; a root that exists but lacks the dataset
falls through to the next place with a logged warning. :attr:`Data.root` records the folder
the files were read from. Missing files are downloaded when ``download=True`` and the network
allows (not ImageNet); otherwise the error says where the files are expected and how to get
them.

Data order: every epoch's order is a function of ``(seed, epoch)`` only, so resuming at an
epoch boundary replays the same order; under data parallelism each rank takes a strided slice
of every *global* batch, so the union of the ranks' batches is the single-process batch.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("resode.data")

#: Debian's dataset-fashion-mnist install location (searched last).
FASHION_MNIST_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
#: Environment variable naming a data root.
DATA_ENV = "RESODE_DATA"

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
STATS = {  # per-channel mean, std of the training images in [0, 1]
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they are expected (the message says how to get them)."""


# ----------------------------------------------------------------------------- file formats
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type code {code:#x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape).astype(dtypes[code][1:], copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle batch -> images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    labels = d.get("labels", d.get("fine_labels"))
    if "data" not in d or labels is None:
        raise ValueError(f"{path} is not a CIFAR batch (needs 'data' and 'labels'/'fine_labels')")
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- locations
def _candidate_roots(root: str | os.PathLike | None, system: tuple[str, ...] = ()) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root).expanduser())
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    roots += [Path(p) for p in system]
    return roots


def _check_root(
    root: str | os.PathLike | None, found: Path | None, what: str, message: str, download: bool
) -> None:
    """An explicit ``root`` must be a folder: a typo is never replaced by another copy of the
    dataset. A dataset ``found`` outside an existing ``root`` is used with a logged warning."""
    if root is None:
        return
    r = Path(root).expanduser()
    if not r.is_dir():
        problem = "does not exist" if not r.exists() else "is not a folder"
        hint = f" {what} was found in {found}: pass that, or leave the root out." if found else ""
        if download:
            hint += " To download the files into a new folder, create it first."
        raise DatasetNotFoundError(f"data root {r} {problem}.{hint}\n{message}")
    if found is not None and found != r and r not in found.parents:
        log.warning("%s is not in the data root %s; using the copy in %s", what, r, found)


def _find_file(d: Path, name: str) -> Path | None:
    for cand in (d / name, d / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


def _find_fashion_mnist(roots: list[Path]) -> Path | None:
    for r in roots:
        for d in (r, r / "fashion-mnist", r / "FashionMNIST" / "raw", r / "fashion_mnist"):
            if all(_find_file(d, n) for names in FASHION_MNIST_FILES.values() for n in names):
                return d
    return None


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (raises on any network error)."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    os.replace(tmp, dest)


def _download_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "resode" / "data"


# ----------------------------------------------------------------------------- tensor datasets
@dataclass
class TensorSplit:
    """One split held as tensors: ``images`` (N, C, H, W) uint8 (or float), ``labels`` (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Data:
    """A dataset: its splits and what a model needs to know about it.

    Attributes:
        name: registry name.
        train, test: :class:`TensorSplit` (tensor datasets) or torch ``Dataset`` (ImageNet).
        num_classes, in_channels, image_size: for building the model.
        mean, std: per-channel normalisation applied to ``[0, 1]`` images (uint8 storage).
        augment: random crop (4-pixel zero padding) + horizontal flip on training batches.
        device: where tensor splits live and batches are produced.
        num_workers: DataLoader workers (folder datasets).
        root: the folder the files were read from (``None`` for generated data).
    """

    name: str
    train: Any
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_workers: int = 4
    root: str | None = None

    def loader(
        self,
        split: str,
        batch_size: int,
        seed: int = 0,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> TensorLoader | FolderLoader:
        """A re-iterable loader over ``split`` (``"train"`` or ``"test"``).

        ``batch_size`` is the *global* batch; with ``world_size > 1`` each rank gets a strided
        ``1/world_size`` slice of every global batch (``batch_size`` must divide evenly).
        Training defaults: shuffled, augmented (if the dataset says so), last partial batch
        dropped. Test: in order, no augmentation, nothing dropped.
        """
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
        train = split == "train"
        ds = self.train if train else self.test
        kw = dict(
            batch_size=batch_size,
            seed=seed,
            shuffle=train if shuffle is None else shuffle,
            drop_last=train if drop_last is None else drop_last,
            rank=rank,
            world_size=world_size,
        )
        if isinstance(ds, TensorSplit):
            return TensorLoader(
                ds,
                augment=self.augment and train,
                mean=self.mean,
                std=self.std,
                device=self.device,
                **kw,
            )
        return FolderLoader(ds, num_workers=self.num_workers, device=self.device, **kw)


def _epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt * 104_729) % (2**63 - 1))
    return g


class _ShardedBatches:
    """Global-batch index schedule, sharded by rank; a function of ``(seed, epoch)`` only."""

    def __init__(self, n, batch_size, seed, shuffle, drop_last, rank, world_size):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the global batch size {batch_size} must be divisible by the number of "
                f"processes {world_size}"
            )
        if n == 0:
            raise ValueError("empty dataset split")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def global_batches(self) -> Iterator[Tensor]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=_epoch_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def local(self, idx: Tensor) -> Tensor:
        return idx[self.rank :: self.world_size]


class TensorLoader(_ShardedBatches):
    """Batches of a :class:`TensorSplit` gathered, augmented and normalised on its device.

    Augmentation random numbers come from a CPU generator seeded by ``(seed, epoch)`` and are
    drawn for the whole global batch, so results do not depend on the number of processes.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        device: torch.device | str = "cpu",
        padding: int = 4,
    ) -> None:
        super().__init__(len(split), batch_size, seed, shuffle, drop_last, rank, world_size)
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.augment, self.padding = augment, padding
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if self.mean.shape[1] not in (1, c):
            raise ValueError(f"mean has {self.mean.shape[1]} channels, images have {c}")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = _epoch_generator(self.seed, self.epoch, salt=1)
        for idx in self.global_batches():
            rand = None
            if self.augment:
                p2 = 2 * self.padding + 1
                rand = (
                    torch.randint(0, p2, (len(idx), 2), generator=gen),  # crop offsets (dy, dx)
                    torch.rand(len(idx), generator=gen) < 0.5,  # flip
                )
                rand = tuple(self.local(r).to(self.device) for r in rand)
            local = self.local(idx).to(self.device)
            yield self._batch(local, rand), self.labels[local]

    def _batch(self, idx: Tensor, rand: tuple[Tensor, Tensor] | None) -> Tensor:
        x = self.images[idx]  # (B, C, H, W)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if rand is not None:
            x = random_crop_flip(x, rand[0], rand[1], self.padding)
        return (x - self.mean) / self.std


def random_crop_flip(x: Tensor, offsets: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Batched random crop (zero padding ``padding``) and horizontal flip.

    Args:
        x: (B, C, H, W) images.
        offsets: (B, 2) integer crop offsets ``(dy, dx)`` in ``[0, 2 * padding]``.
        flip: (B,) bool, flip horizontally.
    """
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


class FolderLoader(_ShardedBatches):
    """DataLoader over a map-style dataset (ImageFolder) with the same sharded batch schedule."""

    def __init__(
        self,
        dataset,
        batch_size,
        seed=0,
        shuffle=True,
        drop_last=True,
        rank=0,
        world_size=1,
        num_workers=4,
        device="cpu",
    ) -> None:
        super().__init__(len(dataset), batch_size, seed, shuffle, drop_last, rank, world_size)
        self.dataset, self.num_workers = dataset, num_workers
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = [self.local(idx).tolist() for idx in self.global_batches()]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=_epoch_generator(self.seed, self.epoch, salt=2 + self.rank),
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- datasets
def fashion_mnist(
    root: str | os.PathLike | None = None,
    download: bool = True,
    device="cpu",
    augment: bool | None = None,
    **_: Any,
) -> Data:
    """Fashion-MNIST (IDX files), 28x28 grey images, 10 classes (no augmentation by default)."""
    roots = _candidate_roots(root, FASHION_MNIST_SYSTEM_DIRS)
    d, msg = _find_fashion_mnist(roots), _fmnist_message(roots)
    _check_root(root, d, "Fashion-MNIST", msg, download)
    if d is None and download:
        dest = _download_root(root) / "fashion-mnist"
        try:
            for names in FASHION_MNIST_FILES.values():
                for n in names:
                    if not (dest / (n + ".gz")).is_file():
                        _download(FASHION_MNIST_URL + n + ".gz", dest / (n + ".gz"))
            d = dest
        except Exception as e:
            raise DatasetNotFoundError(msg + f"\nDownload failed: {e}") from e
    if d is None:
        raise DatasetNotFoundError(msg)
    splits = {}
    for split, (img, lab) in FASHION_MNIST_FILES.items():
        x = read_idx(_find_file(d, img))
        y = read_idx(_find_file(d, lab))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{d}: {split} images {x.shape} and labels {y.shape} do not match")
        splits[split] = TensorSplit(
            torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
        )
    mean, std = STATS["fashion_mnist"]
    return Data(
        "fashion_mnist",
        splits["train"],
        splits["test"],
        10,
        1,
        28,
        mean,
        std,
        bool(augment),
        torch.device(device),
        root=str(d),
    )


def _fmnist_message(roots: list[Path]) -> str:
    files = ", ".join(f"{n}.gz" for names in FASHION_MNIST_FILES.values() for n in names)
    where = "\n".join(f"  - {r} (or its fashion-mnist/ sub-folder)" for r in roots)
    return (
        f"Fashion-MNIST not found. Expected the IDX files ({files}) in one of:\n{where}\n"
        f"Get them with `apt install dataset-fashion-mnist` (Debian/Ubuntu), or download them "
        f"from {FASHION_MNIST_URL} into a directory and pass root=... or set ${DATA_ENV}."
    )


def _cifar(name: str, root, download: bool, device, augment: bool | None) -> Data:
    sub = CIFAR_DIRS[name]
    roots = _candidate_roots(root)
    files = CIFAR_FILES[name]
    found = None
    for r in roots:
        for d in (r / sub, r):
            if all((d / f).is_file() for fs in files.values() for f in fs):
                found = d
                break
        if found:
            break
    msg = (
        f"{name.upper()} not found: expected the python pickle batches "
        f"({', '.join(f for fs in files.values() for f in fs)}) in "
        + (" or ".join(f"{r / sub}" for r in roots) or f"<root>/{sub} (no root given)")
        + f". Download {CIFAR_URLS[name]} and extract it into the root (it creates {sub}/), "
        f"then pass root=... or set ${DATA_ENV}."
    )
    _check_root(root, found, name.upper(), msg, download)
    if found is None and download:
        import tarfile

        base = _download_root(root)
        archive = base / CIFAR_URLS[name].rsplit("/", 1)[1]
        try:
            if not archive.is_file():
                _download(CIFAR_URLS[name], archive)
            with tarfile.open(archive) as tf:
                tf.extractall(base, filter="data")
            found = base / sub
        except Exception as e:
            raise DatasetNotFoundError(msg + f"\nDownload failed: {e}") from e
    if found is None:
        raise DatasetNotFoundError(msg)
    splits = {}
    for split, fs in files.items():
        xs, ys = zip(*(read_cifar_batch(found / f) for f in fs))
        splits[split] = TensorSplit(
            torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        )
    mean, std = STATS[name]
    return Data(
        name,
        splits["train"],
        splits["test"],
        10 if name == "cifar10" else 100,
        3,
        32,
        mean,
        std,
        True if augment is None else augment,
        torch.device(device),
        root=str(found),
    )


def cifar10(root=None, download: bool = True, device="cpu", augment=None, **_: Any) -> Data:
    """CIFAR-10 (python pickle batches), random crop + flip on training batches by default."""
    return _cifar("cifar10", root, download, device, augment)


def cifar100(root=None, download: bool = True, device="cpu", augment=None, **_: Any) -> Data:
    """CIFAR-100 (python pickle batches), random crop + flip on training batches by default."""
    return _cifar("cifar100", root, download, device, augment)


def imagenet(
    root=None,
    download: bool = False,
    device="cpu",
    image_size: int = 224,
    num_workers: int = 8,
    **_: Any,
) -> Data:
    """ImageNet from class folders ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

    Standard transforms: training RandomResizedCrop(image_size) + horizontal flip; evaluation
    Resize(image_size * 256 / 224) + CenterCrop(image_size); then normalisation. ImageNet
    cannot be downloaded automatically (``download`` is ignored).
    """
    del download
    from torchvision import datasets, transforms

    roots = _candidate_roots(root)
    found = None
    for r in roots:
        for d in (r, r / "imagenet"):
            if (d / "train").is_dir() and (d / "val").is_dir():
                found = d
                break
        if found:
            break
    where = " or ".join(str(r) for r in roots) or "<root> (no root given)"
    msg = (
        f"ImageNet not found: expected class folders train/<wnid>/*.JPEG and "
        f"val/<wnid>/*.JPEG under {where}. It cannot be downloaded automatically: get "
        "ILSVRC2012 from https://image-net.org, extract it into that layout (e.g. with "
        f"the usual valprep.sh for val/), then pass root=... or set ${DATA_ENV}."
    )
    _check_root(root, found, "ImageNet", msg, download=False)
    if found is None:
        raise DatasetNotFoundError(msg)
    mean, std = STATS["imagenet"]
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(int(round(image_size * 256 / 224))),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    train = datasets.ImageFolder(str(found / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(found / "val"), transform=test_tf)
    if train.classes != test.classes:
        raise ValueError(f"{found}: train/ and val/ have different class folders")
    return Data(
        "imagenet",
        train,
        test,
        len(train.classes),
        3,
        image_size,
        mean,
        std,
        False,
        torch.device(device),
        num_workers,
        root=str(found),
    )


def synthetic(
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 16,
    noise: float = 1.0,
    seed: int = 0,
    device="cpu",
    augment: bool = False,
    **_: Any,
) -> Data:
    """A learnable synthetic image set: a random template per class plus Gaussian noise.

    Images are float tensors (already normalised); fully determined by ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_channels, image_size, image_size, generator=g)

    def make(n: int) -> TensorSplit:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
        return TensorSplit(x, y)

    return Data(
        "synthetic",
        make(num_train),
        make(num_test),
        num_classes,
        in_channels,
        image_size,
        augment=augment,
        device=torch.device(device),
    )


_DATASETS: dict[str, Callable[..., Data]] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagenet": imagenet,
    "synthetic": synthetic,
}
_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset` (aliases not included)."""
    return sorted(_DATASETS)


def get_dataset(name: str, root: str | os.PathLike | None = None, **kwargs: Any) -> Data:
    """Load a dataset by name.

    Args:
        name: one of :func:`list_datasets` (aliases: ``fmnist``, ``cifar-10``, ...).
        root: where to look first (see the module docstring for the search order).
        **kwargs: ``device``, ``download``, ``augment`` and dataset-specific options
            (``synthetic``: ``num_train``, ``image_size``, ...; ``imagenet``: ``image_size``,
            ``num_workers``).

    Raises:
        ValueError: unknown name (lists the choices).
        DatasetNotFoundError: files missing (says where they are expected and how to get them).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return _DATASETS[key](root=root, **kwargs)
