"""LightningModules for Hugging Face models: sequence classification and causal language modeling.

Batches are dicts as the text DataModules produce them: ``input_ids``, optional ``attention_mask`` and
``labels`` (class ids, or token ids with ``-100`` at ignored positions). The loss is computed here, not
by the HF model, so pipeline stages that return plain logits work the same as whole models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.models.base import ParallelModule, real_device
from lit_parallel.models.loading import load_causal_lm, load_sequence_classifier

__all__ = ["CausalLM", "SequenceClassifier"]

IGNORE_INDEX = -100


def _logits(outputs: Any) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def _hf_inputs(batch: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (), {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def _check_num_labels(num_labels: int) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigurationError(f"model.num_labels={num_labels!r} must be an integer >= 2.")


class SequenceClassifier(ParallelModule):
    """Fine-tunes any HF sequence-classification model; logs loss, accuracy and macro-F1.

    Args:
        model: a model instance (its forward returns logits or an object with ``.logits``) or a name
            for :func:`~lit_parallel.models.loading.load_sequence_classifier`: ``"minilm"`` (offline),
            ``"bert_debug"``, a local folder or a hub name such as ``"bert-base-uncased"``. Encoder-only
            checkpoints get a new ``num_labels`` head on their pretrained encoder.
        num_labels: number of classes; ``None`` reads an instance's ``config.num_labels`` (2 for a name).
        **optim: optimizer/schedule settings of :class:`ParallelModule` (``lr``, ``lr_schedule``, ...).

    Raises:
        ConfigurationError: ``num_labels < 2``, or an instance whose config disagrees with it.
        MissingDataError: an offline package is missing (the message has the pip command).

    Example::

        model = SequenceClassifier("minilm", num_labels=5, lr=1e-4, lr_schedule="linear", warmup_steps=20)
        Trainer(max_epochs=2).fit(model, datamodule=TextClassificationDataModule("minilm"))
    """

    def __init__(self, model: nn.Module | str = "minilm", num_labels: int | None = None, **optim: Any) -> None:
        super().__init__(**optim)
        if isinstance(model, str):
            num_labels = 2 if num_labels is None else num_labels
            _check_num_labels(num_labels)
            model = load_sequence_classifier(model, num_labels)
        configured = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels is None:
            # An instance says how many classes it has; a model without a config must be told.
            if configured is None:
                raise ConfigurationError(
                    f"model.num_labels is needed: {type(model).__name__} has no config.num_labels to infer it from."
                )
            num_labels = configured
        _check_num_labels(num_labels)
        if configured is not None and configured != num_labels:
            raise ConfigurationError(
                f"model.num_labels={num_labels} but the model's config has {configured}; pass num_labels={configured} "
                "or leave it out (it is read from the config)."
            )
        self.model = model
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps modes as it finds them
        self.hf_config = getattr(self.model, "config", None)
        self.num_labels = num_labels
        with real_device():  # metric states are small: real tensors even under empty_init (meta)
            self.metrics = nn.ModuleDict(
                {
                    f"{stage}_{name}": metric
                    for stage in ("val", "test")
                    for name, metric in (
                        ("acc", torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)),
                        ("f1", torchmetrics.F1Score(task="multiclass", num_classes=num_labels, average="macro")),
                    )
                }
            )

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _hf_inputs(batch)

    def loss_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"]

    def loss_fn(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_logits(outputs).float(), target)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, outputs = self.forward_loss(batch)
        preds = _logits(outputs).argmax(-1)
        acc, f1 = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_f1"]
        acc(preds, batch["labels"])
        f1(preds, batch["labels"])
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=True)
        self.log(f"{stage}/f1_macro", f1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        args, kwargs = self.model_inputs(batch)
        return _logits(self.model(*args, **kwargs)).argmax(-1)


class CausalLM(ParallelModule):
    """Fine-tunes any HF causal LM with next-token cross-entropy; logs loss and perplexity.

    Perplexity is ``exp`` of the mean next-token loss over all non-ignored tokens of the split
    (token-weighted, synced across ranks). When the trainer's sanity check covers the whole validation
    set (``trainer.num_sanity_val_steps=-1``), its perplexity is that of the model before fine-tuning
    and is logged with every later validation as ``val/ppl_pretrained``, so one run records both (the
    test epoch logs ``val/ppl`` and ``val/ppl_pretrained`` again, since ``trainer.test`` starts afresh).

    Args:
        model: a model instance (its forward returns logits or an object with ``.logits``) or a name for
            :func:`~lit_parallel.models.loading.load_causal_lm`: ``"smollm2"`` (offline GGUF, converted
            once), ``"gpt2_debug"``, ``"llama_debug"``, a ``.gguf`` file, a local folder or a hub name
            such as ``"gpt2"``.
        **optim: optimizer/schedule settings of :class:`ParallelModule` (``lr``, ``lr_schedule``, ...).

    Raises:
        MissingDataError: an offline package is missing (the message has the pip command).

    Example::

        model = CausalLM("smollm2", lr=5e-5, lr_schedule="cosine", warmup_steps=10)
        Trainer(max_steps=200, num_sanity_val_steps=-1).fit(model, datamodule=LanguageModelingDataModule("smollm2"))
    """

    def __init__(self, model: nn.Module | str = "smollm2", **optim: Any) -> None:
        super().__init__(**optim)
        self.model = load_causal_lm(model) if isinstance(model, str) else model
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps modes as it finds them
        self.hf_config = getattr(self.model, "config", None)
        with real_device():  # metric states are small: real tensors even under empty_init (meta)
            self.val_ppl = torchmetrics.text.Perplexity(ignore_index=IGNORE_INDEX)
            self.test_ppl = torchmetrics.text.Perplexity(ignore_index=IGNORE_INDEX)
        self.pretrained_val_ppl: float | None = None
        self.last_val_ppl: float | None = None

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _hf_inputs(batch)

    def loss_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"]

    def loss_fn(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting token ``t+1`` from positions ``<= t``, ignoring ``-100``."""
        logits = _logits(outputs)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, metric: torchmetrics.Metric) -> None:
        loss, outputs = self.forward_loss(batch)
        metric.update(_logits(outputs)[:, :-1].float(), batch["labels"][:, 1:])
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl)

    def on_validation_epoch_end(self) -> None:
        ppl = float(self.val_ppl.compute())  # synced over ranks by torchmetrics
        self.val_ppl.reset()
        trainer = self.trainer
        if trainer.sanity_checking:
            if sum(trainer.num_sanity_val_batches) >= sum(trainer.num_val_batches):
                self.pretrained_val_ppl = ppl
            return
        self.last_val_ppl = ppl
        self._log_val_ppl()

    def _log_val_ppl(self) -> None:
        # Every rank holds the same synced values; sync_dist only keeps Lightning from warning.
        if self.last_val_ppl is not None:
            self.log("val/ppl", self.last_val_ppl, prog_bar=True, sync_dist=True)
        if self.pretrained_val_ppl is not None:
            self.log("val/ppl_pretrained", self.pretrained_val_ppl, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", float(self.test_ppl.compute()), sync_dist=True)
        self.test_ppl.reset()
        # trainer.test starts with fresh logged metrics; repeat the validation pair for the run summary.
        self._log_val_ppl()
