"""Attention-head pruning (Michel et al. 2019) that physically removes heads of HF BERT, GPT-2 and Llama.

The importance of a head is ``E |dL/d xi_h|``, the gradient of the loss with respect to a gate ``xi_h``
multiplying the head's output (a forward pre-hook on the output projection, so it works with every
attention implementation: eager, sdpa, flash). Heads are ranked globally after normalizing each
layer's scores by their L2 norm, and removed by slicing the q/k/v and output projections: the model
gets smaller and faster, with outputs identical to the model whose removed heads are gated to zero.

Llama with grouped-query attention is pruned by key/value group (a kv head and the query heads that
share it), so every layer keeps ``num_key_value_groups`` query heads per kv head; with plain multi-head
attention a unit is one head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families import get_family
from lit_parallel.parallel.pruning import check_sparsity, comm_device
from lit_parallel.strategies.context import parallel_context

__all__ = [
    "AttentionHeadPruning",
    "attention_layers",
    "head_gates",
    "head_importance",
    "load_pruned",
    "prune_heads",
    "select_heads",
]

_IMPORTANCE = ("gradient", "weight_norm")


@dataclass
class _Attention:
    """One attention layer: where its heads are and how to cut them."""

    module: nn.Module
    kind: Literal["bert", "gpt2", "llama"]
    head_dim: int
    group_size: int  # query heads per prunable unit (a kv group under GQA)

    @property
    def out_proj(self) -> nn.Module:
        """The projection whose input is the concatenation of the heads' outputs."""
        if self.kind == "bert":
            return self.module.output.dense
        return self.module.c_proj if self.kind == "gpt2" else self.module.o_proj

    @property
    def num_heads(self) -> int:
        if self.kind == "bert":
            return self.module.self.num_attention_heads
        if self.kind == "gpt2":
            return self.module.num_heads
        return self.module.q_proj.out_features // self.head_dim

    @property
    def num_units(self) -> int:
        return self.num_heads // self.group_size


def _classify(module: nn.Module) -> _Attention | None:
    attn = getattr(module, "self", None)
    if all(hasattr(attn, a) for a in ("query", "key", "value", "attention_head_size")) and hasattr(
        getattr(module, "output", None), "dense"
    ):
        return _Attention(module, "bert", attn.attention_head_size, 1)
    if all(hasattr(module, a) for a in ("c_attn", "c_proj", "num_heads", "head_dim", "split_size")):
        if getattr(module, "is_cross_attention", False):
            return None
        return _Attention(module, "gpt2", module.head_dim, 1)
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups")):
        return _Attention(module, "llama", module.head_dim, module.num_key_value_groups)
    return None


def attention_layers(model: nn.Module) -> dict[str, _Attention]:
    """Qualified name -> attention layer, for every HF BERT-, GPT-2- or Llama-style attention in ``model``.

    Raises:
        ConfigurationError: the model has no attention heads this module knows how to prune, or its
            attention weights are tensor-parallel shards.
    """
    # A registered family says which submodule of its blocks is the attention (``attention``, ``attn``, ``self_attn``).
    try:
        attribute = get_family(model).attention_module
    except ConfigurationError:
        attribute = None
    found = {name: layer for name, m in model.named_modules()
             if (attribute is None or name.rpartition(".")[2] == attribute) and (layer := _classify(m)) is not None}
    if not found:
        raise ConfigurationError(
            f"{type(model).__name__} has no attention heads to prune; valid: HF BERT-like (self.query/key/value "
            "+ output.dense), GPT-2 (c_attn/c_proj) or Llama-like (q/k/v/o_proj) attention."
        )
    for name, layer in found.items():
        if any(isinstance(p, DTensor) for p in layer.module.parameters()):
            raise ConfigurationError(
                f"attention {name!r} is tensor-parallel (DTensor); head pruning supports unsharded attention only."
            )
    return found


