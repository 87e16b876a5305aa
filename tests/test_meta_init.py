"""Meta-device init (``trainer.init_module(empty_init=True)``) with per-shard materialization.

- random init is a function of (seed, module name): a tp2 x dp_shard2 (ZeRO-3) run starts from the same weights
  as one process materializing the same meta model, and then trains like one process;
- pretrained weights are read slice by slice: each rank reads only its shards' bytes, and the gathered model
  equals ``from_pretrained`` tensor by tensor;
- a meta tensor with neither a weight source nor an init rule is refused before any process group.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_hybrid_equivalence import _LossRecorder
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_parallel import ConfigurationError, HybridParallelStrategy
from lit_parallel.models import CausalLM
from lit_parallel.parallel.materialize import WEIGHTS_ATTR, MetaOrigins, materialize
from lit_parallel.testing import global_batch_order, run_distributed

SEED, STEPS, GLOBAL_BATCH, SEQ, VOCAB = 5, 3, 4, 16, 200


class _Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (STEPS * GLOBAL_BATCH, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


class _Export(Callback):
    """The full initial state (collective: every rank calls it) before the first step."""

    def __init__(self) -> None:
        self.state = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = trainer.strategy.export_state_dict()


def _trainer(devices, strategy, callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks)


def _fit_meta(model: str, tp: int, dp: int, zero: int, ac: str) -> tuple:
    L.seed_everything(SEED, verbose=False)
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, data_parallel_size=dp, zero_stage=zero,
                                      activation_checkpointing=ac)
    export, recorder = _Export(), _LossRecorder()
    trainer = _trainer(tp * dp, strategy, [export, recorder])
    with trainer.init_module(empty_init=True):
        module = CausalLM(model, lr=2e-3, weight_decay=0.01, eps=1e-6)
    assert all(p.is_meta for p in module.model.parameters())
    source = getattr(module.model, WEIGHTS_ATTR, None)
    trainer.fit(module, DataLoader(_Tokens(), batch_size=GLOBAL_BATCH // dp, shuffle=True))
    full = sum(p.numel() * 4 for p in module.model.parameters())  # numel of a DTensor is its full size
    return (export.state, recorder.losses, strategy.export_state_dict(), strategy.materialized_bytes,
            None if source is None else source.bytes_read, full)


def _reference_init(model: str) -> dict[str, torch.Tensor]:
    """One process: the same meta model materialized without any process group."""
    L.seed_everything(SEED, verbose=False)
    with torch.device("meta"):
        module = CausalLM(model)
    materialize(module.model, MetaOrigins.capture(module.model), torch.device("cpu"), SEED)
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def _reference_fit(model: str, init: dict[str, torch.Tensor], dp: int) -> tuple[list[float], dict]:
    L.seed_everything(SEED, verbose=False)
    module = CausalLM(model, lr=2e-3, weight_decay=0.01, eps=1e-6)
    module.model.load_state_dict(init)
    data = _Tokens()
    recorder = _LossRecorder()
    order = global_batch_order(len(data), dp, GLOBAL_BATCH // dp, SEED)
    _trainer(1, "auto", [recorder]).fit(module, DataLoader(data, batch_size=GLOBAL_BATCH, sampler=order))
    return recorder.losses, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.slow
def test_meta_init_tp2_fsdp2_starts_and_trains_like_one_process():
    results = run_distributed(_fit_meta, world_size=4, args=("llama_debug", 2, 2, 3, "full"), init_process_group=False,
                              timeout=480)
    init = _reference_init("llama_debug")
    initial, _, _, allocated, _, full = results[0]
    assert sorted(initial) == sorted(init)
    for name, value in init.items():
        assert torch.equal(initial[name], value), f"{name}: the materialized shards differ from one process"
    # no rank allocated the whole model: each holds its shards (tp2 x dp_shard2) and a few replicated tensors
    for rank_result in results:
        assert rank_result[3] < 0.35 * full, (rank_result[3], full)
    ref_losses, ref_state = _reference_fit("llama_debug", init, dp=2)
    for rank, rank_result in enumerate(results):
        torch.testing.assert_close(torch.tensor(rank_result[1]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7,
                                   msg=f"rank {rank}: per-step loss differs")
    final = results[0][2]
    for name, value in ref_state.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-5, msg=f"{name} differs after training")
    assert allocated > 0


def _load_pretrained(folder: str) -> tuple:
    L.seed_everything(SEED, verbose=False)
    strategy = HybridParallelStrategy(tensor_parallel_size=2, data_parallel_size=2, zero_stage=3)
    export = _Export()
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[export], limit_train_batches=1)
    with trainer.init_module(empty_init=True):
        module = CausalLM(folder)
    source = getattr(module.model, WEIGHTS_ATTR)
    trainer.fit(module, DataLoader(_Tokens(), batch_size=2))
    return export.state, strategy.materialized_bytes, source.bytes_read


def _save_tiny_pretrained(folder) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)


def _check_per_shard_load(folder) -> None:
    from transformers import AutoModelForCausalLM

    results = run_distributed(_load_pretrained, world_size=4, args=(str(folder),), init_process_group=False,
                              timeout=600)
    reference = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    state = results[0][0]
    assert sorted(state) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value.float()), f"{name}: loaded shards differ from the checkpoint"
    full_bytes = sum(v.numel() * 4 for k, v in reference.items() if "inv_freq" not in k)
    for allocated, read in (r[1:] for r in results):
        assert read <= allocated < 0.6 * full_bytes, (read, allocated, full_bytes)


def test_per_shard_loading_equals_checkpoint(tmp_path):
    _save_tiny_pretrained(tmp_path)
    _check_per_shard_load(tmp_path)


@pytest.mark.slow
def test_per_shard_loading_smollm2_tp2_fsdp2():
    from lit_parallel.models.loading import resolve_pretrained

    _check_per_shard_load(resolve_pretrained("smollm2"))


class _NoInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


class _Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _NoInit()

    def training_step(self, batch, batch_idx):
        return self.model(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_meta_tensor_without_source_or_init_rule_is_refused():
    strategy = HybridParallelStrategy()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    with trainer.init_module(empty_init=True):
        module = _Plain()
    with pytest.raises(ConfigurationError, match=r"model\.scale \(_NoInit\) was built on the meta device"):
        trainer.fit(module, DataLoader(torch.ones(2, 4), batch_size=1))


class _BuiltInConfigureModel(L.LightningModule):
    """A user's module that creates its network in ``configure_model`` (Lightning's large-model convention)."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net

    def configure_model(self) -> None:
        if self.net is None:
            self.net = _net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, sync_dist=True)  # the global batch's loss on every rank
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _xy():
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(STEPS * 8, 12, generator=g), torch.randint(0, 10, (STEPS * 8,), generator=g))


