"""Magnitude and structured pruning on one process: schedules, exact thresholds, training, resume, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.callbacks import AttentionHeadPruning, MagnitudePruning, StructuredPruning, export_pruned
from lit_parallel.errors import ConfigurationError
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.pruning import PruningLayout, schedule_sparsity

BATCHES = 10  # per epoch


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(BATCHES * 16, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCHES * 16,), generator=g))
    return DataLoader(data, batch_size=16)


def _fit(callbacks: list, max_steps: int, ckpt_path: str | None = None, root: str | None = None,
         optimizer: str = "adam") -> tuple[L.Trainer, ImageClassifier]:
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(net=mlp(hidden=32, depth=2), lr=1e-2, optimizer=optimizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False, default_root_dir=root,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer, model


def _weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_cubic_schedule_follows_zhu_and_gupta():
    values = [schedule_sparsity("cubic", t, 0.9, 10, 110) for t in (0, 10, 60, 110, 500)]
    assert values[:2] == [0.0, 0.0] and values[3:] == [0.9, 0.9]
    assert values[2] == pytest.approx(0.9 * (1 - 0.5**3))
    ramp = [schedule_sparsity("cubic", t, 0.9, 10, 110) for t in range(10, 111)]
    assert ramp == sorted(ramp)
    assert schedule_sparsity("one_shot", 10, 0.5, 10, 20) == schedule_sparsity("constant", 15, 0.5, 10, 20) == 0.5


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_threshold_is_the_exact_kth_smallest_magnitude(scope):
    g = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(n, generator=g) * (i + 1) for i, n in enumerate((300, 1000, 77))}
    layout = PruningLayout(tensors)
    masks = layout.masks([t.abs() for t in tensors.values()], 0.6, scope=scope)
    groups = [list(tensors.values())] if scope == "global" else [[t] for t in tensors.values()]
    kept = dict(zip(tensors, masks, strict=True))
    for group in groups:
        values = torch.cat([t.abs() for t in group])
        k = round(0.6 * values.numel())
        threshold = values.kthvalue(k).values
        for t in group:
            name = next(n for n, v in tensors.items() if v is t)
            assert torch.equal(kept[name], t.abs() > threshold)


def test_sparsity_reaches_target_and_pruned_weights_stay_zero_through_adam():
    pruning = MagnitudePruning(0.9, start_step=2, end_step=20, every_n_steps=3, make_permanent=False)
    trainer, model = _fit([pruning], max_steps=30)
    assert abs(_weight_sparsity(model) - 0.9) < 0.005
    assert trainer.callback_metrics["pruning/sparsity"] == pytest.approx(pruning.sparsity())
    assert "pruning/model.1.weight" in trainer.callback_metrics
    optimizer = trainer.optimizers[0]
    for param, mask in pruning._masked:
        assert not param[~mask].any()
        for key in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[param][key][~mask].any(), key


def test_layer_scope_one_shot_and_sgd_momentum():
    pruning = MagnitudePruning(0.75, scope="layer", schedule="one_shot", start_step=3)
    _, model = _fit([pruning], max_steps=12, optimizer="sgd")
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        assert abs(float((layer.weight == 0).float().mean()) - 0.75) < 0.005


def test_resume_continues_the_schedule(tmp_path):
    def callbacks():
        return [MagnitudePruning(0.8, start_step=4, end_step=24, every_n_steps=4),
                ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=BATCHES, save_top_k=-1)]

    _, straight = _fit(callbacks(), max_steps=30, root=str(tmp_path / "a"))
    _fit(callbacks(), max_steps=BATCHES, root=str(tmp_path / "b"))
    ckpt = next(tmp_path.glob(f"*step={BATCHES}*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["pruning"]
    (saved,) = state.values()
    assert saved["last_update"] == 8 and 0 < saved["sparsity"] < 0.8
    resumed_cb = callbacks()
    _, resumed = _fit(resumed_cb, max_steps=30, ckpt_path=str(ckpt), root=str(tmp_path / "c"))
    assert abs(_weight_sparsity(resumed) - 0.8) < 0.005
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, msg=name)


def test_structured_pruning_zeroes_whole_neurons_and_their_biases():
    pruning = StructuredPruning(0.5, dim="neurons", norm=2, schedule="one_shot", start_step=2)
    _, model = _fit([pruning], max_steps=8)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in linears[:-1]:
        dead = (layer.weight == 0).all(dim=1)
        assert int(dead.sum()) == layer.out_features // 2
        assert not layer.bias[dead].any()
    assert not (linears[-1].weight == 0).all(dim=1).any(), "the classifier's rows (classes) are never pruned"


def test_export_loads_in_plain_torch(tmp_path):
    _, model = _fit([MagnitudePruning(0.5, schedule="one_shot", start_step=1)], max_steps=3)
    path = export_pruned(model, tmp_path / "pruned.pt")
    plain = mlp(hidden=32, depth=2)
    plain.load_state_dict(torch.load(path))
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(plain(x), model.model(x))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MagnitudePruning(target_sparsity=1.0), r"target_sparsity=1.0 is outside \[0, 1\)"),
        (lambda: MagnitudePruning(target_sparsity=-0.1), r"outside \[0, 1\)"),
        (lambda: MagnitudePruning(start_step=10, end_step=10), "end_step=10 must be > start_step=10"),
        (lambda: MagnitudePruning(scope="row"), r"scope='row' is unknown; valid: \['global', 'layer'\]"),
        (lambda: MagnitudePruning(schedule="linear"), "schedule='linear' is unknown; valid"),
        (lambda: StructuredPruning(dim="rows"), r"dim='rows' is unknown; valid: \['neurons', 'channels'\]"),
        (lambda: StructuredPruning(norm=0.5), "norm=0.5"),
        (lambda: AttentionHeadPruning(heads_to_prune=1.0), r"heads_to_prune=1.0 is outside \[0, 1\)"),
        (lambda: AttentionHeadPruning(importance="random"), "importance='random' is unknown"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_regex_matching_nothing_names_the_parameters():
    with pytest.raises(ConfigurationError, match=r"parameter_regex='attn' matches no parameter; .*model\.1\.weight"):
        _fit([MagnitudePruning(0.5, end_step=5, parameter_regex="attn")], max_steps=2)


def test_head_pruning_needs_attention_heads():
    with pytest.raises(ConfigurationError, match="has no attention heads to prune"):
        _fit([AttentionHeadPruning(0.5)], max_steps=1)


def test_structured_pruning_of_conv_channels():
    from lit_parallel.models import mnist_cnn

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(net=mnist_cnn(channels=4, hidden=8), lr=1e-2)
    pruning = StructuredPruning(0.5, dim="channels", norm=1, schedule="one_shot", start_step=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=_loader())
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        dead = (conv.weight == 0).flatten(1).all(dim=1)
        assert int(dead.sum()) == conv.out_channels // 2 and not conv.bias[dead].any()
