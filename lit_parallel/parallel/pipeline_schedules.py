"""Pipeline schedules: every torch 2.13 schedule by name, stage placement, and one step over the whole batch.

Pure torch. :func:`build_schedule` wraps ``torch.distributed.pipelining`` (with a forward-only schedule for
several stages per rank, which torch lacks); :func:`stage_ids_for_rank` places stages on ranks (loop or
"V"); :func:`pipeline_step` runs one step. Re-exported by :mod:`lit_parallel.parallel.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _Action,
    _ComputationType,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
    _ScheduleForwardOnly,
)

from lit_parallel.errors import ConfigurationError

__all__ = [
    "SCHEDULES",
    "PipelineOptions",
    "SINGLE_STAGE_SCHEDULES",
    "V_SCHEDULES",
    "build_schedule",
    "check_microbatches",
    "check_schedule_name",
    "check_virtual_stages",
    "pipeline_step",
    "stage_ids_for_rank",
]

SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
"""Every torch pipeline schedule by a lowercase name (``zero_bubble`` is ``interleaved_zero_bubble``)."""

SINGLE_STAGE_SCHEDULES = frozenset(n for n, c in SCHEDULES.items() if issubclass(c, PipelineScheduleSingle))
"""Schedules that run exactly one stage per rank (``virtual_stages`` must be 1)."""

V_SCHEDULES = frozenset({"zbv_zero_bubble", "dualpipev"})
"""Schedules that place two stages per rank in a "V": rank ``r`` runs stages ``r`` and ``2p - 1 - r``."""


# ---------------------------------------------------------------------------------------------------
# Stage placement and validation
# ---------------------------------------------------------------------------------------------------
def check_schedule_name(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigurationError(f"pipeline_schedule={schedule!r} is unknown; valid: {sorted(SCHEDULES)}.")


def check_virtual_stages(schedule: str, virtual_stages: int) -> None:
    if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ConfigurationError(f"virtual_stages={virtual_stages!r} is invalid; valid: a positive integer.")
    if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ConfigurationError(
            f"pipeline_schedule={schedule!r} runs one stage per rank but virtual_stages={virtual_stages}; "
            f"valid: virtual_stages=1, or a multi-stage schedule {sorted(set(SCHEDULES) - SINGLE_STAGE_SCHEDULES)}."
        )
    if schedule in V_SCHEDULES and virtual_stages != 2:
        raise ConfigurationError(
            f"pipeline_schedule={schedule!r} places exactly two stages per rank but virtual_stages={virtual_stages}; "
            "valid: virtual_stages=2."
        )


def stage_ids_for_rank(pp_rank: int, pp_size: int, schedule: str, virtual_stages: int) -> list[int]:
    """The stage indices a pipeline rank runs, in increasing order.

    Loop style for interleaved schedules (rank ``r`` runs ``r, r + p, r + 2p, ...``) and "V" style for
    ``zbv_zero_bubble`` and ``dualpipev`` (rank ``r`` runs ``r`` and ``2p - 1 - r``, so the last rank holds
    the two middle stages and rank 0 both the first and the last stage).

    Args:
        pp_rank: this rank's index along the pipeline dimension.
        pp_size: number of pipeline ranks.
        schedule: a name from :data:`SCHEDULES`.
        virtual_stages: stages per rank (1 for single-stage schedules, 2 for V schedules).

    Raises:
        ConfigurationError: unknown schedule, or a ``virtual_stages`` the schedule cannot run.
    """
    check_schedule_name(schedule)
    check_virtual_stages(schedule, virtual_stages)
    if not 0 <= pp_rank < pp_size:
        raise ConfigurationError(f"pp_rank={pp_rank} is out of range; valid: 0 <= pp_rank < pp_size={pp_size}.")
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + v * pp_size for v in range(virtual_stages)]


def check_microbatches(schedule: str, pp_size: int, n_microbatches: int) -> str | None:
    if schedule in ("interleaved_1f1b", "interleaved_zero_bubble", "zero_bubble"):
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds:
            return (
                f"pipeline_schedule={schedule!r} needs num_microbatches to be a multiple of "
                f"max(1, num_microbatches // pp)={rounds}, got {n_microbatches}; valid e.g. {pp_size}, {2 * pp_size}."
            )
    if schedule == "dualpipev" and n_microbatches < 2 * pp_size:
        return (
            f"pipeline_schedule='dualpipev' needs num_microbatches >= number of stages ({2 * pp_size}), "
            f"got {n_microbatches}."
        )
    return None



# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------
class _ScheduleForwardOnlyMulti(_PipelineScheduleRuntime):
    """Forward-only schedule for several stages per rank, loop or V placement.

    Torch's multi-stage schedules keep their backward actions when run without a loss, and the V ones then
    fail handing a (missing) gradient between the rank's two stages. Here each rank runs its stages in
    increasing order, every microbatch of one stage before the next; the backward actions torch's
    validator requires follow as no-ops (and move no tensors, since the stages have no backward).
    """

    def __init__(self, stages: list[PipelineStage], n_microbatches: int, style: str, **kwargs: Any) -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=None, **kwargs)
        mapping = generate_stage_to_rank_mapping(self.pp_group_size, self._num_stages, style=style)
        order: dict[int, list[_Action | None]] = {}
        for rank in range(self.pp_group_size):
            local = sorted(s for s, r in mapping.items() if r == rank)
            forward = [_Action(s, _ComputationType.FORWARD, mb) for s in local for mb in range(n_microbatches)]
            backward = [
                _Action(s, _ComputationType.FULL_BACKWARD, mb) for s in reversed(local) for mb in range(n_microbatches)
            ]
            order[rank] = forward + backward
        self.pipeline_order = order
        self._prepare_schedule_with_comms(order)
        no_op = (_ComputationType.SEND_B, _ComputationType.RECV_B)
        for rank, actions in self.pipeline_order_with_comms.items():
            self.pipeline_order_with_comms[rank] = [a for a in actions if a.computation_type not in no_op]
        self.register_custom_function(_ComputationType.FULL_BACKWARD, _skip)


def _skip(action: _Action, ctx: Any) -> None:
    """The no-op backward of :class:`_ScheduleForwardOnlyMulti`."""


def build_schedule(
    name: str,
    stages: list[PipelineStage],
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    **kwargs: Any,
) -> _PipelineSchedule:
    """Build the torch schedule ``name`` over this rank's stages.

    ``loss_fn(output, target)`` must return the *mean* loss of one microbatch: the schedule divides the
    summed gradients by ``n_microbatches`` (``scale_grads=True``), so with equal microbatches the gradients
    are those of the mean loss over the whole batch.

    Args:
        name: a key of :data:`SCHEDULES`.
        stages: this rank's ``PipelineStage`` objects, in increasing stage order.
        n_microbatches: microbatches per step.
        loss_fn: the microbatch loss, or ``None`` for a forward-only (evaluation) schedule.
        **kwargs: passed to the torch schedule class (e.g. ``scale_grads``).

    Raises:
        ConfigurationError: unknown schedule, a stage count the schedule cannot run, or microbatches it
            cannot divide.
    """
    check_schedule_name(name)
    if not stages:
        raise ConfigurationError("build_schedule needs at least one PipelineStage.")
    pp_size = stages[0].group_size
    check_virtual_stages(name, len(stages))
    problem = check_microbatches(name, pp_size, n_microbatches)
    if problem:
        raise ConfigurationError(problem)
    cls = SCHEDULES[name]
    if loss_fn is None and issubclass(cls, PipelineScheduleSingle):
        return _ScheduleForwardOnly(stages[0], n_microbatches, **kwargs)
    if loss_fn is None:
        style = "v" if name in V_SCHEDULES else "loop"
        return _ScheduleForwardOnlyMulti(stages, n_microbatches, style, **kwargs)
    if issubclass(cls, PipelineScheduleSingle):
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, **kwargs)
    return cls(stages, n_microbatches, loss_fn=loss_fn, **kwargs)


def pipeline_step(
    schedule: _PipelineSchedule,
    stages: Sequence[PipelineStage],
    args: tuple[torch.Tensor, ...] = (),
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run one schedule step with the whole batch; every rank of the pipeline calls it.

    Inputs go positionally to the first stage only and ``target`` to the loss of the last, so each rank may
    pass the full batch; ranks without those stages ignore them.

    Args:
        schedule: from :func:`build_schedule` (train or forward-only).
        stages: the rank's stages the schedule was built over.
        args: the first stage's inputs (``(x,)`` or ``(input_ids, attention_mask)``).
        target: the loss target (ignored by forward-only schedules).

    Returns:
        ``(loss, output)`` on the rank holding the last stage: the mean of the microbatch losses (``None``
        without a loss) and the merged last-stage output; ``(None, None)`` elsewhere.
    """
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    training = schedule._loss_fn is not None
    losses: list[torch.Tensor] | None = [] if last and training else None
    output = schedule.step(
        *(args if first else ()), target=target if last and training else None, losses=losses
    )
    loss = torch.stack([x.detach() for x in losses]).mean() if losses else None
    return loss, output if last else None