@contextmanager
def head_gates(model: nn.Module, values: dict[str, Tensor] | None = None) -> Iterator[dict[str, Tensor]]:
    """Multiply each head's output by a gate (the ``xi_h`` of Michel et al.) while the context is open.

    Args:
        model: a model with attention layers (see :func:`attention_layers`).
        values: name -> per-query-head gate values; default all ones with ``requires_grad=True``, so that
            ``torch.autograd.grad(loss, gates)`` gives the head-mask gradients.

    Yields:
        name -> gate tensor of shape ``[num_heads]``.
    """
    layers = attention_layers(model)
    gates: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers.items():
        # fp32 gates: their gradients are the importance scores, also under bf16 training.
        gate = values[name] if values is not None and name in values else torch.ones(
            layer.num_heads, device=layer.out_proj.weight.device, requires_grad=True
        )
        gates[name] = gate

        def hook(_: nn.Module, args: tuple[Any, ...], gate: Tensor = gate, dim: int = layer.head_dim) -> tuple[Any, ...]:
            x = args[0]
            heads = x.view(*x.shape[:-1], -1, dim) * gate.to(x.device, x.dtype).view(-1, 1)
            return (heads.view(x.shape), *args[1:])

        handles.append(layer.out_proj.register_forward_pre_hook(hook))
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def head_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
    importance: Literal["gradient", "weight_norm"] = "gradient",
    normalize: bool = True,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Tensor]:
    """Importance of every prunable unit (head, or kv group under GQA), name -> ``[num_units]``.

    Args:
        model: the model whose heads are scored.
        batches: batches fed to ``loss_fn`` (``"gradient"`` only).
        loss_fn: batch -> scalar loss, running ``model`` (its gates are hooked in).
        importance: ``"gradient"`` (Michel et al.: ``sum |dL/d xi_h|`` over batches) or ``"weight_norm"``
            (L2 norm of the head's slice of the output projection; needs no data).
        normalize: divide each layer's scores by their L2 norm (Michel et al., section 4.2).
        group: sum gradient scores over this process group, so that data-parallel replicas agree
            (``None``: the default group whenever torch.distributed is initialized).
    """
    if importance not in _IMPORTANCE:
        raise ConfigurationError(f"importance={importance!r} is unknown; valid: {list(_IMPORTANCE)}.")
    layers = attention_layers(model)
    if importance == "weight_norm":
        per_head = {name: _out_proj_head_norms(layer) for name, layer in layers.items()}
    else:
        per_head = {name: torch.zeros(layer.num_heads, dtype=torch.float64) for name, layer in layers.items()}
        with head_gates(model) as gates, torch.enable_grad():
            names = list(gates)
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(batch), [gates[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is not None:
                        per_head[name] += grad.detach().abs().double().cpu()
        if dist.is_available() and dist.is_initialized():
            stacked = torch.cat([per_head[n] for n in names]).to(comm_device(group))
            dist.all_reduce(stacked, group=group)
            per_head = dict(zip(names, stacked.cpu().split([per_head[n].numel() for n in names]), strict=True))
    scores = {}
    for name, layer in layers.items():
        units = per_head[name].view(layer.num_units, layer.group_size).sum(dim=1)
        scores[name] = units / units.norm().clamp_min(1e-20) if normalize else units
    return scores


def _out_proj_head_norms(layer: _Attention) -> Tensor:
    weight = layer.out_proj.weight.detach().double()
    # GPT-2's Conv1D stores [in, out]; Linear stores [out, in]: bring the heads' input dim first.
    by_input = weight if layer.kind == "gpt2" else weight.t()
    return by_input.reshape(layer.num_heads, -1).norm(dim=1).cpu()


def select_heads(scores: dict[str, Tensor], amount: float | int) -> dict[str, list[int]]:
    """The globally least important units, never all of a layer: name -> sorted unit indices.

    Args:
        scores: name -> importance per unit (from :func:`head_importance`).
        amount: a fraction in ``[0, 1)`` of all units, or a count.
    """
    total = sum(s.numel() for s in scores.values())
    count = amount if isinstance(amount, int) else round(check_sparsity(amount, "heads_to_prune") * total)
    if not 0 <= count < total:
        raise ConfigurationError(f"heads_to_prune={amount!r} is not in [0, {total}) heads of this model.")
    ranked = sorted(
        ((float(v), li, unit, name) for li, (name, s) in enumerate(scores.items()) for unit, v in enumerate(s))
    )
    left = {name: s.numel() for name, s in scores.items()}
    chosen: dict[str, list[int]] = {}
    for _, _, unit, name in ranked:
        if count == 0:
            break
        if left[name] > 1:  # the last head of a layer always stays
            chosen.setdefault(name, []).append(unit)
            left[name] -= 1
            count -= 1
    return {name: sorted(units) for name, units in chosen.items()}


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _slice_conv1d(conv: nn.Module, index: Tensor, dim: int) -> nn.Module:
    """HF ``Conv1D`` (weight ``[in, out]``): keep input rows (``dim=0``) or output columns (``dim=1``)."""
    weight = conv.weight.detach().index_select(dim, index.to(conv.weight.device))
    new = type(conv)(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    bias = conv.bias.detach()
    new.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 1 else bias)
    return new


def _head_index(heads: list[int], head_dim: int) -> Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _cut(layer: _Attention, keep_units: list[int]) -> None:
    keep_heads = [u * layer.group_size + g for u in keep_units for g in range(layer.group_size)]
    index = _head_index(keep_heads, layer.head_dim)
    m = layer.module
    if layer.kind == "bert":
        attn = m.self
        attn.query, attn.key, attn.value = (_slice_linear(p, index, 0) for p in (attn.query, attn.key, attn.value))
        m.output.dense = _slice_linear(m.output.dense, index, 1)
        attn.num_attention_heads = len(keep_heads)
        attn.all_head_size = len(keep_heads) * layer.head_dim
    elif layer.kind == "gpt2":
        width = m.split_size
        m.c_attn = _slice_conv1d(m.c_attn, torch.cat([index + s * width for s in range(3)]), 1)
        m.c_proj = _slice_conv1d(m.c_proj, index, 0)
        m.num_heads = len(keep_heads)
        m.split_size = len(keep_heads) * layer.head_dim
    else:
        kv_index = _head_index(keep_units, layer.head_dim)
        m.q_proj = _slice_linear(m.q_proj, index, 0)
        m.k_proj, m.v_proj = _slice_linear(m.k_proj, kv_index, 0), _slice_linear(m.v_proj, kv_index, 0)
        m.o_proj = _slice_linear(m.o_proj, index, 1)


def prune_heads(model: nn.Module, heads: dict[str, list[int]]) -> dict[str, list[int]]:
    """Remove attention units (heads, or kv groups under GQA) for real, in place.

    Indices are those of the model as it is now. When ``model`` has a Hugging Face ``config``, the
    removed *original* indices are accumulated in ``config.pruned_heads`` so that :func:`load_pruned`
    can rebuild the architecture of an exported model.

    Args:
        model: the model (its attention layers are found by :func:`attention_layers`).
        heads: attention-layer name -> unit indices to remove.

    Returns:
        name -> original indices removed so far (also in ``config.pruned_heads``).

    Raises:
        ConfigurationError: an unknown layer name, an index out of range, or all units of a layer.
    """
    layers = attention_layers(model)
    config = getattr(model, "config", None)
    record: dict[str, list[int]] = dict(getattr(config, "pruned_heads", None) or {})
    for name, units in heads.items():
        if name not in layers:
            raise ConfigurationError(f"no attention layer {name!r}; valid: {sorted(layers)}.")
        count = layers[name].num_units
        bad = [u for u in units if not 0 <= u < count]
        if bad:
            raise ConfigurationError(f"heads {bad} of {name!r} are out of range; valid: 0..{count - 1}.")
        if len(set(units)) >= count:
            raise ConfigurationError(
                f"pruning all {count} heads of {name!r} would remove the layer's attention; keep at least one."
            )
    for name, units in heads.items():
        if not units:
            continue
        layer = layers[name]
        removed = set(record.get(name, []))
        original = [u for u in range(layer.num_units + len(removed)) if u not in removed]
        _cut(layer, [u for u in range(layer.num_units) if u not in set(units)])
        record[name] = sorted(removed | {original[u] for u in units})
    if config is not None:
        config.pruned_heads = record
    return record


def load_pruned(path: str | Path) -> nn.Module:
    """Load a model written by :func:`~lit_parallel.callbacks.export_pruned` after head pruning.

    Builds the architecture named in the saved config, removes the heads listed in
    ``config.pruned_heads``, and loads the saved weights (strictly: only tied weights may be absent).
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0])(config)
    pruned = dict(getattr(config, "pruned_heads", None) or {})
    config.pruned_heads = {}
    prune_heads(model, pruned)
    state: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ConfigurationError(f"{path} does not match its config: missing {untied}, unexpected {unexpected}.")
    return model.eval()


class AttentionHeadPruning(Callback):
    """At the end of fit, remove the least important attention heads of a Hugging Face model.

    Importance is measured on ``num_batches`` training batches (summed over data-parallel ranks so
    every replica removes the same heads), then heads are removed physically: parameters and compute
    shrink. Removing heads changes parameter shapes, so it happens after training; fine-tune again
    afterwards if needed (a new ``fit`` builds a new optimizer).

    Args:
        heads_to_prune: fraction in ``[0, 1)`` of all units, their number, or an explicit map
            attention-layer name -> unit indices. Units are heads (kv groups for Llama with GQA).
            Automatic selection never removes the last head of a layer.
        importance: ``"gradient"`` (Michel et al. 2019) or ``"weight_norm"`` (no data needed).
        num_batches: training batches for the gradient importance.
        normalize: L2-normalize scores within each layer before the global ranking.

    Raises:
        ConfigurationError: a fraction outside ``[0, 1)``, an unknown ``importance``; at the end of fit, a
            model without attention heads, an explicit map removing all heads of a layer, or a
            tensor/pipeline-parallel strategy.

    Example::

        pruning = AttentionHeadPruning(heads_to_prune=0.5, importance="gradient", num_batches=16)
        Trainer(callbacks=[pruning]).fit(bert_module, datamodule=dm)
        export_pruned(bert_module, "bert-half-heads/")
    """

    def __init__(
        self,
        heads_to_prune: float | int | dict[str, list[int]] = 0.5,
        importance: Literal["gradient", "weight_norm"] = "gradient",
        num_batches: int = 8,
        normalize: bool = True,
    ) -> None:
        if isinstance(heads_to_prune, float):
            check_sparsity(heads_to_prune, "heads_to_prune")
        elif isinstance(heads_to_prune, int) and heads_to_prune < 0:
            raise ConfigurationError(f"heads_to_prune={heads_to_prune} must be >= 0.")
        if importance not in _IMPORTANCE:
            raise ConfigurationError(f"importance={importance!r} is unknown; valid: {list(_IMPORTANCE)}.")
        if num_batches < 1:
            raise ConfigurationError(f"num_batches={num_batches} must be >= 1.")
        self.heads_to_prune, self.importance = heads_to_prune, importance
        self.num_batches, self.normalize = num_batches, normalize
        self.scores: dict[str, Tensor] = {}
        self.pruned: dict[str, list[int]] = {}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        group = parallel_context(trainer.strategy).model_parallel_group
        if group is not None and dist.get_world_size(group) > 1:
            raise ConfigurationError(
                "AttentionHeadPruning supports data-parallel strategies only; this one shards the model over "
                f"{dist.get_world_size(group)} ranks."
            )
        attention_layers(getattr(pl_module, "model", pl_module))  # fail before training, not after

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prune(trainer, pl_module)

    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "model", pl_module)
        heads = self.heads_to_prune
        if not isinstance(heads, dict):
            was_training = pl_module.training
            pl_module.eval()
            batches = (trainer.strategy.batch_to_device(b) for b in islice(trainer.train_dataloader, self.num_batches))
            self.scores = head_importance(net, batches, lambda b: _loss(pl_module, b), self.importance,
                                          self.normalize)
            pl_module.train(was_training)
            heads = select_heads(self.scores, heads)
        before = sum(p.numel() for p in net.parameters())
        self.pruned = prune_heads(net, heads)
        after = sum(p.numel() for p in net.parameters())
        removed = sum(len(u) for u in heads.values())
        rank_zero_info(f"AttentionHeadPruning: removed {removed} heads; parameters {before:,} -> {after:,}.")


def _loss(pl_module: L.LightningModule, batch: Any) -> Tensor:
    forward_loss = getattr(pl_module, "forward_loss", None)
    if forward_loss is not None:
        return forward_loss(batch)[0]
    out = pl_module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out
