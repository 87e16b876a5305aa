"""The compressor base class: warm-up, small-bucket bypass, byte accounting, checkpointable state.

A compressor averages a bucket of gradient tensors across a process group *in place*
(:meth:`Compressor.reduce_`). Subclasses implement only the compressed exchange; this class handles
the plain all-reduce of the warm-up steps and of small buckets, the error-feedback memory, and the
accounting of the payload bytes this rank actually hands to collectives.

Every rank computes the average from the same exchanged payloads in the same order, so replicas stay
bit-identical whatever the compressor.
"""

# No ``from __future__ import annotations``: DDP compares the hook's annotations with the real types.
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression.exchange import ExchangeQueue

__all__ = ["CommStats", "Compressor", "DDPHookState", "NoCompression"]


@dataclass
class CommStats:
    """Communication of one rank since the last :meth:`Compressor.pop_stats`.

    Attributes:
        bytes_sent: payload bytes this rank handed to collectives, summed from the tensors themselves.
        bytes_uncompressed: bytes an exact all-reduce of the same gradients would have handed over.
        time_s: wall seconds spent in :meth:`Compressor.reduce_` (compress, communicate, decompress).
        calls: number of :meth:`Compressor.reduce_` calls.
    """

    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    time_s: float = 0.0
    calls: int = 0

    @property
    def compression_ratio(self) -> float:
        """``bytes_uncompressed / bytes_sent`` (``nan`` before anything was sent)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else float("nan")


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{owner}({name}={value!r}): {name} must be an integer >= {minimum}.")


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """A new 1-d tensor of ``dtype`` holding every tensor's elements, in order."""
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def copy_back(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Write consecutive slices of ``flat`` into ``tensors`` (casting to their dtype)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate the raw bytes of ``tensors`` into one ``uint8`` tensor (one collective, not several).

    Put tensors of larger element size first so that :func:`unpack` can view every slice in place.
    """
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(payload: Tensor, specs: Sequence[tuple[torch.dtype, int]]) -> list[Tensor]:
    """Split a :func:`pack` payload back into tensors of the given ``(dtype, numel)``."""
    out, offset = [], 0
    for dtype, numel in specs:
        size = numel * torch.empty((), dtype=dtype).element_size()
        out.append(payload[offset : offset + size].view(dtype))
        offset += size
    return out


def private_group(group: ProcessGroup | None, owner: str) -> ProcessGroup:
    """A new process group with the ranks of ``group`` (``None``: the world), for a thread of its own.

    ``dist.new_group`` is collective over the whole world, so only a world-sized ``group`` can be copied
    here without knowing the other ranks' groups.

    Raises:
        ConfigurationError: ``group`` is a subgroup.
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if len(ranks) != dist.get_world_size():
        raise ConfigurationError(
            f"{owner}: an asynchronous exchange on the subgroup {ranks} needs a process group of its own; pass "
            f"exchange_group=dist.new_group({ranks}) (created on every rank, in the same order), or blocking=True."
        )
    return dist.new_group(ranks)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Compressor(ABC):
    """Averages gradient buckets across a process group, compressed after a warm-up.

    Subclasses set :attr:`name` (the registry name), extend :attr:`hparams` (the constructor arguments
    that define the configuration a checkpoint must match) and implement :meth:`_reduce_compressed`.
    A compressor never stores a process group (:meth:`reduce_` receives it), so it pickles as it is;
    :class:`DDPHookState`, which holds DDP's group, leaves the group out when pickled.

    Args:
        warmup_steps: optimizer steps (counted by :meth:`step`) that use a plain all-reduce first.
        min_compress_numel: buckets with fewer elements are all-reduced uncompressed.

    Raises:
        ConfigurationError: a negative ``warmup_steps`` or ``min_compress_numel``.
    """

    name: ClassVar[str]
    hparams: ClassVar[tuple[str, ...]] = ("warmup_steps", "min_compress_numel")

    def __init__(self, warmup_steps: int = 0, min_compress_numel: int = 0) -> None:
        check_int(type(self).__name__, "warmup_steps", warmup_steps, 0)
        check_int(type(self).__name__, "min_compress_numel", min_compress_numel, 0)
        # Hyper-parameters.
        self.warmup_steps = warmup_steps
        self.min_compress_numel = min_compress_numel
        # Internal state: optimizer steps taken, per-bucket memory (error feedback, warm starts).
        self.step_count = 0
        self.stats = CommStats()
        self._memory: dict[str, Tensor] = {}
        # The thread asynchronous exchanges run on (started by the first reduce_async_; not pickled).
        self._exchanges: ExchangeQueue | None = None

    # -- the interface strategies call ---------------------------------------------------------------
    @torch.no_grad()
    def reduce_(self, key: str, tensors: list[Tensor], group: ProcessGroup | None = None) -> None:
        """Average ``tensors`` in place across ``group`` (the default group when ``None``).

        Args:
            key: identifies the bucket; error-feedback memory is kept per key, so pass the same key
                for the same tensors at every step.
            tensors: this rank's gradients (any shapes; same shapes on every rank).
            group: the data-parallel process group.
        """
        if not tensors:
            return
        start = time.perf_counter()
        self.stats.bytes_uncompressed += sum(_nbytes(t) for t in tensors)
        numel = sum(t.numel() for t in tensors)
        if self.step_count < self.warmup_steps or numel < self.min_compress_numel:
            self._exact_average(tensors, group)
        else:
            self._reduce_compressed(key, tensors, group)
        self.stats.time_s += time.perf_counter() - start
        self.stats.calls += 1

    def reduce_async_(self, key: str, tensors: list[Tensor],
                      group: ProcessGroup | None = None) -> torch.futures.Future[list[Tensor]]:
        """:meth:`reduce_` without waiting: returns at once, the future completes with ``tensors`` averaged.

        Exchanges run one at a time, in the order they were submitted, on a thread of this compressor's
        own (:mod:`~lit_parallel.parallel.compression.exchange` explains why not ``Future.then``), so the
        results, the error-feedback memory and the bytes are those of calling :meth:`reduce_` in the same
        order. Do not touch ``tensors`` or issue other collectives on ``group`` until the future completes.
        """
        if self._exchanges is None:
            self._exchanges = ExchangeQueue(f"{self.name}-exchange")

        def exchange() -> list[Tensor]:
            self.reduce_(key, tensors, group)
            return tensors

        return self._exchanges.submit(exchange, tensors[0].device if tensors else None)

    def wait(self) -> None:
        """Wait for the exchanges :meth:`reduce_async_` started (the memory is final afterwards)."""
        if self._exchanges is not None:
            self._exchanges.drain()

    def close(self) -> None:
        """Finish the asynchronous exchanges and stop their thread (the next one starts it again)."""
        if self._exchanges is not None:
            self._exchanges.close()
            self._exchanges = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_exchanges"] = None  # a thread does not pickle; the copy starts its own when needed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_exchanges": None, **state})  # pickles from before asynchronous exchanges

    def step(self) -> None:
        """Count one optimizer step (ends the warm-up after ``warmup_steps`` calls)."""
        self.step_count += 1

    def pop_stats(self) -> CommStats:
        """Return the communication statistics gathered so far and start new ones."""
        stats, self.stats = self.stats, CommStats()
        return stats

    @property
    def compressing(self) -> bool:
        """Whether this compressor sends anything but a plain all-reduce after its warm-up."""
        return True

    def config(self) -> dict[str, Any]:
        """The hyper-parameters, as passed to the constructor."""
        return {name: getattr(self, name) for name in self.hparams}

    def setup_groups(self, group_ranks: list[list[int]]) -> None:
        """Create the process groups this compressor needs besides the data-parallel group (default: none).

        ``new_group`` is collective over the default group, so a strategy calls this once on *every* rank,
        after ``init_process_group`` and before the first :meth:`reduce_`, with the global ranks of every
        data-parallel group in the same order on every rank; the compressor keeps the groups of its own.

        Args:
            group_ranks: the global ranks of every data-parallel group (``[list(range(world_size))]`` for DDP).

        Example::

            compressor.setup_groups([list(range(dist.get_world_size()))])
        """
        del group_ranks  # the flat exchange runs on the data-parallel group itself

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Type, configuration, step count and memory tensors (on CPU) of this rank."""
        self.wait()
        return {
            "type": type(self).__name__,
            "config": self.config(),
            "step": self.step_count,
            "memory": {k: v.detach().cpu().clone() for k, v in self._memory.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ConfigurationError: the state comes from another compressor type or configuration.
        """
        self.wait()
        saved = f"{state.get('type')}({', '.join(f'{k}={v!r}' for k, v in state.get('config', {}).items())})"
        if state.get("type") != type(self).__name__ or state.get("config") != self.config():
            raise ConfigurationError(
                f"the checkpoint's compression state is {saved} but the configured compressor is {self!r}; "
                f"configure {saved} to resume, or start without the checkpoint's compression state."
            )
        self.step_count = int(state["step"])
        self._memory = dict(state["memory"])

    # -- DDP ----------------------------------------------------------------------------------------
    def ddp_comm_hook(
        self, module: nn.Module | None = None, group: ProcessGroup | None = None, blocking: bool = False,
        exchange_group: ProcessGroup | None = None,
    ) -> "tuple[DDPHookState, Callable[[DDPHookState, dist.GradBucket], torch.futures.Future[Tensor]]]":
        """``(state, hook)`` for :meth:`DistributedDataParallel.register_comm_hook`.

        The hook returns as soon as it has queued the bucket's exchange (:meth:`reduce_async_`), so DDP
        overlaps bucket *k*'s compression and collectives with the backward of the layers before it; the
        future DDP waits on completes when the exchange has. ``blocking=True`` runs the exchange inside the
        hook instead (the same numbers, bit for bit; kept for comparison and debugging).

        Args:
            module: the module DDP wraps. When given, a bucket's memory is keyed by its parameters'
                positions in ``module.parameters()`` and its gradients are compressed in that order, so
                the memory survives DDP's bucket rebuild after the first step and a resume from a
                checkpoint. Without it, memory is keyed by bucket index.
            group: DDP's process group (``None``: the default group).
            blocking: exchange inside the hook, on the autograd thread, before returning.
            exchange_group: the process group the asynchronous exchanges run on, with ``group``'s ranks.
                They run on a thread of their own, so they need a group that the training thread does not
                use meanwhile (SyncBatchNorm's backward all-reduces on DDP's group). ``None``: a new group
                made here, which every rank calls at the same point; for a ``group`` that is not the whole
                world, pass one made with ``dist.new_group`` on every rank.

        Raises:
            ConfigurationError: an asynchronous hook on a subgroup without ``exchange_group``.

        Example::

            ddp = DistributedDataParallel(model)
            ddp.register_comm_hook(*PowerSGD(rank=4).ddp_comm_hook(model))
        """
        index = None if module is None else {id(p): i for i, p in enumerate(module.parameters())}
        if not blocking and exchange_group is None and dist.is_initialized() and not isinstance(self, NoCompression):
            exchange_group = private_group(group, "ddp_comm_hook")
        return DDPHookState(self, group, index, blocking, exchange_group), _ddp_hook

    # -- for subclasses -----------------------------------------------------------------------------
    @abstractmethod
    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        """Average ``tensors`` in place with compression (called after the warm-up)."""

    def _exact_average(self, tensors: Sequence[Tensor], group: ProcessGroup | None) -> None:
        # Divide before summing, as DDP's own reducer does, so the result matches plain DDP bit for bit.
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = flatten(tensors, dtype).div_(dist.get_world_size(group))
        self._all_reduce(flat, group)
        copy_back(flat, tensors)

    def _all_reduce(self, tensor: Tensor, group: ProcessGroup | None) -> None:
        self.stats.bytes_sent += _nbytes(tensor)
        dist.all_reduce(tensor, group=group)

    def _all_gather(self, tensor: Tensor, group: ProcessGroup | None) -> list[Tensor]:
        self.stats.bytes_sent += _nbytes(tensor)
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return gathered

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        """The memory tensor ``name`` (zeros shaped like ``like`` when new), on ``like``'s device."""
        buf = self._memory.get(name)
        if buf is None or buf.shape != like.shape:
            buf = torch.zeros_like(like)
        elif buf.device != like.device or buf.dtype != like.dtype:
            buf = buf.to(device=like.device, dtype=like.dtype)
        self._memory[name] = buf
        return buf


