"""Pipeline parallelism: split a model into stages and run them with ``torch.distributed.pipelining``.

The split follows torchtitan's ``pipeline_module_split``: every rank keeps the *same* module tree as the
unsplit model with the parts it does not own removed, so parameter names (FQNs) never change; the stage
modules that ``PipelineStage`` wraps are thin views over that tree. Everything here is pure torch: the
planning functions run no collective and raise :class:`~lit_parallel.errors.ConfigurationError` on bad
input, so a strategy can validate before it builds its mesh.

Example::

    plan = plan_pipeline(model, num_stages=4)                     # 2 ranks x 2 virtual stages
    ids = stage_ids_for_rank(pp_rank, 2, "interleaved_1f1b", virtual_stages=2)
    local_model, stage_modules = build_local_model(model, plan, ids)
    stages = [PipelineStage(m, i, plan.num_stages, device, group=pp_group)
              for i, m in zip(ids, stage_modules)]
    schedule = build_schedule("interleaved_1f1b", stages, n_microbatches=4, loss_fn=loss_fn)
    loss, _ = pipeline_step(schedule, stages, (input_ids, attention_mask), target=labels)
    reduce_tied_gradients(local_model, plan, group=pp_group)      # GPT-2 wte <-> lm_head
    optimizer.step()
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families import ModelFamily, PipelineLayout, get_family
from lit_parallel.parallel.pipeline_schedules import (
    SCHEDULES,
    SINGLE_STAGE_SCHEDULES,
    V_SCHEDULES,
    build_schedule,
    check_microbatches,
    check_schedule_name,
    check_virtual_stages,
    pipeline_step,
    stage_ids_for_rank,
)

__all__ = [
    "SCHEDULES",
    "SINGLE_STAGE_SCHEDULES",
    "V_SCHEDULES",
    "PipelinePlan",
    "build_local_model",
    "build_schedule",
    "pipeline_step",
    "plan_pipeline",
    "reduce_tied_gradients",
    "stage_ids_for_rank",
    "validate_pipeline",
]

# ---------------------------------------------------------------------------------------------------
# Families: the layout and stage forward come from the model's family spec (parallel/families/).
# ---------------------------------------------------------------------------------------------------
def _detect(model: nn.Module) -> ModelFamily:
    try:
        return get_family(model)
    except ConfigurationError as err:
        raise ConfigurationError(
            f"pipeline parallelism cannot split {type(model).__name__}: {err} For a supported family you may "
            "choose the stage boundaries with split_points=['transformer.h.4', ...] (FQNs of the blocks where "
            "a new stage begins; for an nn.Sequential the child indices, e.g. split_points=['3'])."
        ) from None


def _spec(model: nn.Module, family: str | None) -> ModelFamily:
    spec = get_family(model, family) if family is not None else _detect(model)
    if spec.pipeline_layout is None or spec.build_stage is None:
        raise ConfigurationError(
            f"model family {spec.name!r} declares no pipeline layout (pipeline_layout and build_stage of its "
            "ModelFamily); add them (docs/hybrid.md, 'Adding a model family') or use pipeline_parallel_size=1."
        )
    return spec


def _layout(model: nn.Module, spec: ModelFamily, split_points: Sequence[str] | None) -> PipelineLayout:
    assert spec.pipeline_layout is not None
    try:
        return spec.pipeline_layout(model, split_points)
    except AttributeError as err:
        raise ConfigurationError(
            f"family={spec.name!r} does not match {type(model).__name__}: {err}. Pipeline heads supported: "
            f"{spec.pipeline_heads}."
        ) from err

# ---------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelinePlan:
    """Which modules each pipeline stage owns, by their FQNs in the unsplit model.

    Attributes:
        family: the model family's name (:mod:`lit_parallel.parallel.families`).
        stages: per stage, the FQNs of the modules it owns (embeddings on stage 0, final norm and head on
            the last). Parameter-free modules outside every list (e.g. Llama's rotary embedding) are
            kept on every stage.
        parameter_counts: per stage, the number of parameters it holds.
        tied_parameters: groups of parameter FQNs that are one tensor in the unsplit model but live on
            different stages (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``). Each stage holds
            its own copy; :func:`reduce_tied_gradients` sums their gradients so the copies stay equal.
        tied_shapes: the shape of each tied group's tensor (ranks owning no member need it to join the
            all-reduce).
        stage_blocks: per stage, the owned FQNs that are layout units (blocks), in execution order: what
            the family's stage forward runs between the first stage's embeddings and the last's head.
    """

    family: str
    stages: tuple[tuple[str, ...], ...]
    parameter_counts: tuple[int, ...]
    tied_parameters: tuple[tuple[str, ...], ...] = ()
    tied_shapes: tuple[tuple[int, ...], ...] = ()
    stage_blocks: tuple[tuple[str, ...], ...] = ()

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    def stage_of(self, fqn: str) -> int:
        """The stage owning the module or parameter ``fqn``.

        Raises:
            KeyError: no stage owns it (a module kept on every stage, or an unknown name).
        """
        for stage, modules in enumerate(self.stages):
            if any(fqn == m or fqn.startswith(m + ".") for m in modules):
                return stage
        raise KeyError(f"{fqn!r} belongs to no pipeline stage")


def _count(model: nn.Module, fqns: Sequence[str]) -> int:
    # Tied tensors count once per owning module: after the split each stage stores its own copy.
    return sum(p.numel() for f in fqns for _, p in model.get_submodule(f).named_parameters(remove_duplicate=False))


def _balanced_boundaries(weights: list[int], first: int, last: int, k: int) -> list[int]:
    """Start index of each of ``k`` contiguous non-empty groups minimizing the heaviest stage."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(s: int, i: int, j: int) -> int:  # stage s holds units i..j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == k - 1 else 0)

    inf = float("inf")
    # best[s][j]: min over splits of units[:j] into stages 0..s of the heaviest stage; arg[s][j]: start of s.
    best = [[inf] * (n + 1) for _ in range(k)]
    arg = [[0] * (n + 1) for _ in range(k)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, k):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                # Ties go to the later start so earlier stages (which also hold activations longer
                # under 1F1B) get no more than their share.
                value = max(best[s - 1][i], cost(s, i, j))
                if value <= best[s][j]:
                    best[s][j], arg[s][j] = value, i
    starts, j = [], n
    for s in range(k - 1, 0, -1):
        j = arg[s][j]
        starts.append(j)
    return [0] + starts[::-1]


