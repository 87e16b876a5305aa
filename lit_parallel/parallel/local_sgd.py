"""Local SGD and DiLoCo in pure torch: replicas train alone and synchronize every ``sync_every`` steps.

:class:`LocalSGDState` averages the parameters of all replicas every ``H`` optimizer steps.
:class:`DiLoCoState` treats the progress of a round as a pseudo-gradient (``global - local``), averages
it across the group (optionally compressed) and applies it to replicated global parameters with an
outer Nesterov SGD (Douillard et al. 2023, "DiLoCo"). With ``overlap=True`` the exchange runs in the
background while the next round trains, and its result is applied one round late. With ``fragments=F``
it is Streaming DiLoCo (Douillard et al. 2025): F parameter fragments synchronize in turn, one every
``sync_every / F`` steps, each exchange overlapped with ``overlap_steps`` inner steps and optionally
quantized (``outer_dtype``).

Lightning glue lives in :mod:`lit_parallel.strategies.local_sgd` and :mod:`lit_parallel.strategies.diloco`.

Example::

    state = DiLoCoState(list(model.parameters()), sync_every=64, outer_lr=0.7)
    for batch in loader:
        loss_fn(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        state.step(list(model.parameters()))    # synchronizes every 64th call

    # Streaming: a quarter of the parameters every 16 steps, applied 2 steps after launch, int8 on the wire.
    state = DiLoCoState(list(model.parameters()), sync_every=64, fragments=4, overlap_steps=2, outer_dtype="int8")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression.base import Compressor, NoCompression, copy_back, flatten
from lit_parallel.parallel.compression.cast import BF16, FP16
from lit_parallel.parallel.compression.int8 import Int8

__all__ = ["OUTER_DTYPES", "THREADED_BACKENDS", "DiLoCo", "DiLoCoState", "LocalSGD", "LocalSGDState", "SyncStats",
           "check_streaming", "check_sync_every", "check_threaded_backend", "is_streaming", "outer_compressor",
           "partition_fragments",
           "resolve_dp_sync"]

# Backends whose collectives may run from DiLoCoState's background thread (a compressed, overlapped exchange).
THREADED_BACKENDS = ("gloo", "nccl")

# Compressor key of the exchanged tensors (error-feedback memory is kept per key).
PARAMS_KEY = "local_sgd:params"
PSEUDO_GRAD_KEY = "diloco:pseudo_grad"


def check_sync_every(owner: str, sync_every: Any) -> None:
    """Raise :class:`ConfigurationError` unless ``sync_every`` is an integer ``>= 1``."""
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ConfigurationError(
            f"{owner}(sync_every={sync_every!r}): sync_every must be an integer >= 1 "
            "(optimizer steps between synchronizations; 1 = every step)."
        )


class LocalSGDState:
    """Averages the parameters of every replica each ``sync_every`` optimizer steps.

    With ``sync_every=1`` and an optimizer whose update is linear in the gradient given identical
    parameters (SGD, with or without momentum and weight decay), this is data-parallel SGD exactly:
    the mean of the replicas' updated parameters is the update with the mean gradient.

    Args:
        sync_every: optimizer steps between two averagings (``H``).
        compressor: averages the parameters in place and counts the bytes; ``None``: the exact,
            byte-counting :class:`~lit_parallel.compression.NoCompression`.

    Raises:
        ConfigurationError: ``sync_every`` is not an integer >= 1.
    """

    __slots__ = (
        # Hyper-parameters.
        "compressor",
        "sync_every",
        # Internal state.
        "steps",
    )

    def __init__(self, sync_every: int = 16, compressor: Compressor | None = None) -> None:
        check_sync_every(type(self).__name__, sync_every)
        self.sync_every = sync_every
        self.compressor: Compressor = compressor if compressor is not None else NoCompression()
        self.steps = 0

    def step(self, params: Sequence[Tensor], group: ProcessGroup | None = None) -> bool:
        """Count one optimizer step; average ``params`` in place when it completes a round.

        Returns:
            Whether this step synchronized.
        """
        self.steps += 1
        if self.steps % self.sync_every:
            return False
        self.sync(params, group)
        return True

    @torch.no_grad()
    def sync(self, params: Sequence[Tensor], group: ProcessGroup | None = None) -> None:
        """Average ``params`` in place across ``group`` now."""
        self.compressor.reduce_(PARAMS_KEY, [p.data for p in params], group)
        self.compressor.step()

    def state_dict(self) -> dict[str, Any]:
        """The step counter (identical on every rank)."""
        return {"type": type(self).__name__, "sync_every": self.sync_every, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (a different ``sync_every`` is allowed: the counter carries over).

        Raises:
            ConfigurationError: the state comes from another algorithm.
        """
        if state.get("type") != type(self).__name__:
            raise ConfigurationError(
                f"the checkpoint holds {state.get('type')} state but the strategy runs {type(self).__name__}; "
                f"resume with the strategy that wrote it."
            )
        self.steps = int(state["steps"])


