"""Model families as plug-ins, any LightningModule, Lightning's hooks and precision in every layout.

- Qwen2 (mixed full / sliding-window layers), Mistral (sliding window 6 < sequence 16) and Qwen3 (q/k norms,
  tied head) under tp=2, pp=2 and tp=2 x pp=2 equal one process (per-step loss, final parameters).
- A plain LightningModule (its own training_step, network in ``self.net``) under dp=2, and under tp=2 with
  the user's own plan applied in ``configure_model``, equals one process.
- Under pp=2 every backward / optimizer hook fires as often as on one process, ``on_after_backward`` sees the
  single-process gradients (tied GPT-2 weights included), and gradient accumulation is exact.
- Every family x {bf16-mixed, 16-mixed, bf16-true} x {tp2, pp2} trains; an inf on one shard / stage skips the step on
  every rank.
- Bad input: unknown family, a sliding-window model forced onto the full-attention Llama family, a module
  that cannot be pipelined, registering a family twice.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from test_hybrid_equivalence import (
    DECODERS,
    FEATURES,
    GLOBAL_BATCH,
    SEED,
    STEPS,
    _build,
    _check,
    _fit_layouts,
)
from test_precision_distributed import _InjectInf, _Recorder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import ConfigurationError, HybridParallelStrategy
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.parallel.families import ModelFamily, family_names, get_family, register_family
from lit_parallel.precision import HybridMixedPrecision
from lit_parallel.testing import DistributedRunError, global_batch_order, run_distributed

pytestmark = pytest.mark.slow


# -- Qwen2, Mistral, Qwen3 -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_families_match_single_process(family):
    two = run_distributed(_fit_layouts, world_size=2, args=(family, [(2, 1, 1), (1, 2, 1)]),
                          init_process_group=False, timeout=480)
    _check(family, [(2, 1, 1), (1, 2, 1)], two)
    four = run_distributed(_fit_layouts, world_size=4, args=(family, [(2, 2, 1)]), init_process_group=False,
                           timeout=480)
    _check(family, [(2, 2, 1)], four)


def test_family_registry_and_refusals():
    assert {"sequential", "bert", "gpt2", "llama", "qwen2", "mistral", "qwen3"} <= set(family_names())
    assert get_family(DECODERS["mistral"]()).name == "mistral"
    with pytest.raises(ConfigurationError, match=r"model_family='llama' builds \['full_attention'\].*"
                                                 r"config.sliding_window=6.*sliding_attention"):
        get_family(DECODERS["mistral"](), "llama")
    with pytest.raises(ConfigurationError, match=r"config.layer_types="):
        get_family(DECODERS["qwen2"](), "llama")
    with pytest.raises(ConfigurationError, match=r"model_family='t5' is unknown; valid: 'auto' or one of"):
        get_family(DECODERS["qwen3"](), "t5")
    llama = get_family(name="llama")
    with pytest.raises(ConfigurationError, match="'llama' is registered already; pass replace=True"):
        register_family(llama)
    with pytest.raises(ConfigurationError, match=r"claims model_type \['llama'\], which family 'llama' covers"):
        register_family(ModelFamily(name="my_llama", model_types=("llama",), tp_plan=llama.tp_plan,
                                    validate_tp=llama.validate_tp))
    with pytest.raises(ConfigurationError, match="unknown; valid"):
        HybridParallelStrategy(model_family="t5")


def _forced_llama_on_mistral() -> None:
    module, data = _build("mistral")
    strategy = HybridParallelStrategy(pipeline_parallel_size=2, model_family="llama")
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False).fit(module, DataLoader(data, batch_size=4))


def test_forced_family_with_other_attention_is_refused_before_any_collective():
    with pytest.raises(DistributedRunError, match=r"(?s)ConfigurationError: model_family='llama'.*sliding_window=6"):
        run_distributed(_forced_llama_on_mistral, world_size=2, init_process_group=False, timeout=120)


# -- any LightningModule -----------------------------------------------------------------------------
class PlainModule(L.LightningModule):
    """An ordinary LightningModule: network in ``self.net``, its own training_step; optional user TP plan."""

    def __init__(self, user_plan: bool = False) -> None:
        super().__init__()
        self.user_plan = user_plan
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def configure_model(self) -> None:
        if self.user_plan and self.device_mesh["tp"].size() > 1:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

            from lit_parallel.parallel.tensor_parallel import apply_plan

            apply_plan(self.net, self.device_mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _plain_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))


def _plain_fit(layout: tuple[int, int] | None, user_plan: bool = False) -> tuple[list[float], dict]:
    L.seed_everything(SEED, verbose=False)
    module, rec = PlainModule(user_plan), _Losses()
    common = dict(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    if layout is None:
        order = global_batch_order(STEPS * GLOBAL_BATCH, 2, GLOBAL_BATCH // 2, SEED)
        L.Trainer(devices=1, **common).fit(module, DataLoader(_plain_data(), batch_size=GLOBAL_BATCH, sampler=order))
        return rec.losses, {k: v.detach().clone() for k, v in module.state_dict().items()}
    tp, dp = layout
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, data_parallel_size=dp)
    L.Trainer(devices=tp * dp, strategy=strategy, **common).fit(
        module, DataLoader(_plain_data(), batch_size=GLOBAL_BATCH // dp, shuffle=True))
    return rec.losses, strategy.export_state_dict() or {}


def _plain_runs() -> list:
    # dp=2; tp=2 with the user's plan from configure_model; tp=2 with the plan found for self.net (sequential).
    return [_plain_fit((1, 2)), _plain_fit((2, 1), user_plan=True), _plain_fit((2, 1))]


def test_plain_lightning_module_dp2_and_tp2():
    results = run_distributed(_plain_runs, world_size=2, init_process_group=False, timeout=300)
    ref_losses_dp, ref_state_dp = _plain_fit(None)
    # tp=2, dp=1 replays one dp rank's order: the full global batch each step, in dp=1 order.
    L.seed_everything(SEED, verbose=False)
    module, rec = PlainModule(), _Losses()
    order = global_batch_order(STEPS * GLOBAL_BATCH, 1, GLOBAL_BATCH, SEED)
    L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[rec]).fit(
        module, DataLoader(_plain_data(), batch_size=GLOBAL_BATCH, sampler=order))
    ref_tp = (rec.losses, {k: v.detach().clone() for k, v in module.state_dict().items()})
    for index, (ref_losses, ref_state) in enumerate([(ref_losses_dp, ref_state_dp), ref_tp, ref_tp]):
        for rank in range(2):
            torch.testing.assert_close(torch.tensor(results[rank][index][0]), torch.tensor(ref_losses), rtol=1e-5,
                                       atol=1e-7)
        state = results[0][index][1]
        assert sorted(state) == sorted(ref_state)
        for name, value in ref_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5, msg=f"run {index}: {name}")


# -- hooks under pp ----------------------------------------------------------------------------------
_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
          "on_train_batch_end")


class _Hooks(Callback):
    """Counts hooks; keeps each on_after_backward's full gradients of this rank's parameters."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(_HOOKS, 0)
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.counts["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.counts["on_after_backward"] += 1
        self.grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                           for n, p in pl_module.named_parameters(remove_duplicate=False) if p.grad is not None})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.counts["on_before_optimizer_step"] += 1

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.counts["on_before_zero_grad"] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts["on_train_batch_end"] += 1


