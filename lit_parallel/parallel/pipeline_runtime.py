"""Running one pipeline step for a trainer: schedules per (mode, batch size), loss scaling, outputs to every rank.

Pure torch (no Lightning): :class:`PipelineRuntime` wraps a rank's stages (from
:func:`~lit_parallel.parallel.pipeline.build_local_model`) and runs a training or evaluation step over the
whole batch. The loss comes back on every pipeline rank (broadcast from the last stage), and in evaluation
the last stage's output too, so a trainer can log and compute metrics on any rank::

    runtime = PipelineRuntime(plan, stage_ids, stage_modules, pp_group, device, "1f1b", n_microbatches=4)
    loss = runtime.train_step(inputs, target, loss_fn, loss_scale=1 / 4)   # backward ran inside
    runtime.restore_gradients()           # the step's gradients onto .grad (added to earlier ones)
    runtime.sync_tied_gradients(model)    # GPT-2 wte <-> lm_head copies get their sum
    loss, logits = runtime.eval_step(inputs, target, loss_fn)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pipeline import PipelinePlan, build_schedule, reduce_tied_gradients

__all__ = ["PipelineRuntime", "positional_inputs"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def positional_inputs(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The first stage's positional inputs: ``args``, then the keyword inputs ``names`` in their order.

    Only tensors travel between stages, so a missing ``attention_mask`` before a later input becomes an
    all-ones mask (the same attention) and trailing missing inputs are dropped.

    Raises:
        ConfigurationError: a keyword input the family's stage does not take (names the valid ones).
    """
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ConfigurationError(
            f"model_inputs returned keyword inputs {unknown} that the first pipeline stage cannot take; "
            f"valid: positional tensors or {list(names)} (the family's stage_inputs)."
        )
    present = [k for k in names if kwargs.get(k) is not None]
    values = []
    for key in names[: list(names).index(present[-1]) + 1] if present else ():
        value = kwargs.get(key)
        if value is None and key == "attention_mask":
            value = torch.ones_like(kwargs["input_ids"])
        values.append(value)
    return (*args, *values)