class NoCompression(Compressor):
    """A plain averaging all-reduce with byte accounting: what uncompressed DDP sends.

    Example::

        compressor = NoCompression()
        compressor.reduce_("grads", [weight.grad, bias.grad], group=None)
        compressor.pop_stats().bytes_sent  # 4 bytes per fp32 element
    """

    name = "none"

    @property
    def compressing(self) -> bool:
        return False

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        self._exact_average(tensors, group)

    def all_reduce_async_(self, buffer: Tensor, group: ProcessGroup | None) -> torch.futures.Future[Tensor]:
        """Average a contiguous ``buffer`` in place without blocking, as DDP's own all-reduce does.

        ``time_s`` then counts from issuing the all-reduce to its completion.
        """
        start = time.perf_counter()
        self.stats.bytes_uncompressed += _nbytes(buffer)
        self.stats.calls += 1
        buffer.div_(dist.get_world_size(group))
        self.stats.bytes_sent += _nbytes(buffer)
        work = dist.all_reduce(buffer, group=group, async_op=True)

        def finish(future: torch.futures.Future[list[Tensor]]) -> Tensor:
            self.stats.time_s += time.perf_counter() - start
            return future.value()[0]

        return work.get_future().then(finish)


class DDPHookState:
    """State handed to :func:`_ddp_hook`: the compressor, DDP's group and the parameter positions.

    Pickles without the process group (like torch's ``PowerSGDState``) so it can be checkpointed.
    """

    __slots__ = ("blocking", "compressor", "exchange_group", "param_index", "process_group")

    def __init__(self, compressor: Compressor, process_group: ProcessGroup | None,
                 param_index: dict[int, int] | None, blocking: bool = False,
                 exchange_group: ProcessGroup | None = None) -> None:
        self.compressor = compressor
        self.process_group = process_group
        self.param_index = param_index
        self.blocking = blocking
        self.exchange_group = exchange_group if exchange_group is not None else process_group

    def __getstate__(self) -> dict[str, Any]:
        # Parameter ids are meaningless in another process; the index is rebuilt with the hook.
        return {"compressor": self.compressor, "blocking": self.blocking}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.compressor, self.process_group, self.param_index = state["compressor"], None, None
        self.blocking, self.exchange_group = state.get("blocking", False), None


def _ddp_hook(state: DDPHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    if isinstance(state.compressor, NoCompression):
        # Asynchronous, so that plain DDP keeps overlapping communication with the backward pass.
        return state.compressor.all_reduce_async_(bucket.buffer(), state.process_group)
    # bucket.gradients() are views into bucket.buffer(): averaging them in place fills the buffer.
    grads = bucket.gradients()
    if state.param_index is None:
        key, ordered = f"ddp:bucket{bucket.index()}", grads
    else:
        positions = [state.param_index[id(p)] for p in bucket.parameters()]
        order = sorted(range(len(grads)), key=positions.__getitem__)
        digest = hashlib.sha1(",".join(str(positions[j]) for j in order).encode()).hexdigest()[:12]
        key, ordered = f"ddp:params:{digest}", [grads[j] for j in order]
    buffer = bucket.buffer()
    if not state.blocking:
        exchange = state.compressor.reduce_async_(key, ordered, state.exchange_group)
        return exchange.then(lambda done: (done.wait(), buffer)[1])  # wait() re-raises the exchange's error
    state.compressor.reduce_(key, ordered, state.process_group)
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future
