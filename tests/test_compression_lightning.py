"""CompressedDDPStrategy and CommunicationMonitor under Lightning on 2 gloo ranks: plain DDP equivalence,
measured compression ratios on a 1M-parameter model, exact resume, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import CompressedDDPStrategy
from lit_parallel.callbacks import CommunicationMonitor
from lit_parallel.compression import Int8, NoCompression, OneBit, PowerSGD, TopK, get_compressor
from lit_parallel.errors import ConfigurationError
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.testing import run_distributed

RATIO_SPECS = {
    "none": ("none", {}),
    "topk": ("topk", {"ratio": 0.01}),
    "powersgd": ("powersgd", {"rank": 2}),
    "int8": ("int8", {}),
    "onebit": ("onebit", {}),
}
RESUME_SPECS = [
    ("topk", {"ratio": 0.1, "warmup_steps": 1}),
    ("powersgd", {"rank": 2, "warmup_steps": 1}),
    ("int8", {"stochastic_rounding": True, "chunk_size": 64, "warmup_steps": 1}),
    ("onebit", {"chunk_size": 64, "warmup_steps": 1}),
]


def _loader(samples: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 1, 28, 28, generator=g), torch.randint(0, 10, (samples,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def _trainer(strategy, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(strategy=strategy, **(defaults | kwargs))


def _params(model: L.LightningModule) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _fit_small(strategy, steps: int = 3) -> torch.Tensor:
    L.seed_everything(3, verbose=False)
    model = ImageClassifier(net=mlp(hidden=32, depth=1), lr=1e-2)
    _trainer(strategy, max_steps=steps).fit(model, train_dataloaders=_loader(64, 8))
    return _params(model)


def _ratios() -> dict[str, tuple[float, int, bool]]:
    """Per compressor: measured ratio, steps monitored, and whether the ratio was logged."""
    out = {}
    for label, (name, kwargs) in RATIO_SPECS.items():
        L.seed_everything(0, verbose=False)
        model = ImageClassifier(net=mlp(hidden=1200, depth=1))  # 954,010 parameters
        monitor = CommunicationMonitor()
        trainer = _trainer(CompressedDDPStrategy(compression=get_compressor(name, **kwargs)), max_steps=2,
                           callbacks=[monitor])
        trainer.fit(model, train_dataloaders=_loader(32, 4))
        logged = "comm/compression_ratio" in trainer.callback_metrics
        out[label] = (monitor.totals.compression_ratio, monitor.steps, logged)
    return out


def _fit_with_checkpoints(spec: tuple[str, dict], ckpt_dir: Path, ckpt_path: str | None) -> torch.Tensor:
    L.seed_everything(5, verbose=False)
    model = ImageClassifier(net=mlp(hidden=48, depth=1), lr=1e-2)
    strategy = CompressedDDPStrategy(compression=get_compressor(spec[0], **spec[1]))
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    # 32 samples, 8 per rank and step: 2 optimizer steps per epoch; the checkpoint after epoch 0 is mid-training.
    trainer = _trainer(strategy, max_epochs=3, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(model, train_dataloaders=_loader(32, 8), ckpt_path=ckpt_path)
    return _params(model)


def _resume(tmp: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, kwargs in RESUME_SPECS:
        ckpt_dir = Path(tmp) / name
        uninterrupted = _fit_with_checkpoints((name, kwargs), ckpt_dir, None)
        resumed = _fit_with_checkpoints((name, kwargs), Path(tmp) / f"{name}_resumed", str(ckpt_dir / "epoch=0-step=2.ckpt"))
        out[name] = torch.equal(uninterrupted, resumed)
    try:
        _fit_with_checkpoints(("topk", {"ratio": 0.5}), Path(tmp) / "bad", str(Path(tmp) / "powersgd" / "epoch=0-step=2.ckpt"))
        out["mismatch"] = "no error"
    except ConfigurationError as err:
        out["mismatch"] = str(err)
    return out


def _lightning_checks(tmp: str) -> dict[str, object]:
    # One spawn for every check: starting processes is the slow part on a busy machine.
    return {
        "plain": torch.equal(_fit_small(DDPStrategy()), _fit_small(CompressedDDPStrategy())),
        "named": type(_trainer("ddp_powersgd").strategy.compressor).__name__,
        "ratios": _ratios(),
        "resume": _resume(tmp),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, object]]:
    tmp = str(tmp_path_factory.mktemp("compressed_ddp"))
    return run_distributed(_lightning_checks, world_size=2, args=(tmp,), init_process_group=False, timeout=420)


def test_uncompressed_strategy_is_plain_ddp_bit_for_bit(results):
    assert all(rank["plain"] for rank in results)
    assert results[0]["named"] == "PowerSGD"


def test_monitor_measures_payload_ratios_on_a_1m_parameter_model(results):
    ratios = {name: ratio for name, (ratio, _, _) in results[0]["ratios"].items()}
    assert all(steps == 2 and logged for _, steps, logged in results[0]["ratios"].values())
    assert ratios["none"] == 1.0
    assert ratios["topk"] >= 40, ratios
    assert ratios["powersgd"] >= 20, ratios
    assert 3.9 <= ratios["int8"] <= 4.0, ratios
    assert ratios["onebit"] >= 25, ratios


def test_resume_mid_training_equals_uninterrupted_run(results):
    for rank in results:
        for name, _ in RESUME_SPECS:
            assert rank["resume"][name] is True, name


def test_checkpoint_of_another_compressor_is_rejected(results):
    message = results[0]["resume"]["mismatch"]
    assert "PowerSGD(" in message and "TopK(" in message, message


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: CompressedDDPStrategy(compression="zip"), "compression='zip' is unknown; valid: ['bf16'"),
        (lambda: CompressedDDPStrategy(compression=3), "is not a compressor"),
        (lambda: CompressedDDPStrategy(compression=TopK(), ddp_comm_hook=print), "['ddp_comm_hook']"),
    ],
)
def test_bad_strategy_arguments(make, needle):
    with pytest.raises(ConfigurationError) as err:
        make()
    assert needle in str(err.value)


def test_compression_needs_data_parallelism():
    trainer = _trainer(CompressedDDPStrategy(compression=OneBit()), devices=1, max_steps=1)
    with pytest.raises(ConfigurationError, match=r"OneBit\(.*needs data parallelism.*1 process"):
        trainer.fit(ImageClassifier(net=mlp(hidden=8, depth=1)), train_dataloaders=_loader(8, 4))
    assert isinstance(CompressedDDPStrategy().compressor, NoCompression)
    assert isinstance(CompressedDDPStrategy(compression=PowerSGD(rank=1)).compressor, PowerSGD)
    assert isinstance(CompressedDDPStrategy(compression="int8").compressor, Int8)


def test_config_groups_select_the_compressor(compose_cfg):
    from lit_parallel.cli import _build_strategy

    strategy = _build_strategy(compose_cfg("strategy=ddp", "compression=powersgd", "compression.rank=2"))
    assert isinstance(strategy, CompressedDDPStrategy) and strategy.compressor.config()["rank"] == 2
    for name in ("fp16", "bf16", "int8", "topk", "onebit"):
        assert _build_strategy(compose_cfg(f"compression={name}")).compressor.name == name
    assert not _build_strategy(compose_cfg("compression=none")).compressor.compressing
    cfg = compose_cfg("recipe=mnist_powersgd_debug")
    assert cfg.compression.rank == 2 and "comm_monitor" in cfg.callbacks
