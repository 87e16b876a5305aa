"""Local SGD and DiLoCo in pure torch: replicas train alone and synchronize every ``sync_every`` steps.

:class:`LocalSGDState` averages the parameters of all replicas every ``H`` optimizer steps.
:class:`DiLoCoState` treats the progress of a round as a pseudo-gradient (``global - local``), averages
it across the group (optionally compressed) and applies it to replicated global parameters with an
outer Nesterov SGD (Douillard et al. 2023, "DiLoCo"). With ``overlap=True`` the exchange runs in the
background while the next round trains, and its result is applied one round late.

Lightning glue lives in :mod:`lit_parallel.strategies.local_sgd` and :mod:`lit_parallel.strategies.diloco`.

Example::

    state = DiLoCoState(list(model.parameters()), sync_every=64, outer_lr=0.7)
    for batch in loader:
        loss_fn(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        state.step(list(model.parameters()))    # synchronizes every 64th call
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression.base import Compressor, NoCompression, copy_back, flatten

__all__ = ["THREADED_BACKENDS", "DiLoCo", "DiLoCoState", "LocalSGD", "LocalSGDState", "check_threaded_backend",
           "check_sync_every", "resolve_dp_sync"]

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

    Args:
        params: the model parameters; the global parameters start as a copy.
        sync_every: inner optimizer steps per round (``H``).
        outer_lr: outer learning rate (DiLoCo: 0.7).
        outer_momentum: outer momentum (DiLoCo: 0.9).
        nesterov: Nesterov momentum for the outer step.
        overlap: exchange the pseudo-gradient in the background and apply it one round late.
        compressor: averages the pseudo-gradient; its warm-up counts rounds. ``None``: exact all-reduce.

    Raises:
        ConfigurationError: ``sync_every < 1``, ``outer_lr <= 0``, ``outer_momentum`` outside ``[0, 1)``.
    """

    __slots__ = (
        # Hyper-parameters.
        "nesterov",
        "outer_lr",
        "outer_momentum",
        "overlap",
        # Internal state: replicated global parameters, outer momentum, rounds, the exchange in flight.
        "_executor",
        "_pending",
        "global_params",
        "momentum",
        "rounds",
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
    ) -> None:
        super().__init__(sync_every, compressor)
        check_outer(type(self).__name__, outer_lr, outer_momentum)
        self.outer_lr, self.outer_momentum, self.nesterov, self.overlap = outer_lr, outer_momentum, nesterov, overlap
        self.global_params = [p.detach().clone() for p in params]
        self.momentum = [torch.zeros_like(p) for p in self.global_params]
        self.rounds = 0
        self._pending: Future[list[Tensor]] | torch.futures.Future[Tensor] | list[Tensor] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def reset_global(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` (identical on every rank, e.g. after a broadcast) the global parameters."""
        for g, p in zip(self.global_params, params, strict=True):
            g.copy_(p.detach())

    @torch.no_grad()
    def sync(self, params: Sequence[Tensor], group: ProcessGroup | None = None) -> None:
        """End a round: exchange the pseudo-gradient, step the outer optimizer, reset ``params`` to global."""
        deltas = [g - p.detach() for g, p in zip(self.global_params, params, strict=True)]
        if self.overlap:
            if self._pending is not None:
                self._outer_step(self._wait())
            self._pending = self._launch(deltas, group)
        else:
            self.compressor.reduce_(PSEUDO_GRAD_KEY, deltas, group)
            self._outer_step(deltas)
        self.compressor.step()
        self.rounds += 1
        for p, g in zip(params, self.global_params, strict=True):
            p.data.copy_(g)

    def wait(self) -> None:
        """Finish the exchange in flight (if any), keeping its result for the next round."""
        if self._pending is not None:
            self._pending = self._wait()

    def close(self) -> None:
        """Finish the exchange in flight and stop the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _launch(
        self, deltas: list[Tensor], group: ProcessGroup | None
    ) -> Future[list[Tensor]] | torch.futures.Future[Tensor]:
        if isinstance(self.compressor, NoCompression):
            flat = flatten(deltas, self.global_params[0].dtype)
            return self.compressor.all_reduce_async_(flat, group)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange")

        def exchange() -> list[Tensor]:
            if deltas[0].is_cuda:  # the current CUDA device is per thread
                torch.cuda.set_device(deltas[0].device)
            self.compressor.reduce_(PSEUDO_GRAD_KEY, deltas, group)
            return deltas

        return self._executor.submit(exchange)

    def _wait(self) -> list[Tensor]:
        pending = self._pending
        self._pending = None
        if isinstance(pending, list):
            return pending
        if isinstance(pending, Future):
            return pending.result()
        assert pending is not None
        flat = pending.wait()
        deltas = [torch.empty_like(g) for g in self.global_params]
        copy_back(flat, deltas)
        return deltas

    def _outer_step(self, deltas: Sequence[Tensor]) -> None:
        mu = self.outer_momentum
        for g, m, d in zip(self.global_params, self.momentum, deltas, strict=True):
            m.mul_(mu).add_(d)
            update = d.add(m, alpha=mu) if self.nesterov else m
            g.sub_(update, alpha=self.outer_lr)

    def state_dict(self) -> dict[str, Any]:
        """Global parameters, outer momentum, counters and the averaged exchange in flight (on CPU).

        Identical on every rank. Waits for an exchange in flight, so that the checkpoint holds its result.
        """
        self.wait()
        pending = self._pending
        assert pending is None or isinstance(pending, list)
        return {
            **super().state_dict(),
            "config": self.config(),
            "rounds": self.rounds,
            "global_params": [g.detach().cpu().clone() for g in self.global_params],
            "momentum": [m.detach().cpu().clone() for m in self.momentum],
            "pending": None if pending is None else [d.detach().cpu().clone() for d in pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ConfigurationError: the state comes from another algorithm, or a different overlap setting
                (an exchange in flight cannot be dropped or invented).
        """
        super().load_state_dict(state)
        if state["config"]["overlap"] != self.overlap:
            raise ConfigurationError(
                f"the checkpoint's DiLoCo state has overlap={state['config']['overlap']} but the strategy has "
                f"overlap={self.overlap}; resume with overlap={state['config']['overlap']}."
            )
        self.rounds = int(state["rounds"])
        for dst, src in ((self.global_params, state["global_params"]), (self.momentum, state["momentum"])):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        device = self.global_params[0].device
        self._pending = None if state["pending"] is None else [d.to(device) for d in state["pending"]]

    def config(self) -> dict[str, Any]:
        """The hyper-parameters."""
        return {"sync_every": self.sync_every, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "overlap": self.overlap}


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

    def build(self, params: Sequence[Tensor], compressor: Compressor | None = None) -> LocalSGDState:
        """The algorithm state for ``params`` (this rank's parameters, or its local shards of them)."""
        return LocalSGDState(self.sync_every, compressor)


@dataclass(frozen=True)
class DiLoCo:
    """DiLoCo as a data-parallel synchronization: ``HybridParallelStrategy(data_parallel_sync=DiLoCo(...))``.

    The arguments are those of :class:`DiLoCoState`; :meth:`build` makes the state for one rank's
    parameters.

    Raises:
        ConfigurationError: ``sync_every < 1``, ``outer_lr <= 0``, ``outer_momentum`` outside ``[0, 1)``.
    """

    sync_every: int = 64
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    overlap: bool = False

    def __post_init__(self) -> None:
        check_sync_every(type(self).__name__, self.sync_every)
        check_outer(type(self).__name__, self.outer_lr, self.outer_momentum)

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