# Streaming options and their values in DiLoCo (also what a checkpoint without them was written with).
STREAMING_DEFAULTS: dict[str, Any] = {"fragments": 1, "overlap_steps": 0, "fragment_update_alpha": 0.0,
                                      "outer_dtype": None}

# outer_dtype -> the compressor that averages the pseudo-gradient in that dtype. Stateless (Int8 without error
# feedback, as in the paper), so the outer exchange needs no per-rank checkpoint state.
OUTER_DTYPES: dict[str, Callable[[], Compressor]] = {
    "bf16": BF16,
    "fp16": FP16,
    "int8": lambda: Int8(error_feedback=False),
}


def outer_compressor(outer_dtype: str) -> Compressor:
    """The compressor that averages DiLoCo's pseudo-gradient in ``outer_dtype`` (a key of :data:`OUTER_DTYPES`).

    ``"bf16"`` / ``"fp16"``: an all-reduce in that dtype (:class:`~lit_parallel.compression.BF16` /
    ``FP16``, 2x fewer bytes); ``"int8"``: :class:`~lit_parallel.compression.Int8` with one scale per 1024
    elements, all-gathered and summed in rank order (about 4x fewer bytes), without error feedback. Every
    rank computes the same average, so replicas stay bitwise identical.

    Raises:
        ConfigurationError: an unknown ``outer_dtype`` (the message lists the valid ones).

    Example::

        outer_compressor("int8")   # Int8(..., error_feedback=False, ...)
    """
    if outer_dtype not in OUTER_DTYPES:
        raise ConfigurationError(f"outer_dtype={outer_dtype!r} is unknown; valid: None, {sorted(OUTER_DTYPES)}.")
    return OUTER_DTYPES[outer_dtype]()


def resolve_outer_compressor(owner: str, outer_dtype: str | None, compressor: Compressor | None) -> Compressor | None:
    """The compressor of DiLoCo's exchange: ``compressor``, or the one of ``outer_dtype``.

    A strategy builds the ``outer_dtype`` compressor itself (to expose it to ``CommunicationMonitor``) and
    passes it in; an exact :class:`~lit_parallel.compression.NoCompression` is replaced.

    Raises:
        ConfigurationError: ``outer_dtype`` together with a different compressor.
    """
    if outer_dtype is None:
        return compressor
    wanted = outer_compressor(outer_dtype)
    if compressor is None or isinstance(compressor, NoCompression):
        return wanted
    if type(compressor) is not type(wanted) or compressor.config() != wanted.config():
        raise ConfigurationError(
            f"{owner}(outer_dtype={outer_dtype!r}) with compression={compressor!r}: both choose how the "
            f"pseudo-gradient is exchanged; valid: outer_dtype alone, or outer_dtype=None with any compressor."
        )
    return compressor


