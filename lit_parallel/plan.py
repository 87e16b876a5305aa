"""Memory planner: predicted per-rank bytes of every tp x pp x dp layout, and the one to pick.

Pure arithmetic on the model's sizes (a Hugging Face config, a model name, or an ``nn.Module``): nothing is
allocated and no process group is created, so a 70B config is planned in milliseconds on a laptop. The
prediction is for the *worst* rank of a layout (the pipeline stage with the largest total), split into

* **parameters, gradients, optimizer state** at rest: the stage's parameters after tensor parallelism,
  divided by ``data_parallel_shard_size`` as the ZeRO stage says (:data:`ZERO_STAGES`);
* **activations** kept for backward (formulas in :func:`layer_activation_bytes`), for the microbatches a
  pipeline schedule keeps in flight, with activation checkpointing applied, plus the loss's log-probabilities on
  the last stage;
* **transient**: memory that exists only during forward/backward (FSDP2's unsharded parameters and the
  unsharded gradients of the block being reduce-scattered; autocast's low-precision weight copies).

Each :class:`MemoryEstimate` also lists the small tensors every tensor-parallel rank replicates (norms,
row-parallel biases, GPT-2's position embeddings, attention weights of uneven GQA splits).

Example::

    from lit_parallel.plan import Layout, candidates, estimate_memory, format_table, recommend

    est = estimate_memory("smollm2", Layout(dp=4, zero_stage=3), batch_size=8, seq_len=512,
                          precision="bf16-mixed")
    est.total / 2**30                       # predicted GiB on the worst rank
    best = recommend("smollm2", devices=4, memory_budget="8GiB", batch_size=8, seq_len=512)
    print(format_table(candidates("smollm2", devices=4, batch_size=8, seq_len=512), budget=8 * 2**30))

The same from the shell: ``lit-parallel-plan model=smollm2 devices=4 memory_budget=8GiB seq_len=512``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pipeline import _balanced_boundaries

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "OPTIMIZER_STATES",
    "PRECISIONS",
    "SCHEDULES",
    "ZERO_STAGES",
    "Layout",
    "MemoryEstimate",
    "ModelShape",
    "candidates",
    "estimate_memory",
    "format_table",
    "layer_activation_bytes",
    "main",
    "model_shape",
    "parse_bytes",
    "recommend",
    "stage_parameter_counts",
]

ZERO_STAGES: dict[int, str] = {
    0: "replicate parameters, gradients and optimizer state over dp (divided by tp*pp only)",
    1: "shard optimizer state over dp_shard",
    2: "shard optimizer state and gradients; parameters sharded at rest, unsharded for the whole step "
       "(FSDP2 reshard_after_forward=False)",
    3: "shard everything; parameters unsharded one block at a time (FSDP2 reshard_after_forward=True)",
}
"""What each ``zero_stage`` divides by ``data_parallel_shard_size``."""

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
"""``"full"``: every transformer block is recomputed in backward (only its input is kept); ``"selective"``:
every second block is (torchtitan's layer-level selective checkpointing with frequency 2)."""

OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 1, "sgd_momentum": 1, "sgd_plain": 0}
"""States per parameter (``"sgd"`` is the project's SGD, momentum 0.9)."""

SCHEDULES = ("1f1b", "gpipe")
"""Pipeline schedules the planner models: 1F1B keeps ``pp - stage`` microbatches in flight, GPipe all."""


@dataclass(frozen=True)
class _Precision:
    param: int  # bytes per parameter (and gradient)
    activation: int  # bytes per activation element of the matmuls
    autocast: bool  # fp32 parameters, low-precision compute: autocast copies inputs and weights


PRECISIONS: dict[str, _Precision] = {
    "32-true": _Precision(4, 4, False),
    "bf16-mixed": _Precision(4, 2, True),
    "16-mixed": _Precision(4, 2, True),
    "bf16-true": _Precision(2, 2, False),
}
"""Lightning's precision names (``"fp32"`` and ``"32"`` are read as ``"32-true"``)."""
_PRECISION_ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-mixed", "fp16-mixed": "16-mixed"}