def _hook_fit(family: str, pp: int, accumulate: int) -> dict:
    L.seed_everything(SEED, verbose=False)
    module, data = _build(family)
    hooks = _Hooks()
    common = dict(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[hooks], accumulate_grad_batches=accumulate)
    batch = GLOBAL_BATCH // accumulate
    if pp == 1:
        order = global_batch_order(len(data), 1, batch, SEED)
        L.Trainer(devices=1, **common).fit(module, DataLoader(data, batch_size=batch, sampler=order))
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    else:
        strategy = HybridParallelStrategy(pipeline_parallel_size=pp, num_microbatches=2)
        L.Trainer(devices=pp, strategy=strategy, **common).fit(module, DataLoader(data, batch_size=batch, shuffle=True))
        state = strategy.export_state_dict()
    return {"counts": hooks.counts, "grads": hooks.grads, "state": state}


def _hook_runs() -> list[dict]:
    return [_hook_fit("mlp", 2, 2), _hook_fit("gpt2", 2, 1)]


def test_hooks_and_gradients_under_pp_match_single_process():
    results = run_distributed(_hook_runs, world_size=2, init_process_group=False, timeout=300)
    for index, (family, accumulate) in enumerate([("mlp", 2), ("gpt2", 1)]):
        ref = _hook_fit(family, 1, accumulate)
        assert ref["counts"]["on_after_backward"] == 2 * accumulate
        for rank in range(2):
            run = results[rank][index]
            assert run["counts"] == ref["counts"], f"{family} rank {rank}: hook counts differ"
            for seen, expected in zip(run["grads"], ref["grads"], strict=True):
                assert seen, f"{family} rank {rank}: no gradient visible in on_after_backward"
                for name, grad in seen.items():  # this stage's parameters; tied copies hold the sum
                    torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"{family} {name}")
        state = results[0][index]["state"]
        for name, value in ref["state"].items():  # accumulation exact: same parameters after the steps
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5, msg=f"{family} {name}")