def check_streaming(owner: str, sync_every: int, overlap: bool, fragments: Any, overlap_steps: Any,
                    fragment_update_alpha: Any, outer_dtype: Any) -> None:
    """Raise :class:`ConfigurationError` unless the Streaming DiLoCo options are valid together.

    ``fragments`` must be an integer >= 1 dividing ``sync_every``; ``overlap_steps`` an integer in
    ``[0, sync_every / fragments)``; ``fragment_update_alpha`` in ``[0, 1)``; ``outer_dtype`` ``None`` or a key
    of :data:`OUTER_DTYPES`; ``overlap=True`` (one-round-late DiLoCo) only with ``fragments=1, overlap_steps=0``.

    Raises:
        ConfigurationError: the first invalid option; the message names it (with ``sync_every`` where the
            rule involves it) and says what is valid.

    Example::

        check_streaming("DiLoCo", 64, False, 4, 2, 0.0, "int8")   # valid: returns None
    """
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
        raise ConfigurationError(f"{owner}(fragments={fragments!r}): fragments must be an integer >= 1 (1 = DiLoCo).")
    if sync_every % fragments:
        divisors = [d for d in range(1, sync_every + 1) if sync_every % d == 0]
        raise ConfigurationError(
            f"{owner}(fragments={fragments}, sync_every={sync_every}): fragments must divide sync_every (one "
            f"fragment synchronizes every sync_every / fragments steps); valid fragments for sync_every="
            f"{sync_every}: {divisors}."
        )
    interval = sync_every // fragments
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or not 0 <= overlap_steps < interval:
        raise ConfigurationError(
            f"{owner}(overlap_steps={overlap_steps!r}, sync_every={sync_every}, fragments={fragments}): "
            f"overlap_steps must be an integer in [0, sync_every / fragments) = [0, {interval}) (an exchange is "
            "applied before the next fragment's starts)."
        )
    if (isinstance(fragment_update_alpha, bool) or not isinstance(fragment_update_alpha, int | float)
            or not 0 <= fragment_update_alpha < 1):
        raise ConfigurationError(
            f"{owner}(fragment_update_alpha={fragment_update_alpha!r}): fragment_update_alpha must be in [0, 1) "
            "(0: a fragment takes the new global parameters)."
        )
    if outer_dtype is not None and outer_dtype not in OUTER_DTYPES:
        raise ConfigurationError(f"{owner}(outer_dtype={outer_dtype!r}) is unknown; valid: None, {sorted(OUTER_DTYPES)}.")
    if overlap and (fragments > 1 or overlap_steps):
        raise ConfigurationError(
            f"{owner}(overlap=True, fragments={fragments}, overlap_steps={overlap_steps}): overlap=True is "
            "one-round-late DiLoCo; Streaming DiLoCo overlaps with overlap_steps instead. Valid: overlap=True with "
            "fragments=1 and overlap_steps=0, or overlap=False."
        )


def is_streaming(fragments: int, overlap_steps: int, fragment_update_alpha: float) -> bool:
    """Whether replicas never hold identical parameters at one step boundary (Streaming DiLoCo's settings).

    Fragments synchronize at different steps; with ``overlap_steps`` or a merge (``fragment_update_alpha``) a
    fragment is set to the global values only after local steps went on.
    """
    return fragments > 1 or overlap_steps > 0 or fragment_update_alpha > 0


Piece = tuple[int, int, int]
"""``(parameter index, first element, end element)`` of a parameter's flattened elements."""


def partition_fragments(numels: Sequence[int], fragments: int) -> list[list[Piece]]:
    """Cut a parameter list into ``fragments`` runs of (almost exactly) equal element count.

    The parameters are laid end to end; fragment ``i`` holds elements ``[i * N / F, (i + 1) * N / F)``
    (rounded down), so a parameter that straddles a boundary is split between two fragments. Cutting at
    element rather than parameter boundaries is what bounds a sync's bytes by ``1 / F`` of the model: one
    tensor is often a large part of it (MiniLM's word embeddings 52 %, the MNIST CNN's first Linear 97 %).
    A function of the shapes only, so every replica (same shapes) cuts the same way.

    Args:
        numels: the element count of each parameter, in order.
        fragments: the number of runs.

    Returns:
        per fragment, its pieces ``(parameter index, start, stop)`` in parameter order.

    Raises:
        ConfigurationError: fewer elements than ``fragments``.

    Example::

        partition_fragments([100, 10, 100, 10], 2)   # [[(0, 0, 100), (1, 0, 10)], [(2, 0, 100), (3, 0, 10)]]
        partition_fragments([300, 100], 2)           # [[(0, 0, 200)], [(0, 200, 300), (1, 0, 100)]]
    """
    total = sum(numels)
    if total < fragments:
        raise ConfigurationError(
            f"fragments={fragments} needs at least {fragments} parameter elements, but this rank has {total}; "
            f"valid: fragments <= {max(1, total)}."
        )
    cuts = [total * i // fragments for i in range(fragments + 1)]
    pieces: list[list[Piece]] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        fragment, offset = [], 0
        for index, n in enumerate(numels):
            a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
            if a < b:
                fragment.append((index, a, b))
            offset += n
        pieces.append(fragment)
    return pieces


def _piece(tensor: Tensor, piece: Piece) -> Tensor:
    """The piece's elements of ``tensor``: the tensor itself when whole (compressors keep its shape), else a
    1-d view."""
    _, start, stop = piece
    if start == 0 and stop == tensor.numel():
        return tensor
    return tensor.view(-1)[start:stop]  # a view: parameters and the state's copies are contiguous


@dataclass
class SyncStats:
    """Bytes of DiLoCo's pseudo-gradient exchanges on one rank (not checkpointed).

    One *sync* is one exchange: all parameters in DiLoCo, one fragment in Streaming DiLoCo. The bytes are
    the compressor's ``CommStats.bytes_sent`` of that exchange, recorded when its result is collected.

    Attributes:
        syncs: exchanges collected.
        total_bytes: bytes this rank handed to collectives over all of them.
        peak_bytes: the most bytes one exchange sent (what the link must carry at once).
        last_bytes: bytes of the latest exchange.

    Example::

        state = DiLoCoState(params, sync_every=64, fragments=4)
        ...                                   # train; state.step(params, group) after every optimizer step
        state.close()                         # the exchange in flight is collected (and counted) too
        print(state.sync_stats.peak_bytes, state.sync_stats.total_bytes)
    """

    syncs: int = 0
    total_bytes: int = 0
    peak_bytes: int = 0
    last_bytes: int = 0

    def record(self, nbytes: int) -> None:
        """Count one exchange of ``nbytes`` bytes."""
        self.syncs += 1
        self.total_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, nbytes)
        self.last_bytes = nbytes