_GIB = 2**30
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ---------------------------------------------------------------------------------------------------
# Model shape: parameter tensors and how tensor parallelism splits them
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    """One parameter: its shape and the dimension tensor parallelism chunks (``None``: replicated)."""

    name: str
    shape: tuple[int, ...]
    split: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, tp: int) -> int:
        """Elements on the largest tensor-parallel rank (``torch.chunk`` sizes: uneven vocabularies round up)."""
        if self.split is None or tp == 1:
            return self.numel
        shape = list(self.shape)
        shape[self.split] = -(-shape[self.split] // tp)
        return math.prod(shape)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner reads from a model: its parameter tensors per pipeline unit and its widths.

    Build one with :func:`model_shape`. ``first`` / ``blocks`` / ``last`` mirror the family's pipeline layout
    (embeddings, transformer layers, final norm and head); a generic ``nn.Module`` has ``kind="module"`` and
    its parameter counts only.

    Attributes:
        name: what it was built from (a model name, ``config.model_type`` or the module's class).
        kind: ``"llama"`` (Llama, Qwen2, Qwen3, Mistral), ``"gpt2"`` or ``"module"``.
        first: parameters of the first stage's modules (embeddings).
        block: parameters of one transformer layer (every layer is alike).
        last: parameters of the last stage's modules (final norm and head).
        num_layers: transformer layers.
        tied: the head shares the embedding matrix (one tensor unless pipeline stages separate them).
        hidden_size, intermediate_size, vocab_size, num_heads, num_kv_heads, head_dim: widths.
        qk_norm: per-head RMSNorm on q and k (Qwen3).
        dropout: GPT-2's residual/embedding dropout probability (a 1-byte mask per element is kept).
        module_stage_counts: for ``kind="module"``, parameters per pipeline stage by ``pp`` (from
            :func:`~lit_parallel.parallel.pipeline.plan_pipeline`).
    """

    name: str
    kind: Literal["llama", "gpt2", "module"]
    first: tuple[_Tensor, ...]
    block: tuple[_Tensor, ...]
    last: tuple[_Tensor, ...]
    num_layers: int
    tied: bool = False
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    num_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 0
    qk_norm: bool = False
    dropout: float = 0.0
    module_stage_counts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Parameters of the unsplit model (a tied matrix counted once)."""
        head = self._tied_head_numel()
        return sum(t.numel for t in self.first + self.last) + self.num_layers * sum(t.numel for t in self.block) - head

    def _tied_head_numel(self) -> int:
        return next((t.numel for t in self.last if t.name.endswith("lm_head.weight")), 0) if self.tied else 0

    def valid_tp(self, tp: int) -> bool:
        """Whether the project's tensor-parallel plan accepts ``tp`` for this model (its family's validator)."""
        if tp == 1:
            return True
        if self.kind == "llama":
            even = self.num_heads % tp == 0 and self.num_kv_heads % tp == 0
            return self.intermediate_size % tp == 0 and (even or tp <= self.num_kv_heads)
        if self.kind == "gpt2":
            return self.num_heads % tp == 0 and self.intermediate_size % tp == 0
        return False

    def uneven_heads(self, tp: int) -> bool:
        """Whether ``tp`` splits the heads unevenly (GQAHeadParallel: attention weights stay replicated)."""
        return self.kind == "llama" and tp > 1 and bool(self.num_heads % tp or self.num_kv_heads % tp)


def _llama_shape(name: str, c: Any) -> ModelShape:
    h, v, inter = c.hidden_size, c.vocab_size, c.intermediate_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "head_dim", None) or h // heads
    model_type = getattr(c, "model_type", "llama")
    qkv_bias = bool(getattr(c, "attention_bias", False)) or model_type == "qwen2"
    o_bias = bool(getattr(c, "attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    qk_norm = model_type == "qwen3"
    p = "model.layers.0"
    block = [_Tensor(f"{p}.input_layernorm.weight", (h,))]
    for proj, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
        block.append(_Tensor(f"{p}.self_attn.{proj}.weight", (out, h), 0))
        if qkv_bias:
            block.append(_Tensor(f"{p}.self_attn.{proj}.bias", (out,), 0))
    block.append(_Tensor(f"{p}.self_attn.o_proj.weight", (h, heads * d), 1))
    if o_bias:
        block.append(_Tensor(f"{p}.self_attn.o_proj.bias", (h,)))
    if qk_norm:
        block += [_Tensor(f"{p}.self_attn.q_norm.weight", (d,)), _Tensor(f"{p}.self_attn.k_norm.weight", (d,))]
    block.append(_Tensor(f"{p}.post_attention_layernorm.weight", (h,)))
    for proj in ("gate_proj", "up_proj"):
        block.append(_Tensor(f"{p}.mlp.{proj}.weight", (inter, h), 0))
        if mlp_bias:
            block.append(_Tensor(f"{p}.mlp.{proj}.bias", (inter,), 0))
    block.append(_Tensor(f"{p}.mlp.down_proj.weight", (h, inter), 1))
    if mlp_bias:
        block.append(_Tensor(f"{p}.mlp.down_proj.bias", (h,)))
    return ModelShape(
        name=name, kind="llama",
        first=(_Tensor("model.embed_tokens.weight", (v, h), 0),),
        block=tuple(block),
        last=(_Tensor("model.norm.weight", (h,)), _Tensor("lm_head.weight", (v, h), 0)),
        num_layers=c.num_hidden_layers, tied=bool(getattr(c, "tie_word_embeddings", False)),
        hidden_size=h, intermediate_size=inter, vocab_size=v, num_heads=heads, num_kv_heads=kv, head_dim=d,
        qk_norm=qk_norm,
    )


def _gpt2_shape(name: str, c: Any) -> ModelShape:
    h, v = c.n_embd, c.vocab_size
    inter = c.n_inner if getattr(c, "n_inner", None) is not None else 4 * h
    p = "transformer.h.0"
    # Conv1D weights are (in, out): column-parallel splits dim 1, row-parallel dim 0. The fused c_attn
    # (PackedConv1DColwiseParallel) is stored replicated; only its compute is split.
    block = (
        _Tensor(f"{p}.ln_1.weight", (h,)), _Tensor(f"{p}.ln_1.bias", (h,)),
        _Tensor(f"{p}.attn.c_attn.weight", (h, 3 * h)), _Tensor(f"{p}.attn.c_attn.bias", (3 * h,)),
        _Tensor(f"{p}.attn.c_proj.weight", (h, h), 0), _Tensor(f"{p}.attn.c_proj.bias", (h,)),
        _Tensor(f"{p}.ln_2.weight", (h,)), _Tensor(f"{p}.ln_2.bias", (h,)),
        _Tensor(f"{p}.mlp.c_fc.weight", (h, inter), 1), _Tensor(f"{p}.mlp.c_fc.bias", (inter,), 0),
        _Tensor(f"{p}.mlp.c_proj.weight", (inter, h), 0), _Tensor(f"{p}.mlp.c_proj.bias", (h,)),
    )
    return ModelShape(
        name=name, kind="gpt2",
        first=(_Tensor("transformer.wte.weight", (v, h), 0), _Tensor("transformer.wpe.weight", (c.n_positions, h))),
        block=block,
        last=(_Tensor("transformer.ln_f.weight", (h,)), _Tensor("transformer.ln_f.bias", (h,)),
              _Tensor("lm_head.weight", (v, h), 0)),
        num_layers=c.n_layer, tied=bool(getattr(c, "tie_word_embeddings", True)),
        hidden_size=h, intermediate_size=inter, vocab_size=v, num_heads=c.n_head, num_kv_heads=c.n_head,
        head_dim=h // c.n_head, dropout=float(max(c.resid_pdrop, c.embd_pdrop)),
    )


_LLAMA_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _config_shape(name: str, config: Any) -> ModelShape:
    model_type = getattr(config, "model_type", None)
    if model_type in _LLAMA_TYPES:
        return _llama_shape(name, config)
    if model_type == "gpt2":
        return _gpt2_shape(name, config)
    raise ConfigurationError(
        f"the planner has no formulas for config.model_type={model_type!r} ({name}); valid: "
        f"{[*_LLAMA_TYPES, 'gpt2']}, or pass the nn.Module (parameters only, tp=1)."
    )


_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner")


def _with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of ``config`` with ``overrides`` set; every key must be an attribute the config already has."""
    if not overrides:
        return config
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        valid = [k for k in _SIZE_KEYS if hasattr(config, k)]
        raise ConfigurationError(
            f"model.{unknown[0]} is not an attribute of {type(config).__name__}; valid: {valid} "
            "(or any other attribute of the config)."
        )
    merged = {**config.to_dict(), **overrides}
    widths = ("hidden_size", "num_attention_heads")
    if any(k in overrides for k in widths) and "head_dim" not in overrides and all(hasattr(config, k) for k in widths):
        # Llama-like configs store head_dim; when it was the derived hidden_size // heads, it follows the new widths
        # (model.hidden_size=768 on a debug config means a 768-wide model with 768 // heads per head).
        if getattr(config, "head_dim", None) == config.hidden_size // config.num_attention_heads:
            merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
    return type(config)(**merged)


def _config_from_name(name: str, overrides: dict[str, Any]) -> Any:
    """The config of a project model name without downloading or converting weights."""
    return _with_overrides(_config_from_name_only(name), overrides)


def _config_from_name_only(name: str) -> Any:
    from lit_parallel.models import loading

    if name in loading.DEBUG_MODELS:
        return loading.load_config(name)
    from transformers import AutoConfig

    if name in loading.OFFLINE_MODELS:
        source = loading._offline_path(name)
        if source.suffix == ".gguf":
            # The GGUF header holds the config; converting the weights (what load_config does) is not needed.
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            meta = load_gguf_checkpoint(str(source), return_tensors=False)["config"]
            meta.pop("_model_name_or_path", None)
            return AutoConfig.for_model(meta.pop("model_type"), **meta)
        return AutoConfig.from_pretrained(str(source))
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError as err:
        raise ConfigurationError(
            f"model={name!r} is not a project model name, a local folder or in the local Hugging Face cache "
            f"(the planner never downloads); valid names: {sorted(loading.OFFLINE_MODELS)} "
            f"{sorted(loading.DEBUG_MODELS)}, or a local folder."
        ) from err


def _module_shape(module: nn.Module) -> ModelShape:
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) in (*_LLAMA_TYPES, "gpt2") and hasattr(module, "lm_head"):
        return _config_shape(type(module).__name__, config)
    params = tuple(_Tensor(n, tuple(p.shape)) for n, p in module.named_parameters())
    return ModelShape(name=type(module).__name__, kind="module", first=params, block=(), last=(), num_layers=0)


def model_shape(model: str | Any, **overrides: Any) -> ModelShape:
    """Read a model's parameter tensors and widths, with no download and no weights allocated.

    Args:
        model: a project model name (``"smollm2"``, ``"llama_debug"``, ``"gpt2_debug"``; the GGUF header is
            read, nothing converted), a local folder or cached hub name, a Hugging Face config
            (Llama, Qwen2, Qwen3, Mistral, GPT-2), or an ``nn.Module`` (a causal LM of those families is
            read from its config; any other module contributes its parameter counts, tp=1 only; build it on
            the meta device to allocate nothing).
        **overrides: config attributes to change (``hidden_size=768``); names and configs only.

    Returns:
        The :class:`ModelShape`.

    Raises:
        ConfigurationError: an unknown name or model type, or an override the config does not have.

    Example::

        shape = model_shape("llama_debug", num_hidden_layers=4)
        shape.num_parameters
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, nn.Module):
        if overrides:
            raise ConfigurationError(f"config overrides {sorted(overrides)} need a model name or config, not a module.")
        return _module_shape(model)
    if isinstance(model, str):
        return _config_shape(model, _config_from_name(model, overrides))
    if hasattr(model, "model_type"):
        return _config_shape(model.model_type, _with_overrides(model, overrides))
    raise ConfigurationError(
        f"model={model!r} is not understood; valid: a model name, a Hugging Face config or an nn.Module."
    )


# ---------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``world = tp * pp * dp`` and ``dp = replicate * dp_shard``.

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size (one stage per rank).
        dp: data-parallel size.
        zero_stage: 0-3 (:data:`ZERO_STAGES`).
        dp_shard: data-parallel ranks that shard (``None``: all of ``dp``; read as 1 at zero_stage 0).
        activation_checkpointing: ``"none"``, ``"selective"`` or ``"full"`` (:data:`ACTIVATION_CHECKPOINTING`).

    Raises:
        ConfigurationError: a size below 1, a zero_stage outside 0-3, a dp_shard not dividing dp, or an
            unknown checkpointing mode.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    dp_shard: int | None = None
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{key}={value!r} is invalid; valid: a positive integer.")
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigurationError(f"zero_stage={self.zero_stage!r} is invalid; valid: {list(ZERO_STAGES)}.")
        shard = self.dp if self.dp_shard is None else self.dp_shard
        if self.zero_stage == 0:
            shard = 1
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1 or self.dp % shard:
            valid = [s for s in range(1, self.dp + 1) if self.dp % s == 0]
            raise ConfigurationError(
                f"data_parallel_shard_size={self.dp_shard!r} does not divide dp={self.dp}; valid: {valid}."
            )
        object.__setattr__(self, "dp_shard", shard)
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigurationError(
                f"activation_checkpointing={self.activation_checkpointing!r} is invalid; "
                f"valid: {list(ACTIVATION_CHECKPOINTING)}."
            )

    @property
    def world_size(self) -> int:
        """``tp * pp * dp``."""
        return self.tp * self.pp * self.dp

    @property
    def shard(self) -> int:
        """Data-parallel ranks that shard (1 at zero_stage 0)."""
        assert self.dp_shard is not None
        return self.dp_shard

    def __str__(self) -> str:
        shard = f" shard={self.shard}" if self.zero_stage and self.shard != self.dp else ""
        return (f"tp={self.tp} pp={self.pp} dp={self.dp}{shard} zero={self.zero_stage} "
                f"ac={self.activation_checkpointing}")


# ---------------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes on the worst rank of a layout (the pipeline stage with the largest total).

    Attributes:
        layout: the layout.
        stage: the worst rank's pipeline stage.
        parameters, gradients, optimizer: training state at rest on that rank.
        activations: kept for backward (in-flight microbatches, checkpointing applied, the loss's log-probabilities
            included).
        transient: only during forward/backward (unsharded parameters and gradients, autocast weight copies, the
            last stage's logits).
        parameter_count: parameters this rank owns after tp and pp (before dp sharding).
        replicated: small tensors every tp rank holds whole (name pattern, bytes of one copy of each).
        notes: what the estimate does not model for this input.
    """

    layout: Layout
    stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    parameter_count: int
    replicated: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def train_state(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Everything: training state, activations and transient."""
        return self.train_state + self.activations + self.transient

    def fits(self, budget: int) -> bool:
        """Whether the total is at most ``budget`` bytes."""
        return self.total <= budget


def layer_activation_bytes(shape: ModelShape, tp: int, precision: str = "32-true") -> float:
    """Bytes one transformer layer keeps for backward, per token (multiply by micro-batch x sequence).

    Counted from the tensors autograd saves in the Hugging Face layers (SDPA attention, no sequence
    parallelism, dropout off unless the config sets it). ``h`` hidden, ``I`` intermediate, ``q = heads*head_dim``,
    ``k = kv_heads*head_dim`` (the largest rank's share under tp), ``a`` heads per rank, ``B`` bytes of an
    activation (2 under bf16, 4 under fp32), ``p`` bytes of a parameter, ``c`` = 1, or under autocast the
    number of linears reading one input (each keeps its own low-precision copy)::

        Llama:  2 RMSNorms (fp32 input + normalized)   2 * (4 + p) * h
                q/k/v and gate/up inputs                (c_qkv + c_gate_up) * B * h
                SDPA q, k, v, output (= o_proj input)   B * (2q + 2k) + 4a (logsumexp)
                SwiGLU gate, silu, up, product          4 * B * I / tp
                Qwen3 q/k norms                         (4 + p) * (q + k)
        GPT-2:  2 LayerNorm inputs                      2 * r * h   (r: 4 under fp32/mixed, else 2)
                c_attn and c_fc inputs                  2 * B * h
                SDPA q, k, v, output + c_proj input     5 * B * h / tp + 4a
                tanh-GELU intermediates + c_proj input  5 * B * I / tp
                2 dropout masks (resid_pdrop > 0)       2 * h

    The attention output is also ``o_proj``'s input: the SDPA kernels return it in (batch, seq, heads, dim)
    memory order, so the transpose and reshape before ``o_proj`` are views (checked against the saved tensors of
    a real step by ``bench/memory.py``).

    This follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    ``sbh(34 + 5as/h)`` for GPT-3) with Llama's gated MLP and fused attention (no ``s^2`` scores kept).

    Args:
        shape: the model (:func:`model_shape`).
        tp: tensor-parallel size.
        precision: a :data:`PRECISIONS` name.

    Returns:
        Bytes per token (0 for a generic module, whose layers the planner does not know).
    """
    prec = _precision(precision)
    b, p, h = prec.activation, prec.param, shape.hidden_size
    if shape.kind == "module":
        return 0.0
    if shape.uneven_heads(tp):
        kv_local = -(-shape.num_kv_heads // tp)
        heads_local = kv_local * (shape.num_heads // shape.num_kv_heads)
    else:
        kv_local, heads_local = shape.num_kv_heads // tp, shape.num_heads // tp
    q, k = heads_local * shape.head_dim, kv_local * shape.head_dim
    inter = shape.intermediate_size / tp
    if shape.kind == "llama":
        c_qkv, c_mlp = (3, 2) if prec.autocast else (1, 1)
        total = 2 * (4 + p) * h + (c_qkv + c_mlp) * b * h + b * (2 * q + 2 * k) + 4 * heads_local + 4 * b * inter
        if shape.qk_norm:
            total += (4 + p) * (q + k)
        return total
    r = 4 if p == 4 else 2
    drop = 2 * h if shape.dropout > 0 else 0
    return 2 * r * h + 2 * b * h + 5 * b * q + 4 * heads_local + 5 * b * inter + drop


def _precision(name: str) -> _Precision:
    key = _PRECISION_ALIASES.get(name, name)
    if key not in PRECISIONS:
        raise ConfigurationError(f"precision={name!r} is unknown; valid: {list(PRECISIONS)}.")
    return PRECISIONS[key]


def _stage_layers(shape: ModelShape, pp: int) -> list[int]:
    """Layers per pipeline stage, split as :func:`~lit_parallel.parallel.pipeline.plan_pipeline` does."""
    if pp > shape.num_layers:
        raise ConfigurationError(
            f"pp={pp} pipeline stages but {shape.name} has {shape.num_layers} layers; valid: pp <= {shape.num_layers}."
        )
    weights = [sum(t.numel for t in shape.block)] * shape.num_layers
    starts = _balanced_boundaries(weights, sum(t.numel for t in shape.first), sum(t.numel for t in shape.last), pp)
    return [j - i for i, j in zip(starts, [*starts[1:], shape.num_layers], strict=True)]


def stage_parameter_counts(model: str | Any, pp: int, tp: int = 1) -> tuple[int, ...]:
    """Parameters per pipeline stage on the largest tensor-parallel rank (before data-parallel sharding).

    The split is :func:`~lit_parallel.parallel.pipeline.plan_pipeline`'s (balanced by parameter count over the
    layers, embeddings on the first stage, final norm and head on the last); a tied head is a separate copy on
    the last stage when ``pp > 1``.

    Args:
        model: anything :func:`model_shape` reads (a generic module: ``pp=1`` only).
        pp: pipeline stages.
        tp: tensor-parallel size.

    Returns:
        One count per stage.

    Raises:
        ConfigurationError: more stages than layers, or a tp the model's family refuses.

    Example::

        stage_parameter_counts("smollm2", pp=4)   # the first and last stages hold fewer layers
    """
    shape = model_shape(model)
    if not shape.valid_tp(tp):
        raise ConfigurationError(f"tp={tp} is not valid for {shape.name}; valid: {_valid_tps(shape, tp * 64)}.")
    if shape.kind == "module":
        _module_estimate(shape, Layout(tp, pp), PRECISIONS["32-true"], 0)  # raises for tp/pp > 1
        return (sum(t.numel for t in shape.first),)
    return tuple(sum(_local(t, shape, tp) * n for t, n in _stage_tensors(shape, pp, s, layers))
                 for s, layers in enumerate(_stage_layers(shape, pp)))


def _stage_tensors(shape: ModelShape, pp: int, stage: int, layers: int) -> list[tuple[_Tensor, int]]:
    """(tensor, copies) owned by ``stage``; a tied head is one tensor when one stage holds both ends."""
    owned: list[tuple[_Tensor, int]] = []
    if stage == 0:
        owned += [(t, 1) for t in shape.first]
    owned += [(t, layers) for t in shape.block]
    if stage == pp - 1:
        owned += [(t, 1) for t in shape.last if not (shape.tied and pp == 1 and t.name.endswith("lm_head.weight"))]
    return owned


def _local(tensor: _Tensor, shape: ModelShape, tp: int) -> int:
    if shape.uneven_heads(tp) and ".self_attn." in tensor.name and "_norm" not in tensor.name:
        return tensor.numel  # GQAHeadParallel keeps q/k/v/o replicated
    return tensor.local_numel(tp)


def estimate_memory(
    model: str | Any,
    layout: Layout | None = None,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "32-true",
    optimizer: str = "adamw",
    master_weights: bool = True,
    num_microbatches: int | None = None,
    pipeline_schedule: str = "1f1b",
) -> MemoryEstimate:
    """Predict the bytes of the worst rank of ``layout``.

    Training state per rank is the stage's parameters after tensor parallelism (:func:`model_shape` lists
    which tensors are split; the largest ``torch.chunk`` piece is counted), then

    ============  ==========================  =====================  ==============================
    zero_stage    parameters / gradients       optimizer state        transient (forward/backward)
    ============  ==========================  =====================  ==============================
    0             whole (replicated over dp)   whole                  --
    1             whole                        / dp_shard             --
    2             / dp_shard                   / dp_shard             the stage's unsharded parameters
    3             / dp_shard                   / dp_shard             2 blocks + embeddings/head unsharded
    ============  ==========================  =====================  ==============================

    Sharded stages also hold one block's unsharded gradients before its reduce-scatter. Under autocast
    (``*-mixed``) unsharded parameters are counted in the compute dtype (FSDP2's ``MixedPrecisionPolicy``);
    without sharding, autocast's low-precision weight copies live until backward. Optimizer state is fp32
    (``bf16-true`` with ``master_weights`` adds the fp32 master copy; without, the states are bf16).

    Activations: :func:`layer_activation_bytes` per layer and token. ``"full"`` checkpointing keeps each
    block's input plus one block's activations during its recompute; ``"selective"`` checkpoints every second
    block. Under pipeline parallelism the batch is split into ``num_microbatches`` and stage ``s`` keeps
    ``min(pp - s, microbatches)`` of them in flight under 1F1B, all of them under GPipe. The last stage adds
    the final norm, the head input and the loss's fp32 log-probabilities (``4*V`` per token; the head's output is
    gathered: every tp rank holds the full vocabulary); the logits themselves (``B*V`` per token of one
    microbatch) are transient: autograd does not keep them, they live from the head to the loss and again as
    their gradient.

    Args:
        model: anything :func:`model_shape` reads (or a :class:`ModelShape`).
        layout: the layout (default: one rank).
        batch_size: samples per data-parallel rank and step (split into microbatches under pp).
        seq_len: tokens per sample.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"bf16-true"``.
        optimizer: a :data:`OPTIMIZER_STATES` name.
        master_weights: ``bf16-true`` keeps an fp32 master copy and fp32 states (the project's default).
        num_microbatches: pipeline microbatches (``None``: ``2 * pp``, the strategy's ``"auto"``).
        pipeline_schedule: ``"1f1b"`` or ``"gpipe"``.

    Returns:
        The :class:`MemoryEstimate` of the worst stage.

    Raises:
        ConfigurationError: an unknown precision/optimizer/schedule, a tp the model's family refuses, more
            stages than layers, or a non-positive batch or sequence length.

    Example::

        est = estimate_memory("llama_debug", Layout(tp=2, dp=2, zero_stage=3), batch_size=4, seq_len=128)
        print(format_table([est]))
    """
    layout = layout or Layout()
    shape = model_shape(model)
    prec = _precision(precision)
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigurationError(f"optimizer={optimizer!r} is unknown; valid: {list(OPTIMIZER_STATES)}.")
    if pipeline_schedule not in SCHEDULES:
        raise ConfigurationError(f"pipeline_schedule={pipeline_schedule!r} is not modelled; valid: {list(SCHEDULES)}.")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{key}={value!r} is invalid; valid: a positive integer.")
    tp, pp = layout.tp, layout.pp
    if not shape.valid_tp(tp):
        raise ConfigurationError(f"tp={tp} is not valid for {shape.name}; valid: {_valid_tps(shape, tp * 64)}.")
    micro = num_microbatches if num_microbatches is not None else (2 * pp if pp > 1 else 1)
    if micro < 1:
        raise ConfigurationError(f"num_microbatches={micro!r} is invalid; valid: a positive integer.")
    state_bytes = OPTIMIZER_STATES[optimizer] * (4 if prec.param == 4 or master_weights else 2)
    if prec.param == 2 and master_weights:
        state_bytes += 4

    if shape.kind == "module":
        return _module_estimate(shape, layout, prec, state_bytes)

    best: MemoryEstimate | None = None
    layers = _stage_layers(shape, pp)
    for stage, n_layers in enumerate(layers):
        owned = _stage_tensors(shape, pp, stage, n_layers)
        count = sum(_local(t, shape, tp) * n for t, n in owned)
        shard = layout.shard
        z = layout.zero_stage
        params = count * prec.param // (shard if z >= 2 else 1)
        grads = count * prec.param // (shard if z >= 2 else 1)
        optim = count * state_bytes // (shard if z >= 1 else 1)
        gathered = prec.activation if prec.autocast else prec.param
        block_numel = sum(_local(t, shape, tp) for t in shape.block)
        if z == 2:
            transient = count * gathered + block_numel * prec.param
        elif z == 3:
            root = count - n_layers * block_numel
            transient = (min(2, n_layers) * block_numel + root) * gathered + block_numel * prec.param
        else:
            transient = count * prec.activation if prec.autocast else 0
        if stage == pp - 1 and shape.kind != "module":
            # the logits of one microbatch (every tp rank holds the full vocabulary after the gather)
            samples = batch_size if pp == 1 else -(-batch_size // micro)
            transient += prec.activation * shape.vocab_size * samples * seq_len
        acts = _stage_activations(shape, layout, prec, precision, stage, n_layers, batch_size, seq_len, micro,
                                  pipeline_schedule)
        replicated = tuple(
            (t.name.replace(".0.", ".*.") if n > 1 else t.name, t.numel * prec.param)
            for t, n in owned if _local(t, shape, tp) == t.numel and tp > 1
        )
        est = MemoryEstimate(layout, stage, params, grads, optim, acts, transient, count, replicated)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def _stage_activations(shape: ModelShape, layout: Layout, prec: _Precision, precision: str, stage: int,
                       n_layers: int, batch: int, seq: int, micro: int, schedule: str) -> int:
    per_layer = layer_activation_bytes(shape, layout.tp, precision)
    block_input = (4 if prec.param == 4 else 2) * shape.hidden_size
    mode = layout.activation_checkpointing
    if mode == "none":
        kept = n_layers * per_layer
    else:
        checkpointed = n_layers if mode == "full" else n_layers // 2
        kept = (n_layers - checkpointed) * per_layer + checkpointed * block_input + (per_layer if checkpointed else 0)
    h, v, b = shape.hidden_size, shape.vocab_size, prec.activation
    if stage == layout.pp - 1:
        norm = (4 + prec.param) * h if shape.kind == "llama" else (4 if prec.param == 4 else 2) * h
        kept += norm + b * h + 4 * v  # the logits are not saved: cross-entropy keeps its log-probabilities
    if stage == 0 and shape.kind == "gpt2" and shape.dropout > 0:
        kept += h  # embedding dropout mask
    if layout.pp == 1:
        tokens, in_flight = batch * seq, 1
    else:
        tokens = -(-batch // micro) * seq
        in_flight = micro if schedule == "gpipe" else min(layout.pp - stage, micro)
    return int(kept * tokens * in_flight)


def _module_estimate(shape: ModelShape, layout: Layout, prec: _Precision, state_bytes: int) -> MemoryEstimate:
    if layout.tp != 1 or layout.pp != 1:
        raise ConfigurationError(
            f"the planner models a generic {shape.name} at tp=1, pp=1 only (got tp={layout.tp}, pp={layout.pp}); "
            "pass a Hugging Face config or model name for tp/pp plans."
        )
    count = sum(t.numel for t in shape.first)
    z, shard = layout.zero_stage, layout.shard
    gathered = prec.activation if prec.autocast else prec.param
    largest = max((t.numel for t in shape.first), default=0)
    transient = {0: 0, 1: 0, 2: count * gathered, 3: 2 * largest * gathered}[z]
    if z < 2 and prec.autocast:
        transient = count * prec.activation
    return MemoryEstimate(
        layout, 0, count * prec.param // (shard if z >= 2 else 1), count * prec.param // (shard if z >= 2 else 1),
        count * state_bytes // (shard if z >= 1 else 1), 0, transient, count,
        notes=("activations of a generic module are not modelled (0)",),
    )


# ---------------------------------------------------------------------------------------------------
# Candidates and recommendation
# ---------------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid_tps(shape: ModelShape, devices: int) -> list[int]:
    return [t for t in _divisors(devices) if shape.valid_tp(t)]


def _preference(layout: Layout) -> tuple[int, ...]:
    """Least communication first: no tp/pp, then tp, then pp; lower zero_stage; no checkpointing."""
    return (layout.pp > 1, layout.pp, layout.tp, layout.zero_stage,
            ACTIVATION_CHECKPOINTING.index(layout.activation_checkpointing), -layout.shard)


def candidates(
    model: str | Any,
    devices: int,
    *,
    tp: int | None = None,
    pp: int | None = None,
    zero_stage: int | None = None,
    data_parallel_shard_size: int | None = None,
    activation_checkpointing: str | None = None,
    **options: Any,
) -> list[MemoryEstimate]:
    """Estimates of every layout of ``devices`` ranks, most preferred (least communication) first.

    Layouts: every tp the model's family accepts (it divides the heads and key/value heads, or is at most
    the key/value heads for Llama-like models) and that divides ``devices``; every ``pp`` up to the layer
    count with ``tp * pp`` dividing ``devices``; zero_stage 0-3; every shard size above 1 dividing dp (zero_stage >= 1);
    every checkpointing mode. Fixed arguments restrict the enumeration.

    Args:
        model: anything :func:`model_shape` reads.
        devices: world size.
        tp, pp, zero_stage, data_parallel_shard_size, activation_checkpointing: fix that part of the layout.
        **options: passed to :func:`estimate_memory` (batch_size, seq_len, precision, optimizer, ...).

    Returns:
        The estimates, ordered by preference (the order :func:`recommend` picks from).

    Raises:
        ConfigurationError: a bad device count or fixed value (the message lists the valid ones).
    """
    shape = model_shape(model)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigurationError(f"devices={devices!r} is invalid; valid: a positive integer.")
    tps = _valid_tps(shape, devices)
    if tp is not None and tp not in tps:
        raise ConfigurationError(f"tp={tp} is not valid for {shape.name} on {devices} devices; valid: {tps}.")
    pps = [p for p in _divisors(devices) if p <= max(shape.num_layers, 1)] if shape.kind != "module" else [1]
    if pp is not None and pp not in pps:
        raise ConfigurationError(f"pp={pp} is not valid for {shape.name} on {devices} devices; valid: {pps}.")
    zeros = list(ZERO_STAGES) if zero_stage is None else [zero_stage]
    modes = list(ACTIVATION_CHECKPOINTING) if activation_checkpointing is None else [activation_checkpointing]
    if shape.kind == "module":
        modes = modes[:1]
    result = []
    for t in [tp] if tp is not None else tps:
        for p in [pp] if pp is not None else pps:
            if devices % (t * p):
                continue
            dp = devices // (t * p)
            for z in zeros:
                # A shard group of 1 shards nothing: the same as zero_stage 0.
                shards = [1] if z == 0 else [data_parallel_shard_size] if data_parallel_shard_size else _divisors(dp)[1:]
                for s in shards:
                    for mode in modes:
                        layout = Layout(t, p, dp, z, s, mode)
                        result.append(estimate_memory(shape, layout, **options))
    if not result:
        raise ConfigurationError(
            f"no layout of {devices} devices matches tp={tp}, pp={pp}, zero_stage={zero_stage}; valid tp: {tps}, "
            f"pp: {pps} with tp * pp dividing devices, zero_stage >= 1 only with dp > 1."
        )
    return sorted(result, key=lambda e: _preference(e.layout))


def recommend(model: str | Any, devices: int, memory_budget: int | str, **options: Any) -> MemoryEstimate:
    """The layout that fits ``memory_budget`` with the least communication.

    Preference order (first that fits wins): pp = 1 before pipelines; then smaller tp; then lower zero_stage;
    then no checkpointing before selective before full; then larger shard groups.

    Args:
        model: anything :func:`model_shape` reads.
        devices: world size.
        memory_budget: bytes per rank, or a string such as ``"24GiB"`` (:func:`parse_bytes`).
        **options: passed to :func:`candidates` (fixed layout parts, batch_size, seq_len, precision, ...).

    Returns:
        The recommended estimate.

    Raises:
        ConfigurationError: no layout fits; the message names the smallest layout, its predicted bytes per
            rank, and the largest batch size that would fit with it.

    Example::

        best = recommend("smollm2", devices=4, memory_budget="2GiB", batch_size=8, seq_len=512)
        best.layout   # the first layout in preference order whose total fits 2 GiB
    """
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
    found = candidates(model, devices, **options)
    for est in found:
        if est.fits(budget):
            return est
    smallest = min(found, key=lambda e: e.total)
    hint = ""
    batch = options.get("batch_size", 1)
    fixed = {k: v for k, v in options.items() if k in _ESTIMATE_OPTIONS and k != "batch_size"}
    for b in range(batch - 1, 0, -1):
        if estimate_memory(model_shape(model), smallest.layout, batch_size=b, **fixed).fits(budget):
            hint = f"; batch_size={b} would fit with that layout"
            break
    else:
        if smallest.train_state + smallest.transient > budget:
            hint = f"; its training state alone is {_fmt(smallest.train_state)}: more devices are needed"
        else:
            hint = "; a smaller seq_len or more devices would be needed"
    raise ConfigurationError(
        f"memory_budget={_fmt(budget)} per rank is smaller than any layout on {devices} devices: the smallest "
        f"({smallest.layout}) needs at least {_fmt(smallest.total)} per rank: {_breakdown(smallest)}{hint}."
    )


_ESTIMATE_OPTIONS = ("batch_size", "seq_len", "precision", "optimizer", "master_weights", "num_microbatches",
                     "pipeline_schedule")


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """``"24GiB"`` / ``"24GB"`` / ``"512MiB"`` / ``"1e9"`` -> bytes (GiB, MiB, KiB binary; GB, MB, KB decimal).

    Raises:
        ConfigurationError: not a number with one of the units.
    """
    s = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if s.endswith(u)), "b" if s[-1:].isdigit() else "")
    number = s[: len(s) - len(unit)] if unit and s.endswith(unit) else s
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigurationError(
            f"memory_budget={text!r} is not a size; valid: a number with a unit from "
            f"{['GiB', 'MiB', 'KiB', 'GB', 'MB', 'KB', 'B']}, e.g. 24GiB."
        ) from None
    if value <= 0:
        raise ConfigurationError(f"memory_budget={text!r} is invalid; valid: a positive size such as 24GiB.")
    return int(value)


def _fmt(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / 2**20:.1f} MiB"


def _breakdown(e: MemoryEstimate) -> str:
    return (f"parameters {_fmt(e.parameters)}, gradients {_fmt(e.gradients)}, optimizer {_fmt(e.optimizer)}, "
            f"activations {_fmt(e.activations)}, transient {_fmt(e.transient)}")


def format_table(estimates: Iterable[MemoryEstimate], budget: int | None = None,
                 recommended: MemoryEstimate | None = None) -> str:
    """A fixed-width table (MiB / GiB) of estimates, one layout per row.

    Args:
        estimates: the rows.
        budget: marks each row ``yes``/``no`` in a ``fits`` column.
        recommended: marked with ``*``.

    Returns:
        The table as one string.
    """
    head = ["", "tp", "pp", "dp", "shard", "zero", "ac", "stage", "params", "grads", "optim", "activ",
            "transient", "total"]
    if budget is not None:
        head.append("fits")
    rows = [head]
    for e in estimates:
        lay = e.layout
        row = ["*" if recommended is not None and e.layout == recommended.layout else "", str(lay.tp), str(lay.pp),
               str(lay.dp), str(lay.shard) if lay.zero_stage else "-", str(lay.zero_stage),
               lay.activation_checkpointing, str(e.stage),
               *(_fmt(x) for x in (e.parameters, e.gradients, e.optimizer, e.activations, e.transient, e.total))]
        if budget is not None:
            row.append("yes" if e.fits(budget) else "no")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = set(range(8, 14))
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    )


# ---------------------------------------------------------------------------------------------------
# Console script
# ---------------------------------------------------------------------------------------------------
_CLI_KEYS: dict[str, str] = {
    "model": "model name (smollm2, llama_debug, gpt2_debug, ...), local folder or cached hub name",
    "model.<attr>": "config attribute override, e.g. model.hidden_size=768 model.num_hidden_layers=12",
    "devices": "world size (default 1)",
    "memory_budget": "bytes per rank, e.g. 24GiB, 24GB, 512MiB (without it: table only)",
    "seq_len": "tokens per sample (default 512)",
    "batch_size": "samples per data-parallel rank and step (default 1; split into microbatches under pp)",
    "precision": f"one of {list(PRECISIONS)} (default 32-true)",
    "optimizer": f"one of {list(OPTIMIZER_STATES)} (default adamw)",
    "master_weights": "bf16-true keeps fp32 master weights and states (default true)",
    "tp": "fix the tensor-parallel size",
    "pp": "fix the pipeline-parallel size",
    "zero_stage": "fix the ZeRO stage (0-3)",
    "data_parallel_shard_size": "fix the dp ranks that shard",
    "activation_checkpointing": f"fix one of {list(ACTIVATION_CHECKPOINTING)}",
    "num_microbatches": "pipeline microbatches (default 2 * pp)",
    "pipeline_schedule": f"one of {list(SCHEDULES)} (default 1f1b)",
    "show": "'none' (default: only rows without activation checkpointing unless fixed) or 'all'",
}
_INT_KEYS = ("devices", "seq_len", "batch_size", "tp", "pp", "zero_stage", "data_parallel_shard_size",
             "num_microbatches")


def _usage() -> str:
    lines = ["usage: lit-parallel-plan [key=value ...]", "",
             "Predicted per-rank memory of every tp x pp x dp layout, and the recommended one.", "", "keys:"]
    lines += [f"  {k:<26} {v}" for k, v in _CLI_KEYS.items()]
    lines += ["", "example: lit-parallel-plan model=smollm2 devices=4 memory_budget=8GiB seq_len=512 batch_size=8"]
    return "\n".join(lines)


def _parse_overrides(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` words -> (planner options, config overrides)."""
    options: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for word in argv:
        key, sep, value = word.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigurationError(f"argument {word!r} is not key=value; valid keys: {list(_CLI_KEYS)}.")
        if key.startswith("model."):
            config[key[len("model."):]] = _literal(value)
            continue
        if key not in _CLI_KEYS:
            raise ConfigurationError(f"unknown key {key!r}; valid keys: {list(_CLI_KEYS)}.")
        if key in _INT_KEYS:
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigurationError(f"{key}={value!r} is not an integer.") from None
        elif key == "master_weights":
            if value.lower() not in ("true", "false"):
                raise ConfigurationError(f"master_weights={value!r} is invalid; valid: true, false.")
            options[key] = value.lower() == "true"
        elif key == "show" and value not in ("none", "all"):
            raise ConfigurationError(f"show={value!r} is invalid; valid: none, all.")
        else:
            options[key] = value
    return options, config


def _literal(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(value.lower(), value)


def main(argv: Sequence[str] | None = None) -> int:
    """``lit-parallel-plan key=value ...``: print the candidate table and the recommended layout.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0, or 2 after a one-line error on bad input or when nothing fits the budget.

    Example::

        lit-parallel-plan model=smollm2 devices=4 memory_budget=8GiB seq_len=512 batch_size=8 precision=bf16-mixed
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    try:
        options, config = _parse_overrides(argv)
        model = options.pop("model", "llama_debug")
        devices = options.pop("devices", 1)
        budget_text = options.pop("memory_budget", None)
        show = options.pop("show", "none")
        budget = parse_bytes(budget_text) if budget_text is not None else None
        shape = model_shape(model, **config)
        found = candidates(shape, devices, **options)
        best = recommend(shape, devices, budget, **options) if budget is not None else None
    except ConfigurationError as err:
        print(f"lit-parallel-plan: error: {err}", file=sys.stderr)
        return 2
    if show == "none" and options.get("activation_checkpointing") is None:
        rows = [e for e in found if e.layout.activation_checkpointing == "none" or (best and e.layout == best.layout)]
    else:
        rows = found
    print(f"{shape.name}: {shape.num_parameters / 1e6:.1f}M parameters, {shape.num_layers} layers; "
          f"devices={devices} batch_size={options.get('batch_size', 1)} seq_len={options.get('seq_len', 512)} "
          f"precision={options.get('precision', '32-true')} optimizer={options.get('optimizer', 'adamw')}")
    print(format_table(rows, budget, best))
    if best is not None:
        print(f"recommended: {best.layout} -> {_fmt(best.total)} per rank (budget {_fmt(budget or 0)})")
    if best is not None and best.replicated:
        print("replicated on every tp rank: " + ", ".join(f"{n} ({_fmt(b)})" for n, b in best.replicated))
    return 0