@dataclass(frozen=True)
class PipelineOptions:
    """A strategy's pipeline settings, validated on construction (before any process group).

    Args:
        size: pipeline ranks.
        schedule: a name of :data:`SCHEDULES` (checked when ``size > 1``).
        num_microbatches: microbatches per batch, or ``"auto"`` (``2 * size``).
        virtual_stages: stages per rank, or ``"auto"`` (2 for multi-stage schedules, else 1).

    Raises:
        ConfigurationError: naming the bad value and the valid ones.
    """

    size: int = 1
    schedule: str = "1f1b"
    num_microbatches: int | Literal["auto"] = "auto"
    virtual_stages: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        m, v = self.num_microbatches, self.virtual_stages
        if m != "auto" and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigurationError(f"num_microbatches={m!r} is invalid; valid: an integer >= 1 or 'auto'.")
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigurationError(f"virtual_pipeline_stages={v!r} is invalid; valid: an integer >= 1 or 'auto'.")
        if self.size > 1:
            check_schedule_name(self.schedule)
            if self.schedule == "1f1b" and m != "auto" and m < self.size:
                raise ConfigurationError(
                    f"num_microbatches={m} is below pipeline_parallel_size={self.size}; 1F1B needs at least one "
                    f"microbatch per stage (valid: >= {self.size}, or 'gpipe')."
                )

    @property
    def microbatches(self) -> int:
        """``num_microbatches`` resolved."""
        return 2 * self.size if self.num_microbatches == "auto" else int(self.num_microbatches)

    @property
    def stages_per_rank(self) -> int:
        """``virtual_stages`` resolved."""
        if self.virtual_stages != "auto":
            return int(self.virtual_stages)
        return 1 if self.size == 1 or self.schedule in SINGLE_STAGE_SCHEDULES else 2