class _Exchange:
    """One pseudo-gradient exchange of a fragment: done, in flight (async all-reduce or thread), or restored."""

    __slots__ = ("_flat_into", "_future", "fragment", "nbytes", "result")

    def __init__(self, fragment: int, result: list[Tensor] | None = None, nbytes: int | None = None,
                 future: Future[tuple[list[Tensor], int]] | torch.futures.Future[Tensor] | None = None,
                 flat_into: list[Tensor] | None = None) -> None:
        self.fragment, self.result, self.nbytes = fragment, result, nbytes
        self._future, self._flat_into = future, flat_into

    def resolve(self, stats: SyncStats) -> list[Tensor]:
        """Wait for the averaged pseudo-gradients; the first call records the exchange's bytes in ``stats``."""
        if self._future is not None:
            future, self._future = self._future, None
            if isinstance(future, Future):  # a compressor's exchange in the background thread
                self.result, self.nbytes = future.result()
            else:  # an asynchronous all-reduce of one flat buffer
                assert self._flat_into is not None
                copy_back(future.wait(), self._flat_into)
                self.result, self._flat_into = self._flat_into, None
        if self.nbytes is not None:  # None: recorded already, or restored from a checkpoint
            stats.record(self.nbytes)
            self.nbytes = None
        assert self.result is not None
        return self.result


def _bytes_of(compressor: Compressor, run: Callable[[], Any]) -> int:
    """Bytes ``compressor`` sends while ``run()`` runs (a concurrent ``pop_stats`` moves them to a new object)."""
    stats = compressor.stats
    before = stats.bytes_sent
    run()
    now = compressor.stats
    return now.bytes_sent - before if now is stats else stats.bytes_sent - before + now.bytes_sent