def _fit_configure_model() -> tuple:
    L.seed_everything(SEED, verbose=False)
    strategy = HybridParallelStrategy(tensor_parallel_size=2, zero_stage=3, data_parallel_size=2)
    recorder = _LossRecorder()
    _trainer(4, strategy, [recorder]).fit(_BuiltInConfigureModel(), DataLoader(_xy(), batch_size=4, shuffle=True))
    return recorder.losses, strategy.export_state_dict()


@pytest.mark.slow
def test_network_built_in_configure_model_is_materialized_per_shard():
    results = run_distributed(_fit_configure_model, world_size=4, init_process_group=False, timeout=300)
    L.seed_everything(SEED, verbose=False)
    with torch.device("meta"):
        net = _net()
    materialize(net, MetaOrigins.capture(net), torch.device("cpu"), SEED)
    module, recorder = _BuiltInConfigureModel(net), _LossRecorder()
    order = global_batch_order(STEPS * 8, 2, 4, SEED)
    _trainer(1, "auto", [recorder]).fit(module, DataLoader(_xy(), batch_size=8, sampler=order))
    torch.testing.assert_close(torch.tensor(results[0][0]), torch.tensor(recorder.losses), rtol=1e-5, atol=1e-7)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(results[0][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _load_minilm() -> tuple:
    from lit_parallel.models import SequenceClassifier

    L.seed_everything(SEED, verbose=False)
    strategy = HybridParallelStrategy(tensor_parallel_size=2)
    export = _Export()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[export], limit_train_batches=1)
    with trainer.init_module(empty_init=True):
        module = SequenceClassifier("minilm", num_labels=5)
    source = getattr(module.model, WEIGHTS_ATTR)

    class _Labelled(_Tokens):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            item = super().__getitem__(i)
            return {**item, "labels": item["labels"][0] % 5}

    trainer.fit(module, DataLoader(_Labelled(), batch_size=2))
    return export.state, strategy.materialized_bytes, source.bytes_read


def test_per_shard_loading_base_model_checkpoint_into_classifier():
    """MiniLM's files hold a BertModel (``embeddings...``); the classifier's names are ``bert.embeddings...``."""
    from transformers import AutoModelForSequenceClassification

    from lit_parallel.models.loading import resolve_pretrained

    state, allocated, read = run_distributed(_load_minilm, world_size=2, init_process_group=False, timeout=300)[0]
    reference = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained("minilm"), num_labels=5)
    encoder = {k: v for k, v in reference.state_dict().items() if k.startswith("bert.")}
    for name, value in encoder.items():
        assert torch.equal(state[name], value), f"{name}: loaded shards differ from the checkpoint"
    assert state["classifier.weight"].shape == (5, reference.config.hidden_size)
    assert 0 < read <= allocated


class _WithMetric(_Plain):
    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.model = nn.Linear(4, 4)
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)


def test_metric_built_on_the_meta_device_is_refused():
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=HybridParallelStrategy(), max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    with trainer.init_module(empty_init=True):
        module = _WithMetric()
    with pytest.raises(ConfigurationError, match=r"meta-device tensors outside the networks.*\['acc'\]"):
        trainer.fit(module, DataLoader(torch.ones(2, 4), batch_size=1))


class _FromPretrainedInConfigureModel(_Plain):
    def configure_model(self) -> None:
        from transformers import AutoModel

        from lit_parallel.models.loading import resolve_pretrained

        self.model = AutoModel.from_pretrained(resolve_pretrained("minilm"))


def test_from_pretrained_in_configure_model_gets_a_clear_error():
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=HybridParallelStrategy(), max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigurationError, match=r"runs configure_model on the meta device.*load_causal_lm"):
        trainer.fit(_FromPretrainedInConfigureModel(), DataLoader(torch.ones(2, 4), batch_size=1))


class _HalfInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        self.extra = nn.Parameter(torch.empty(4))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)  # forgets self.extra


def test_init_rule_that_leaves_a_tensor_unset_is_refused():
    with torch.device("meta"):
        net = nn.Sequential(_HalfInit())
    with pytest.raises(ConfigurationError, match=r"0\.extra \(_HalfInit\) .* does not set it"):
        materialize(net, MetaOrigins.capture(net), torch.device("cpu"), 0)