class PipelineRuntime:
    """A rank's pipeline stages, their schedules and its share of the tied-weight sums.

    Args:
        plan: the pipeline plan.
        stage_ids: this rank's stages.
        stage_modules: one module per stage id (from ``build_local_model``).
        pp_group: the pipeline process group.
        device: where stage inputs and broadcast outputs live.
        schedule: a name of :data:`~lit_parallel.parallel.pipeline.SCHEDULES`.
        n_microbatches: microbatches per step (the batch size must be a multiple).
    """

    def __init__(self, plan: PipelinePlan, stage_ids: list[int], stage_modules: list[nn.Module],
                 pp_group: Any, device: torch.device, schedule: str, n_microbatches: int) -> None:
        self.plan, self.stage_ids, self.stage_modules = plan, stage_ids, stage_modules
        self.num_stages = plan.num_stages
        self.has_first = 0 in stage_ids
        self.has_last = self.num_stages - 1 in stage_ids
        self.pp_group, self.device = pp_group, device
        self.schedule_name, self.n_microbatches = schedule, n_microbatches
        self.last_rank = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        self._schedules: dict[tuple[Any, ...], Any] = {}
        self._losses: list[Tensor] = []
        self._pending: list[tuple[nn.Parameter, Tensor | None]] = []
        self._loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
        self._loss_scale: Callable[[Tensor], Tensor] = lambda loss: loss
        # Called with a stage module once its last microbatch's backward has run (during the schedule).
        self.after_stage_backward: Callable[[nn.Module], None] | None = None

    def sync_tied_gradients(self, model: nn.Module) -> None:
        """Give every copy of a weight tied across stages the sum of all copies' gradients."""
        if self.plan.tied_parameters:
            reduce_tied_gradients(model, self.plan, group=self.pp_group)

    def tied_copies(self, model: nn.Module) -> list[Tensor]:
        """Parameters tied across stages that this rank holds but another stage owns (count once in norms)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        copies = []
        for names in self.plan.tied_parameters:
            owner = min(names, key=self.plan.stage_of)
            copies += [params[n] for n in names if n in params and params[n] is not params.get(owner)]
        return copies

    @torch.no_grad()
    def restore_gradients(self) -> None:
        """Add the gradients of the last training step to whatever ``.grad`` holds now."""
        for param, grad in self._pending:
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        self._pending = []

    def _schedule(self, training: bool, batch_size: int) -> Any:
        from torch.distributed.pipelining import PipelineStage

        key = (training, batch_size)
        if key not in self._schedules:
            stages = [PipelineStage(mod, stage_index=sid, num_stages=self.num_stages, device=self.device,
                                    group=self.pp_group)
                      for mod, sid in zip(self.stage_modules, self.stage_ids, strict=True)]
            # scale_grads=False: the loss carries 1/microbatches (and the caller's accumulation factor), so
            # gradients accumulated over several batches are not rescaled by the schedule.
            if training:
                for stage, module in zip(stages, self.stage_modules, strict=True):
                    self._announce_last_backward(stage, module)
            self._schedules[key] = build_schedule(self.schedule_name, stages, self.n_microbatches,
                                                  self._microbatch_loss if training else None, scale_grads=False)
        return self._schedules[key]

    def _announce_last_backward(self, stage: Any, module: nn.Module) -> None:
        # Every torch schedule calls perform_reduce_grad once per stage and step, right after the stage's
        # last backward (its REDUCE_GRAD action); that is where DDP / FSDP stage modules reduce, and where
        # the data-parallel exchange of the stage's gradients can start.
        reduce_grad = stage.perform_reduce_grad

        def perform_reduce_grad(grad_scale_factor: int) -> None:
            if self.after_stage_backward is not None:
                self.after_stage_backward(module)
            reduce_grad(grad_scale_factor)

        stage.perform_reduce_grad = perform_reduce_grad

    def _microbatch_loss(self, output: Tensor, target: Tensor) -> Tensor:
        assert self._loss_fn is not None
        loss = self._loss_fn(output, target)
        self._losses.append(loss.detach())
        return self._loss_scale(loss)

    def _check_batch(self, target: Tensor) -> int:
        batch_size = int(target.shape[0])
        if batch_size % self.n_microbatches:
            m = self.n_microbatches
            raise ConfigurationError(
                f"batch size {batch_size} is not divisible by num_microbatches={m}; choose a per-rank batch size "
                f"that is a multiple of {m} (or set num_microbatches to a divisor of {batch_size})."
            )
        return batch_size

    def train_step(self, inputs: tuple[Any, ...], target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                   params: Sequence[nn.Parameter], accumulation: int = 1,
                   scale_loss: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Forward and backward over the microbatches; returns the batch's mean loss on every pipeline rank.

        Each microbatch backpropagates ``scale_loss(loss / (n_microbatches * accumulation))``
        (``scale_loss``: e.g. an fp16 loss scale). The step's gradients of ``params`` are set aside (``.grad``
        is left as it was) until :meth:`restore_gradients`, as a trainer zeroes gradients between its forward
        and its backward.
        """
        schedule = self._schedule(True, self._check_batch(target))
        self._loss_fn, self._losses = loss_fn, []
        factor = 1.0 / (self.n_microbatches * accumulation)
        self._loss_scale = (lambda loss: loss * factor) if scale_loss is None else (lambda loss: scale_loss(loss * factor))
        params = list(params)
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        schedule.step(*(inputs if self.has_first else ()), target=target if self.has_last else None)
        self._pending = [(p, p.grad) for p in params]
        for p, grad in zip(params, earlier, strict=True):
            p.grad = grad
        # The first step also calls the loss once for metadata inference: keep the last m calls.
        losses = self._losses[-self.n_microbatches:]
        # float32 on every rank, whatever the loss dtype or torch's default dtype (bf16 inside bf16-true steps).
        loss = (torch.stack(losses).float().mean() if self.has_last
                else torch.zeros((), dtype=torch.float32, device=self.device))
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)
        return loss

    @torch.no_grad()
    def eval_step(self, inputs: tuple[Any, ...], target: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Forward only; returns ``(loss, last stage output)`` on every pipeline rank."""
        schedule = self._schedule(False, self._check_batch(target))
        output = schedule.step(*(inputs if self.has_first else ()))
        device = self.device
        if self.has_last:
            loss = loss_fn(output, target).detach().float()
            shape = torch.tensor(output.shape, dtype=torch.long, device=device)
            ndim = torch.tensor([output.ndim], dtype=torch.long, device=device)
            dtype_code = torch.tensor([_DTYPES.index(output.dtype)], device=device)
        else:
            loss = torch.zeros((), dtype=torch.float32, device=device)
            ndim = torch.zeros(1, dtype=torch.long, device=device)
            dtype_code = torch.zeros(1, dtype=torch.long, device=device)
        for t in (loss, ndim, dtype_code):
            dist.broadcast(t, src=self.last_rank, group=self.pp_group)
        if not self.has_last:
            shape = torch.zeros(int(ndim.item()), dtype=torch.long, device=device)
        dist.broadcast(shape, src=self.last_rank, group=self.pp_group)
        if not self.has_last:
            output = torch.empty(tuple(shape.tolist()), dtype=_DTYPES[int(dtype_code.item())], device=device)
        dist.broadcast(output.contiguous(), src=self.last_rank, group=self.pp_group)
        return loss, output