# -- precision matrix --------------------------------------------------------------------------------
_FAMILIES = ("mlp", "bert", "gpt2", "llama_odd_heads", *sorted(DECODERS))
_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true")  # 32-true: the equivalence tests
_INJECT = {(2, 1): ("model.transformer.h.0.mlp.c_fc.weight", 1),  # a column shard on tp rank 1
           (1, 2): ("model.lm_head.weight", 1)}  # the tied head copy, on the last stage


def _precision_fit(family: str, layout: tuple[int, int], precision: str, inject: bool) -> dict:
    L.seed_everything(SEED, verbose=False)
    module, data = _build(family)
    callbacks: list[Callback] = [_Recorder()]
    if inject:
        callbacks.append(_InjectInf(*_INJECT[layout], step=1))
    tp, pp = layout
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, num_microbatches=2)
    # Lightning turns Trainer(accelerator="cpu", precision="16-mixed") into bf16-mixed; fp16 with loss scaling
    # on CPU takes the plugin itself.
    plugins = [HybridMixedPrecision("16-mixed", device="cpu", init_scale=2.0**10)] if precision == "16-mixed" else None
    trainer = L.Trainer(accelerator="cpu", devices=tp * pp, strategy=strategy, max_steps=3, logger=False,
                        precision=None if plugins else precision, plugins=plugins, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=True))
    recorder = callbacks[0]
    finite = all(torch.isfinite(local_tensor(p.detach())).all() for p in module.parameters())
    return {"losses": recorder.losses, "changed": recorder.changed, "finite": bool(finite),
            "scales": recorder.scales, "plugin": type(trainer.precision_plugin).__name__}


def _precision_runs(layout: tuple[int, int]) -> list[dict]:
    runs = [_precision_fit(f, layout, p, False) for f in _FAMILIES for p in _PRECISIONS]
    return runs + [_precision_fit("gpt2", layout, "16-mixed", True)]


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_precision_matrix(layout):
    results = run_distributed(_precision_runs, world_size=2, args=(layout,), init_process_group=False, timeout=600)
    names = [(f, p) for f in _FAMILIES for p in _PRECISIONS] + [("gpt2", "16-mixed+inf")]
    for index, (family, precision) in enumerate(names):
        for rank in range(2):
            run = results[rank][index]
            assert run["finite"] and all(map(torch.isfinite, torch.tensor(run["losses"]))), (family, precision, rank)
            assert run["plugin"] == ("HybridHalfPrecision" if precision == "bf16-true" else "HybridMixedPrecision")
            assert (run["scales"][0] is not None) == precision.startswith("16-mixed"), (family, precision)
            if precision.endswith("+inf"):  # step 1 skipped on both ranks (the scale backs off), the others trained
                assert run["changed"] == [True, False, True], (family, layout, rank, run["changed"])
                assert run["scales"] == [1024.0, 512.0, 512.0], (family, layout, rank, run["scales"])
            else:
                assert all(run["changed"]), (family, precision, rank, run["changed"])


def test_module_that_cannot_be_pipelined_is_refused():
    from lit_parallel.strategies._modules import check_pipeline_module, guard_direct_calls

    with pytest.raises(ConfigurationError, match=r"needs PlainModule.model to be the network \(got NoneType\).*"
                                                 r"model_inputs\(batch\).*run_forward_loss"):
        check_pipeline_module(PlainModule(), "HybridParallelStrategy")

    class NoHooks(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    with pytest.raises(ConfigurationError, match=r"NoHooks lacks \['model_inputs', 'loss_target', 'loss_fn'\]"):
        check_pipeline_module(NoHooks(), "HybridParallelStrategy")
    net = nn.Sequential(nn.Linear(2, 2))
    guard_direct_calls(net)
    with pytest.raises(ConfigurationError, match="Sequential was called directly.*holds only its stages"):
        net(torch.ones(1, 2))
