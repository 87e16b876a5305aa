"""Materializing a network built on the meta device, shard by shard: no rank ever holds the full model.

Pure torch. A network built under ``torch.device("meta")`` (Lightning's ``trainer.init_module(empty_init=True)``)
is split into pipeline stages, sharded with tensor parallelism and FSDP2 while it holds no data; then each rank
allocates only its shards (``to_empty``) and fills them:

- from a :class:`SafetensorsSource` (pretrained weights): only the slices this rank owns are read from the
  files (``safe_open(...).get_slice``), never a whole tensor of another rank;
- otherwise by the module's own initialization (``reset_parameters()`` or a Hugging Face model's
  ``_init_weights``) run under a generator seeded by ``(seed, module name)``, one module at a time, so every
  layout starts from the same weights as one process built the same way.

Usage::

    origins = MetaOrigins.capture(net)            # before the split (remembers full shapes and tied names)
    ... pipeline split, tensor parallelism, FSDP2 ...
    materialize(net, origins, device, seed=0, source=SafetensorsSource.from_folder(path))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_parallel.errors import ConfigurationError

__all__ = [
    "WEIGHTS_ATTR",
    "MetaOrigins",
    "SafetensorsSource",
    "check_initializable",
    "has_meta",
    "init_rule",
    "local_box",
    "materialize",
    "module_seed",
]

WEIGHTS_ATTR = "_lit_parallel_weights"
"""Attribute of a meta-built network holding its :class:`SafetensorsSource` (set by the model loaders)."""


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def module_seed(seed: int, name: str) -> int:
    """The generator seed of module ``name``: a function of ``(seed, name)`` only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass
class SafetensorsSource:
    """Pretrained weights in safetensors files, read per slice.

    Attributes:
        files: tensor name -> file holding it.
        base_prefix: a Hugging Face model's ``base_model_prefix`` (``"bert"``): a parameter
            ``bert.encoder...`` is also found as ``encoder...`` (a base-model checkpoint loaded into a model
            with a head), and the other way round.
    """

    files: dict[str, Path]
    base_prefix: str = ""
    bytes_read: int = 0  # tensor bytes read so far (only the slices asked for)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path, base_prefix: str = "") -> SafetensorsSource:
        """Index ``model.safetensors`` or a sharded ``model.safetensors.index.json`` in ``folder``.

        Raises:
            ConfigurationError: the folder holds no safetensors weights.
        """
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({name: folder / file for name, file in weight_map.items()}, base_prefix)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConfigurationError(f"{folder} holds no *.safetensors weights to load shard by shard.")
        from safetensors import safe_open

        names: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                names.update({name: file for name in handle.keys()})  # noqa: SIM118 (not a dict)
        return cls(names, base_prefix)

    def key(self, name: str) -> str | None:
        """The stored tensor name of parameter ``name`` (``None``: not in the files)."""
        candidates = [name]
        if self.base_prefix:
            head = self.base_prefix + "."
            candidates.append(name[len(head):] if name.startswith(head) else head + name)
        return next((c for c in candidates if c in self.files), None)

    def __contains__(self, name: str) -> bool:
        return self.key(name) is not None

    def read(self, name: str, box: tuple[tuple[int, ...], tuple[int, ...]] | None) -> Tensor:
        """Tensor ``name``, or only its slice ``box = (local_shape, global_offset)``."""
        from safetensors import safe_open

        key = self.key(name)
        if key is None:
            raise KeyError(f"{name} is not in the weight files")
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        sliced = self._handles[path].get_slice(key)
        if box is None:
            value = sliced[:]
        else:
            shape, offset = box
            value = sliced[tuple(slice(o, o + s) for s, o in zip(shape, offset, strict=True))]
        self.bytes_read += value.numel() * value.element_size()
        return value


@dataclass(frozen=True)
class _Origin:
    module_name: str
    module: nn.Module
    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_param: bool


@dataclass(frozen=True)
class MetaOrigins:
    """Where each tensor of a meta-built network comes from, captured before it is split or sharded.

    Attributes:
        origins: tensor FQN -> its canonical owner (the first module holding it: for a tied weight, the
            module that owns it in the unsplit network, so every pipeline stage's copy gets the same values),
            full shape and dtype.
    """

    origins: dict[str, _Origin]

    @classmethod
    def capture(cls, net: nn.Module) -> MetaOrigins:
        first: dict[int, _Origin] = {}
        origins: dict[str, _Origin] = {}
        for module_name, module in net.named_modules(remove_duplicate=False):
            tensors = [(n, t, True) for n, t in module._parameters.items() if t is not None]
            tensors += [(n, t, False) for n, t in module._buffers.items() if t is not None]
            for attr, tensor, is_param in tensors:
                fqn = f"{module_name}.{attr}" if module_name else attr
                origin = first.setdefault(id(tensor), _Origin(module_name, module, attr, tuple(tensor.shape),
                                                              tensor.dtype, is_param))
                origins[fqn] = origin
        return cls(origins)


def init_rule(net: nn.Module) -> Callable[[nn.Module], None] | None:
    """How ``net`` initializes one module: a Hugging Face model's ``_init_weights``, else ``None`` (then each
    module's own ``reset_parameters``)."""
    init = getattr(net, "_init_weights", None)
    return init if callable(init) else None