class DiLoCoState(LocalSGDState):
    """DiLoCo's outer optimizer: replicated global parameters, outer momentum, delayed exchange.

    Every ``sync_every`` inner steps (a *round*), each replica computes the pseudo-gradient
    ``delta = global - local``; the replicas average it (through ``compressor``), the outer SGD applies
    it to the global parameters (``momentum = outer_momentum * momentum + delta``; Nesterov:
    ``global -= outer_lr * (delta + outer_momentum * momentum)``, else ``global -= outer_lr * momentum``)
    and every replica restarts from the new global parameters. ``outer_lr=1, outer_momentum=0`` is
    :class:`LocalSGDState`.

    With ``overlap=True`` the round's averaging is only *launched* at the end of the round (an
    asynchronous all-reduce without compression, a background thread with one), every replica restarts
    from the current global parameters at once, and the averaged pseudo-gradient is applied at the end of
    the *next* round (one-step-delayed DiLoCo): no rank waits on the network unless one round of inner
    steps is shorter than the exchange.

    **Streaming DiLoCo** (Douillard et al. 2025): with ``fragments=F`` the parameters, laid end to end, are
    cut into ``F`` runs of equal element count (:func:`partition_fragments`; a tensor may be split). Each fragment still
    synchronizes once per round, but staggered: fragment ``f`` at steps ``k * sync_every + (f + 1) *
    sync_every / F``, so one fragment's pseudo-gradient crosses the network every ``sync_every / F`` steps
    and the peak bytes of one exchange fall ``F``-fold. With ``overlap_steps=τ`` the exchange is launched
    at the fragment's sync step and its result applied ``τ`` inner steps later, while those steps run: the
    outer step updates the fragment's global parameters and the fragment's local parameters become
    ``alpha * local + (1 - alpha) * global`` (``alpha = fragment_update_alpha``; 0: the global ones).
    ``outer_dtype`` quantizes the exchanged pseudo-gradient. ``fragments=1, overlap_steps=0`` is DiLoCo.

    Args:
        params: the model parameters; the global parameters start as a copy.
        sync_every: inner optimizer steps per round (``H``).
        outer_lr: outer learning rate (DiLoCo: 0.7).
        outer_momentum: outer momentum (DiLoCo: 0.9).
        nesterov: Nesterov momentum for the outer step.
        overlap: exchange the pseudo-gradient in the background and apply it one round late (not with
            ``fragments > 1`` or ``overlap_steps > 0``, Streaming DiLoCo's own overlap).
        compressor: averages the pseudo-gradient; its warm-up counts exchanges. ``None``: exact all-reduce.
        fragments: parameter fragments synchronized in turn (``F``, a divisor of ``sync_every``).
        overlap_steps: inner steps between launching a fragment's exchange and applying it (``τ``,
            ``0 <= τ < sync_every / fragments``).
        fragment_update_alpha: weight of the local parameters when a fragment is set to the new global
            ones, in ``[0, 1)``.
        outer_dtype: ``None`` (the compressor's exchange), or ``"bf16"`` / ``"fp16"`` / ``"int8"``: the
            pseudo-gradient is averaged in that dtype (:func:`outer_compressor`; no error feedback).

    Raises:
        ConfigurationError: ``sync_every < 1``, ``outer_lr <= 0``, ``outer_momentum`` outside ``[0, 1)``,
            an invalid streaming option (:func:`check_streaming`), ``outer_dtype`` together with another
            compressor, or fewer parameters than ``fragments``.

    Example::

        state = DiLoCoState(list(model.parameters()), sync_every=64, fragments=4, overlap_steps=2,
                            outer_dtype="int8")
        for batch in loader:
            loss_fn(model(batch)).backward()
            optimizer.step()
            optimizer.zero_grad()
            state.step(list(model.parameters()), group)   # one fragment every 16 steps
        state.sync_stats.peak_bytes, state.sync_stats.total_bytes
    """

    __slots__ = (
        # Hyper-parameters.
        "fragment_update_alpha",
        "fragments",
        "nesterov",
        "outer_dtype",
        "outer_lr",
        "outer_momentum",
        "overlap",
        "overlap_steps",
        # Internal state: replicated global parameters, outer momentum, rounds, the exchange in flight,
        # the fragments' parameter ranges, byte counts.
        "_pieces",
        "_executor",
        "_pending",
        "global_params",
        "momentum",
        "rounds",
        "sync_stats",
    )

    def __init__(
        self,
        params: Sequence[Tensor],
        sync_every: int = 64,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        overlap: bool = False,
        compressor: Compressor | None = None,
        fragments: int = 1,
        overlap_steps: int = 0,
        fragment_update_alpha: float = 0.0,
        outer_dtype: str | None = None,
    ) -> None:
        owner = type(self).__name__
        check_sync_every(owner, sync_every)
        check_outer(owner, outer_lr, outer_momentum)
        check_streaming(owner, sync_every, overlap, fragments, overlap_steps, fragment_update_alpha, outer_dtype)
        super().__init__(sync_every, resolve_outer_compressor(owner, outer_dtype, compressor))
        self.outer_lr, self.outer_momentum, self.nesterov, self.overlap = outer_lr, outer_momentum, nesterov, overlap
        self.fragments, self.overlap_steps = fragments, overlap_steps
        self.fragment_update_alpha, self.outer_dtype = float(fragment_update_alpha), outer_dtype
        self._pieces = partition_fragments([p.numel() for p in params], fragments)
        self.global_params = [p.detach().clone() for p in params]
        self.momentum = [torch.zeros_like(p) for p in self.global_params]
        self.rounds = 0
        self.sync_stats = SyncStats()
        self._pending: _Exchange | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def fragment_pieces(self) -> list[list[Piece]]:
        """Per fragment, its ``(parameter index, start, stop)`` element ranges (:func:`partition_fragments`)."""
        return [list(f) for f in self._pieces]

    def reset_global(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` (identical on every rank, e.g. after a broadcast) the global parameters."""
        for g, p in zip(self.global_params, params, strict=True):
            g.copy_(p.detach())

    def step(self, params: Sequence[Tensor], group: ProcessGroup | None = None) -> bool:
        """Count one inner step; launch or apply an exchange when one is due.

        Returns:
            Whether every parameter is now identical across the replicas (a whole-model synchronization
            just completed; never with ``fragments > 1`` or ``fragment_update_alpha > 0``).
        """
        if self.overlap:  # one-round-late DiLoCo: one exchange of everything per round
            return super().step(params, group)
        self.steps += 1
        interval = self.sync_every // self.fragments
        complete = False
        if self._pending is not None and self.steps % interval == self.overlap_steps:
            complete = self._finish(params)
        if self.steps % interval == 0:
            self._start((self.steps // interval - 1) % self.fragments, params, group)
            if self.overlap_steps == 0:
                complete = self._finish(params)
        return complete

    @torch.no_grad()
    def sync(self, params: Sequence[Tensor], group: ProcessGroup | None = None) -> None:
        """End a round of one-round-late DiLoCo (``overlap=True``) or of DiLoCo (``fragments=1``, no
        ``overlap_steps``): exchange the pseudo-gradient, step the outer optimizer, reset ``params``.

        Raises:
            ConfigurationError: a streaming state (``fragments > 1`` or ``overlap_steps > 0``): its
                fragments synchronize in :meth:`step`.
        """
        if not self.overlap:
            if self.fragments > 1 or self.overlap_steps:
                raise ConfigurationError(
                    f"DiLoCoState.sync() synchronizes every parameter at once, which a streaming state "
                    f"(fragments={self.fragments}, overlap_steps={self.overlap_steps}) never does; call step()."
                )
            self._start(0, params, group)
            self._finish(params)
            return
        deltas = [g - p.detach() for g, p in zip(self.global_params, params, strict=True)]
        if self._pending is not None:
            self._outer_step(self._pending.resolve(self.sync_stats))
            self._pending = None
        self._pending = self._launch(0, deltas, group, PSEUDO_GRAD_KEY)
        self.compressor.step()
        self.rounds += 1
        for p, g in zip(params, self.global_params, strict=True):
            p.data.copy_(g)

    def wait(self) -> None:
        """Finish the exchange in flight (if any), keeping its result until it is applied."""
        if self._pending is not None:
            self._pending.resolve(self.sync_stats)

    def close(self) -> None:
        """Finish the exchange in flight and stop the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    @torch.no_grad()
    def _start(self, fragment: int, params: Sequence[Tensor], group: ProcessGroup | None) -> None:
        """Compute a fragment's pseudo-gradient and exchange it: at once (``overlap_steps=0``) or launched."""
        assert len(params) == len(self.global_params), (len(params), len(self.global_params))
        deltas = [_piece(self.global_params[piece[0]], piece) - _piece(params[piece[0]].detach(), piece)
                  for piece in self._pieces[fragment]]
        # One key per fragment: a compressor's memory (error feedback, warm starts) is per exchanged bucket.
        key = PSEUDO_GRAD_KEY if self.fragments == 1 else f"{PSEUDO_GRAD_KEY}:{fragment}"
        if self.overlap_steps == 0:
            nbytes = _bytes_of(self.compressor, lambda: self.compressor.reduce_(key, deltas, group))
            self._pending = _Exchange(fragment, result=deltas, nbytes=nbytes)
        else:
            self._pending = self._launch(fragment, deltas, group, key)

    @torch.no_grad()
    def _finish(self, params: Sequence[Tensor]) -> bool:
        """Apply the exchange: outer step on its fragment, then the fragment's local parameters."""
        exchange, self._pending = self._pending, None
        assert exchange is not None
        pieces = self._pieces[exchange.fragment]
        self._outer_step(exchange.resolve(self.sync_stats), pieces)
        # After the exchange, so that a background exchange never races with the warm-up's step count.
        self.compressor.step()
        if exchange.fragment == self.fragments - 1:
            self.rounds += 1
        alpha = self.fragment_update_alpha
        for piece in pieces:
            p, g = _piece(params[piece[0]].data, piece), _piece(self.global_params[piece[0]], piece)
            if alpha:
                p.mul_(alpha).add_(g, alpha=1 - alpha)
            else:
                p.copy_(g)
        return self.fragments == 1 and not alpha

    def _launch(self, fragment: int, deltas: list[Tensor], group: ProcessGroup | None, key: str) -> _Exchange:
        if isinstance(self.compressor, NoCompression):
            flat = flatten(deltas, deltas[0].dtype)
            future = self.compressor.all_reduce_async_(flat, group)  # counts these bytes, as below
            return _Exchange(fragment, nbytes=flat.numel() * flat.element_size(), future=future,
                             flat_into=[torch.empty_like(d) for d in deltas])
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange")

        def exchange() -> tuple[list[Tensor], int]:
            if deltas[0].is_cuda:  # the current CUDA device is per thread
                torch.cuda.set_device(deltas[0].device)
            return deltas, _bytes_of(self.compressor, lambda: self.compressor.reduce_(key, deltas, group))

        return _Exchange(fragment, future=self._executor.submit(exchange))

    def _outer_step(self, deltas: Sequence[Tensor], pieces: Sequence[Piece] | None = None) -> None:
        mu = self.outer_momentum
        if pieces is None:  # every parameter, whole
            pieces = [(i, 0, g.numel()) for i, g in enumerate(self.global_params)]
        for piece, d in zip(pieces, deltas, strict=True):
            g, m = _piece(self.global_params[piece[0]], piece), _piece(self.momentum[piece[0]], piece)
            m.mul_(mu).add_(d)
            update = d.add(m, alpha=mu) if self.nesterov else m
            g.sub_(update, alpha=self.outer_lr)

    def state_dict(self) -> dict[str, Any]:
        """Global parameters, outer momentum, counters and the averaged exchange in flight (on CPU).

        Identical on every rank. Waits for an exchange in flight, so that the checkpoint holds its result
        (``pending``, for fragment ``pending_fragment``); a resumed run applies it when it is due.
        """
        self.wait()
        pending = self._pending
        return {
            **super().state_dict(),
            "config": self.config(),
            "rounds": self.rounds,
            "global_params": [g.detach().cpu().clone() for g in self.global_params],
            "momentum": [m.detach().cpu().clone() for m in self.momentum],
            "pending": None if pending is None else [d.detach().cpu().clone() for d in pending.resolve(self.sync_stats)],
            "pending_fragment": None if pending is None else pending.fragment,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ConfigurationError: the state comes from another algorithm, a different overlap setting (an
                exchange in flight cannot be dropped or invented), or different streaming options
                (``fragments``, ``overlap_steps``, ``fragment_update_alpha``, ``outer_dtype``; with
                streaming also ``sync_every``): the message names both.
        """
        super().load_state_dict(state)
        saved = state["config"]
        if saved["overlap"] != self.overlap:
            raise ConfigurationError(
                f"the checkpoint's DiLoCo state has overlap={saved['overlap']} but the strategy has "
                f"overlap={self.overlap}; resume with overlap={saved['overlap']}."
            )
        mine = self.config()
        keys = list(STREAMING_DEFAULTS)
        if self.fragments > 1 or self.overlap_steps or saved.get("fragments", 1) > 1 or saved.get("overlap_steps", 0):
            keys.append("sync_every")  # the fragments' schedule depends on the round length
        theirs = {k: saved.get(k, STREAMING_DEFAULTS.get(k)) for k in keys}
        ours = {k: mine[k] for k in keys}
        if theirs != ours:
            shown = ", ".join(f"{k}={v!r}" for k, v in theirs.items())
            raise ConfigurationError(
                f"the checkpoint's DiLoCo state has {shown} but the strategy has "
                f"{', '.join(f'{k}={v!r}' for k, v in ours.items())}; resume with {shown}."
            )
        self.rounds = int(state["rounds"])
        for dst, src in ((self.global_params, state["global_params"]), (self.momentum, state["momentum"])):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        device = self.global_params[0].device
        pending = state["pending"]
        self._pending = None if pending is None else _Exchange(
            int(state.get("pending_fragment") or 0), result=[d.to(device) for d in pending])

    def config(self) -> dict[str, Any]:
        """The hyper-parameters."""
        return {"sync_every": self.sync_every, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "overlap": self.overlap, "fragments": self.fragments,
                "overlap_steps": self.overlap_steps, "fragment_update_alpha": self.fragment_update_alpha,
                "outer_dtype": self.outer_dtype}


def check_threaded_backend(backend: str, setting: str, without_compression: str) -> None:
    """Raise :class:`ConfigurationError` unless an overlapped, compressed exchange can run on ``backend``.

    Args:
        backend: the process-group backend.
        setting: the user's setting, for the message (``"DiLoCoStrategy(overlap=True, compression=...)"``).
        without_compression: how the user drops the compressor (``"compression=None"``).
    """
    if backend not in THREADED_BACKENDS:
        raise ConfigurationError(
            f"{setting} cannot run asynchronously on the {backend!r} backend: a compressor's exchange runs in a "
            f"background thread, which needs a backend in {list(THREADED_BACKENDS)}; valid: process_group_backend "
            f"in {list(THREADED_BACKENDS)}, {without_compression}, or overlap=False."
        )


def check_outer(owner: str, outer_lr: Any, outer_momentum: Any) -> None:
    """Raise :class:`ConfigurationError` unless ``outer_lr > 0`` and ``0 <= outer_momentum < 1``."""
    if isinstance(outer_lr, bool) or not isinstance(outer_lr, int | float) or not outer_lr > 0:
        raise ConfigurationError(f"{owner}(outer_lr={outer_lr!r}): outer_lr must be a number > 0 (DiLoCo: 0.7).")
    if isinstance(outer_momentum, bool) or not isinstance(outer_momentum, int | float) or not 0 <= outer_momentum < 1:
        raise ConfigurationError(
            f"{owner}(outer_momentum={outer_momentum!r}): outer_momentum must be in [0, 1) (DiLoCo: 0.9)."
        )


@dataclass(frozen=True)
class LocalSGD:
    """Local SGD as a data-parallel synchronization: ``HybridParallelStrategy(data_parallel_sync=LocalSGD(16))``.

    A validated description; :meth:`build` makes the :class:`LocalSGDState` for one rank's parameters.

    Raises:
        ConfigurationError: ``sync_every`` is not an integer >= 1.
    """

    sync_every: int = 16

    def __post_init__(self) -> None:
        check_sync_every(type(self).__name__, self.sync_every)

    @property
    def overlap(self) -> bool:
        """Local SGD always waits for its averaging."""
        return False

    @property
    def asynchronous(self) -> bool:
        """Local SGD always waits for its averaging."""
        return False

    def build(self, params: Sequence[Tensor], compressor: Compressor | None = None) -> LocalSGDState:
        """The algorithm state for ``params`` (this rank's parameters, or its local shards of them)."""
        return LocalSGDState(self.sync_every, compressor)


@dataclass(frozen=True)
class DiLoCo:
    """DiLoCo as a data-parallel synchronization: ``HybridParallelStrategy(data_parallel_sync=DiLoCo(...))``.

    The arguments are those of :class:`DiLoCoState`; :meth:`build` makes the state for one rank's
    parameters. ``DiLoCo(fragments=4, overlap_steps=1, outer_dtype="int8")`` is Streaming DiLoCo.

    Raises:
        ConfigurationError: ``sync_every < 1``, ``outer_lr <= 0``, ``outer_momentum`` outside ``[0, 1)``, or
            invalid streaming options (:func:`check_streaming`).

    Example::

        HybridParallelStrategy(tensor_parallel_size=2, data_parallel_sync=DiLoCo(sync_every=64, fragments=4))
    """

    sync_every: int = 64
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    overlap: bool = False
    fragments: int = 1
    overlap_steps: int = 0
    fragment_update_alpha: float = 0.0
    outer_dtype: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_sync_every(owner, self.sync_every)
        check_outer(owner, self.outer_lr, self.outer_momentum)
        check_streaming(owner, self.sync_every, self.overlap, self.fragments, self.overlap_steps,
                        self.fragment_update_alpha, self.outer_dtype)

    @property
    def asynchronous(self) -> bool:
        """Whether an exchange runs while inner steps continue (``overlap`` or ``overlap_steps > 0``)."""
        return self.overlap or self.overlap_steps > 0

    @property
    def streaming(self) -> bool:
        """Whether fragments synchronize at different steps (the replicas never meet at one step)."""
        return is_streaming(self.fragments, self.overlap_steps, self.fragment_update_alpha)

    def build(self, params: Sequence[Tensor], compressor: Compressor | None = None) -> DiLoCoState:
        """The algorithm state for ``params`` (this rank's parameters, or its local shards of them)."""
        return DiLoCoState(params, compressor=compressor, **asdict(self))


DP_SYNC_NAMES = {"exact": None, "local_sgd": LocalSGD, "diloco": DiLoCo}


def resolve_dp_sync(value: Any) -> LocalSGD | DiLoCo | None:
    """``data_parallel_sync`` as a validated :class:`LocalSGD` / :class:`DiLoCo`, or ``None`` (exact)."""
    if value is None or isinstance(value, LocalSGD | DiLoCo):
        return value
    if isinstance(value, str) and value in DP_SYNC_NAMES:
        kind = DP_SYNC_NAMES[value]
        return None if kind is None else kind()
    raise ConfigurationError(
        f"data_parallel_sync={value!r} is invalid; valid: None, {sorted(DP_SYNC_NAMES)}, "
        "lit_parallel.LocalSGD(sync_every=...) or lit_parallel.DiLoCo(sync_every=..., outer_lr=..., ...)."
    )