def plan_pipeline(
    model: nn.Module,
    num_stages: int,
    family: str | None = None,
    split_points: list[str] | None = None,
) -> PipelinePlan:
    """Split ``model`` into ``num_stages`` contiguous stages; pure, no collectives.

    Stages are balanced by parameter count over the family's blocks (transformer layers; for an
    ``nn.Sequential``, its children with weights, each carrying the parameter-free children after it),
    counting the embeddings on the first stage and the final norm and head on the last.

    Args:
        model: the full model (``nn.Sequential`` or a supported Hugging Face model).
        num_stages: total number of stages (pipeline ranks times virtual stages per rank).
        family: a registered family name (:func:`~lit_parallel.parallel.families.family_names`); detected
            from the model when ``None``.
        split_points: FQNs of the blocks where a new stage begins, e.g. ``["transformer.h.4"]`` for GPT-2 or
            ``["3"]`` for an ``nn.Sequential`` (child index); ``num_stages - 1`` of them, in order.

    Returns:
        The plan: owned module FQNs and parameter count per stage, and tied parameters across stages.

    Raises:
        ConfigurationError: unknown or unsupported family, more stages than blocks, or bad split points.

    Example::

        plan = plan_pipeline(GPT2LMHeadModel(GPT2Config(n_layer=4)), num_stages=2)
        plan.stages[0]   # ('transformer.wte', 'transformer.wpe', 'transformer.drop', 'transformer.h.0', ...)
        plan.tied_parameters   # (('transformer.wte.weight', 'lm_head.weight'),)
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigurationError(f"num_stages={num_stages!r} is invalid; valid: a positive integer.")
    spec = _spec(model, family)
    family = spec.name
    layout = _layout(model, spec, split_points)
    units = layout.units
    if num_stages > len(units):
        raise ConfigurationError(
            f"{num_stages} pipeline stages but the {family} model has only {len(units)} layers to split "
            f"({[u[0] for u in units][:8]}{'...' if len(units) > 8 else ''}); valid: num_stages <= {len(units)}."
        )
    if split_points is not None:
        starts = _starts_from_split_points(units, num_stages, split_points)
    else:
        weights = [_count(model, u) for u in units]
        starts = _balanced_boundaries(weights, _count(model, layout.first), _count(model, layout.last), num_stages)
    ends = starts[1:] + [len(units)]
    stages: list[tuple[str, ...]] = []
    blocks: list[tuple[str, ...]] = []
    for s, (i, j) in enumerate(zip(starts, ends, strict=True)):
        owned = [f for u in units[i:j] for f in u]
        blocks.append(tuple(owned))
        owned = (layout.first if s == 0 else []) + owned + (layout.last if s == num_stages - 1 else [])
        stages.append(tuple(owned))
    counts = tuple(_count(model, s) for s in stages)
    plan = PipelinePlan(family, tuple(stages), counts, stage_blocks=tuple(blocks))
    _check_coverage(model, plan)
    tied, shapes = _tied_groups(model, plan)
    return PipelinePlan(family, plan.stages, counts, tied, shapes, plan.stage_blocks)


def _starts_from_split_points(units: list[list[str]], num_stages: int, split_points: Sequence[str]) -> list[int]:
    valid = [u[0] for u in units[1:]]
    if len(split_points) != num_stages - 1:
        raise ConfigurationError(
            f"split_points={list(split_points)} gives {len(split_points) + 1} stages but num_stages={num_stages}; "
            f"give {num_stages - 1} FQNs where a new stage begins, from {valid}."
        )
    index = {u[0]: i for i, u in enumerate(units)}
    starts = [0]
    for point in split_points:
        if point not in index or index[point] == 0:
            raise ConfigurationError(f"split point {point!r} is not a block where a stage can begin; valid: {valid}.")
        if index[point] <= starts[-1]:
            raise ConfigurationError(f"split_points={list(split_points)} must be distinct and in model order.")
        starts.append(index[point])
    return starts


def _check_coverage(model: nn.Module, plan: PipelinePlan) -> None:
    for name, _ in model.named_parameters(remove_duplicate=False):
        try:
            plan.stage_of(name)
        except KeyError:
            raise ConfigurationError(
                f"parameter {name!r} of {type(model).__name__} is in no pipeline stage; the {plan.family} family "
                "does not know this module (see docs/hybrid.md, 'Adding a model family')."
            ) from None


def _tied_groups(model: nn.Module, plan: PipelinePlan) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[int, ...], ...]]:
    by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    groups, shapes = [], []
    for key, names in by_tensor.items():
        if len({plan.stage_of(n) for n in names}) > 1:
            groups.append(tuple(names))
            shapes.append(tuple(tensors[key].shape))
    return tuple(groups), tuple(shapes)



def validate_pipeline(
    model: nn.Module,
    pp_size: int,
    virtual_stages: int,
    schedule: str,
    n_microbatches: int,
    batch_size: int | None = None,
    family: str | None = None,
    split_points: list[str] | None = None,
) -> None:
    """Check a pipeline configuration without touching any process group.

    Args:
        model: the full model.
        pp_size: number of pipeline ranks.
        virtual_stages: stages per rank.
        schedule: a name from :data:`SCHEDULES`.
        n_microbatches: microbatches per step.
        batch_size: the per-step batch size of one pipeline (``None`` skips that check).
        family: model family, detected when ``None``.
        split_points: user stage boundaries (see :func:`plan_pipeline`).

    Raises:
        ConfigurationError: the first problem found, naming the bad value and the valid choices.
    """
    check_schedule_name(schedule)
    if isinstance(pp_size, bool) or not isinstance(pp_size, int) or pp_size < 1:
        raise ConfigurationError(f"pipeline_parallel_size={pp_size!r} is invalid; valid: a positive integer.")
    check_virtual_stages(schedule, virtual_stages)
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ConfigurationError(f"num_microbatches={n_microbatches!r} is invalid; valid: a positive integer.")
    if batch_size is not None and batch_size % n_microbatches:
        raise ConfigurationError(
            f"batch size {batch_size} is not divisible by num_microbatches={n_microbatches}; valid: a batch size "
            f"that is a multiple of {n_microbatches}, or num_microbatches among "
            f"{[d for d in range(1, batch_size + 1) if batch_size % d == 0]}."
        )
    problem = check_microbatches(schedule, pp_size, n_microbatches)
    if problem:
        raise ConfigurationError(problem)
    num_stages = pp_size * virtual_stages
    spec = _spec(model, family)
    n_layers = len(_layout(model, spec, split_points).units)
    if virtual_stages > 1 and n_layers < num_stages:
        raise ConfigurationError(
            f"pipeline_schedule={schedule!r} with pp={pp_size} x virtual_stages={virtual_stages} = {num_stages} "
            f"stages needs at least one layer per virtual stage but the model has {n_layers} layers; "
            f"valid: virtual_stages <= {max(1, n_layers // pp_size)}."
        )
    plan_pipeline(model, num_stages, spec.name, split_points)




# ---------------------------------------------------------------------------------------------------
# Local model
# ---------------------------------------------------------------------------------------------------
def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent, _, name = fqn.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def build_local_model(
    model: nn.Module, plan: PipelinePlan, stage_ids: Sequence[int]
) -> tuple[nn.Module, list[nn.Module]]:
    """Prune ``model`` in place to the stages ``stage_ids``; return it and one module per stage.

    Modules owned by other stages are removed: ``ModuleList``/``Sequential`` entries become a
    parameter-free ``nn.Module()`` placeholder (indices, hence FQNs, stay those of the unsplit model) and
    other attributes become ``None``. Parameters tied across stages that this rank holds twice (the first
    and last stage of a V schedule) are untied so each stage scales and steps its own copy.

    Args:
        model: the full model, as built on every rank from the same seed; modified in place.
        plan: from :func:`plan_pipeline`.
        stage_ids: this rank's stages, from :func:`stage_ids_for_rank`.

    Returns:
        ``(local_model, stage_modules)``: ``local_model`` is ``model`` itself, whose ``named_parameters()``
        are exactly this rank's parameters under their original FQNs; ``stage_modules[i]`` runs stage
        ``stage_ids[i]`` (views sharing ``local_model``'s submodules). The first stage takes the model
        inputs (``x`` for ``nn.Sequential``; ``input_ids, attention_mask=None`` for Hugging Face models),
        intermediate stages pass tensors on (hidden states and the 2-d attention mask), the last returns the
        logits tensor.

    Raises:
        ConfigurationError: a stage id out of range, repeated, or not in increasing order.
    """
    ids = list(stage_ids)
    if not ids or sorted(set(ids)) != ids or not all(0 <= s < plan.num_stages for s in ids):
        raise ConfigurationError(
            f"stage_ids={ids} is invalid; valid: distinct increasing ids in [0, {plan.num_stages})."
        )
    for group in plan.tied_parameters:
        local = [name for name in group if plan.stage_of(name) in ids]
        seen_stages: set[int] = set()
        for name in local:
            stage = plan.stage_of(name)
            if seen_stages and stage not in seen_stages:
                owner, attr = _parent(model, name)
                setattr(owner, attr, nn.Parameter(getattr(owner, attr).detach().clone()))
            seen_stages.add(stage)
    for stage, modules in enumerate(plan.stages):
        if stage in ids:
            continue
        for fqn in modules:
            parent, name = _parent(model, fqn)
            if isinstance(parent, nn.ModuleList | nn.Sequential):
                parent._modules[name] = nn.Module()
            else:
                setattr(parent, name, None)
    return model, [_stage_module(model, plan, s) for s in ids]


def _stage_module(model: nn.Module, plan: PipelinePlan, stage: int) -> nn.Module:
    build = get_family(name=plan.family).build_stage
    assert build is not None
    blocks = [model.get_submodule(f) for f in plan.stage_blocks[stage]]
    return build(model, blocks, stage == 0, stage == plan.num_stages - 1)


def reduce_tied_gradients(
    local_model: nn.Module, plan: PipelinePlan, group: dist.ProcessGroup | None = None
) -> None:
    """Sum the gradients of each tied group over its stages and give every copy the sum.

    Call it on every rank of the pipeline group after the schedule's backward and before the optimizer
    step (it is one all-reduce per tied group; ranks without a member contribute zeros). The result is the
    gradient the single tied tensor gets in the unsplit model, so the copies stay identical.

    Copies may be tensor-parallel DTensors sharded differently on different stages (a vocab-parallel head,
    a replicated embedding): the sum is formed on full tensors and re-sharded per copy.

    Args:
        local_model: the pruned model from :func:`build_local_model`.
        plan: its plan.
        group: the pipeline process group (the default group when ``None``).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(local_model.named_parameters(remove_duplicate=False))
    any_param = next(iter(params.values()), None)
    for names, shape in zip(plan.tied_parameters, plan.tied_shapes, strict=True):
        local = list({id(params[n]): params[n] for n in names if n in params}.values())
        ref = local[0] if local else any_param
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        total = torch.zeros(shape, dtype=dtype, device=device)
        for param in local:
            if param.grad is not None:
                total += param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        dist.all_reduce(total, group=group)
        for param in local:
            if isinstance(param, DTensor):
                param.grad = distribute_tensor(total, param.device_mesh, param.placements)
            else:
                param.grad = total.clone() if len(local) > 1 else total