def check_initializable(net: nn.Module, source: SafetensorsSource | None, path: str = "") -> None:
    """Refuse, before any collective, a meta tensor that has neither a weight source nor an init rule.

    Raises:
        ConfigurationError: naming the first such tensor and its module's class.
    """
    rule = init_rule(net)
    for name, module in net.named_modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_meta:
                continue
            fqn = f"{name}.{attr}" if name else attr
            if source is not None and fqn in source:
                continue
            if rule is None and not callable(getattr(module, "reset_parameters", None)):
                raise ConfigurationError(
                    f"{path + '.' if path else ''}{fqn} ({type(module).__name__}) was built on the meta device (empty_init=True) but has no "
                    "weight source (pretrained safetensors) and its module no reset_parameters(); give the module "
                    "a reset_parameters(), load pretrained weights, or build the model without empty_init."
                )


def local_box(tensor: Tensor, full_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(local_shape, global_offset)`` of this rank's part of a DTensor (``None``: the whole tensor)."""
    mesh = getattr(tensor, "device_mesh", None)
    if mesh is None:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(torch.Size(full_shape), mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def _slice(full: Tensor, box: tuple[tuple[int, ...], tuple[int, ...]] | None) -> Tensor:
    if box is None:
        return full
    shape, offset = box
    return full[tuple(slice(o, o + s) for s, o in zip(shape, offset, strict=True))]


def _full_values(origin: _Origin, seed: int, rule: Callable[[nn.Module], None] | None) -> dict[str, Tensor]:
    """Run the canonical module's initialization on full-size CPU tensors (this module only)."""
    module = origin.module
    # Same class (init rules dispatch on it), own tensor dicts, no children. Not copy.copy: FSDP2's module
    # classes run __init__ again in __new__.
    shadow = object.__new__(type(module))
    shadow.__dict__.update(module.__dict__)
    shadow._modules = {}
    shadow._parameters = {n: None if t is None else nn.Parameter(_unset(t), requires_grad=t.requires_grad)
                          for n, t in module._parameters.items()}
    shadow._buffers = {n: None if t is None else _unset(t) for n, t in module._buffers.items()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(module_seed(seed, origin.module_name))
        if rule is not None:
            rule(shadow)
        else:
            shadow.reset_parameters()
    return {**{n: p.data for n, p in shadow._parameters.items() if p is not None},
            **{n: b for n, b in shadow._buffers.items() if b is not None}}


def _unset(tensor: Tensor) -> Tensor:
    """A full-size tensor marked as not yet initialized (NaN, or the smallest integer)."""
    shape = _shape(tensor)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=tensor.dtype)
    if tensor.dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.full(shape, torch.iinfo(tensor.dtype).min, dtype=tensor.dtype)


def _is_unset(value: Tensor) -> bool:
    if value.numel() == 0 or value.dtype == torch.bool:
        return False
    if value.dtype.is_floating_point or value.dtype.is_complex:
        return bool(torch.isnan(value).all())
    return bool((value == torch.iinfo(value.dtype).min).all())


def _shape(tensor: Tensor) -> tuple[int, ...]:
    full = getattr(tensor, "shape", None)
    return tuple(full) if full is not None else ()


@torch.no_grad()
def materialize(net: nn.Module, origins: MetaOrigins, device: torch.device, seed: int,
                source: SafetensorsSource | None = None) -> int:
    """Allocate and fill this rank's shards of the meta tensors of ``net``; returns the bytes allocated.

    Tensors found in ``source`` are read slice by slice; the others are initialized by their canonical
    module's rule under ``module_seed(seed, module name)``.

    Raises:
        ConfigurationError: the rule leaves a tensor unset (it would train on uninitialized memory), or a source
            tensor's shape does not match the model.
    """
    meta = {fqn: t for fqn, t in [*net.named_parameters(remove_duplicate=False),
                                   *net.named_buffers(remove_duplicate=False)] if t.is_meta}
    if not meta:
        return 0
    for module in net.modules():  # only modules holding meta tensors themselves: others keep their data
        if any(t is not None and t.is_meta for t in [*module._parameters.values(), *module._buffers.values()]):
            module.to_empty(device=device, recurse=False)
    rule = init_rule(net)
    live = dict([*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)])
    cache: dict[str, dict[str, Tensor]] = {}
    allocated = 0
    done: set[int] = set()
    for fqn in meta:
        tensor = live[fqn]
        if id(tensor) in done:
            continue
        done.add(id(tensor))
        origin = origins.origins[fqn]
        canonical = f"{origin.module_name}.{origin.attr}" if origin.module_name else origin.attr
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        box = local_box(tensor, origin.shape)
        if source is not None and canonical in source:
            value = source.read(canonical, box)
        else:
            if origin.module_name not in cache:
                cache = {origin.module_name: _full_values(origin, seed, rule)}  # one module's full tensors at a time
            full = cache[origin.module_name][origin.attr]
            if _is_unset(full):  # never silently train on uninitialized memory
                raise ConfigurationError(
                    f"{canonical} ({type(origin.module).__name__}) was built on the meta device and its "
                    f"initialization ({'_init_weights' if rule is not None else 'reset_parameters'}) does not set "
                    "it; load pretrained weights that contain it, or build the model without empty_init."
                )
            value = _slice(full, box)
        if tuple(value.shape) != tuple(local.shape):
            raise ConfigurationError(
                f"{fqn}: the weight source gives shape {tuple(value.shape)} for this rank's shard of shape "
                f"{tuple(local.shape)} (full {origin.shape}); the checkpoint does not match the model config."
            )
        local.copy_(value.to(dtype=local.dtype))
        allocated += local.numel() * local.element_size()
    return allocated
