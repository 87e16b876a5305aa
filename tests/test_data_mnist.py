"""MNIST IDX reading: the shipped files, user directories, and clear errors for bad files."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from lit_parallel.data.mnist import MNIST_MEAN, MNISTDataModule, find_mnist_root, load_mnist
from lit_parallel.errors import MissingDataError


def test_shipped_files_load():
    data = load_mnist()
    assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == torch.uint8
    assert data["test_labels"].shape == (10000,)
    assert set(data["train_labels"].unique().tolist()) == set(range(10))
    # Mean pixel of the training set is the published normalization constant.
    assert abs(data["train_images"].float().mean().item() / 255 - MNIST_MEAN) < 1e-3


def test_datamodule_split_and_normalization():
    dm = MNISTDataModule(batch_size=64, val_size=1000)
    dm.setup("fit")
    assert len(dm._splits["train"]) == 59000 and len(dm._splits["val"]) == 1000
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and labels.shape == (64,)
    assert abs(dm._splits["train"].tensors[0].mean().item()) < 0.05  # roughly zero-mean


def test_user_root_with_uncompressed_files(tmp_path):
    src = find_mnist_root()
    for gz in src.glob("*.gz"):
        with gzip.open(gz) as fin, open(tmp_path / gz.stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    assert torch.equal(load_mnist(tmp_path)["test_labels"], load_mnist()["test_labels"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(MissingDataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(MissingDataError, match="not a directory"):
        load_mnist(tmp_path / "nope")


def test_not_idx_is_detected(tmp_path):
    src = find_mnist_root()
    for gz in src.glob("*.gz"):
        shutil.copy(gz, tmp_path / gz.name)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"<html>not mnist</html>")
    with pytest.raises(MissingDataError, match="magic"):
        load_mnist(tmp_path)


def test_truncated_file_is_detected(tmp_path):
    src = find_mnist_root()
    for gz in src.glob("*.gz"):
        shutil.copy(gz, tmp_path / gz.name)
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz") as f:
        data = f.read()
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(data[:-10])
    with pytest.raises(MissingDataError, match="corrupt"):
        load_mnist(tmp_path)
