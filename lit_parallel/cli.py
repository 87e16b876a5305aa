"""The ``lit-parallel`` command: a Hydra app whose only job is to call :func:`train`.

Usage::

    lit-parallel                                   # default recipe (MNIST, 2 CPU processes)
    lit-parallel recipe=mnist trainer.devices=1 trainer.max_epochs=1 data.batch_size=128
    lit-parallel --help                            # lists config groups and recipes

Tests and notebooks call :func:`train` with a composed config (see :func:`compose`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from lit_parallel.errors import ConfigurationError

__all__ = ["available_recipes", "compose", "conf_dir", "main", "print_error_once", "train"]

# Each CPU rank gets at least a quarter core; beyond that a run only thrashes.
_CPU_OVERSUBSCRIPTION = 4


def conf_dir() -> Path:
    """The Hydra config directory: inside the wheel, or ``conf/`` of a source checkout."""
    packaged = Path(__file__).parent / "_conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def available_recipes() -> list[str]:
    """Names accepted by ``recipe=<name>``."""
    return sorted(p.stem for p in (conf_dir() / "recipe").glob("*.yaml"))


def _check_recipe_overrides(argv: list[str]) -> None:
    for arg in argv:
        if arg.startswith(("recipe=", "+recipe=")):
            name = arg.split("=", 1)[1]
            if name not in available_recipes():
                raise ConfigurationError(f"recipe={name!r} is unknown; valid recipes: {available_recipes()}.")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config as the CLI would (for tests and notebooks); no Hydra run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _check_recipe_overrides(overrides or [])
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def _check_devices(trainer_cfg: DictConfig) -> None:
    devices = trainer_cfg.get("devices", "auto")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if devices in ("auto", -1, "-1") or isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return
    try:
        count = int(devices)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"trainer.devices={devices!r} is not a number; valid: a positive integer, a list of ids or 'auto'."
        ) from None
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and _cuda_count()):
        limit, what = _cuda_count(), "visible CUDA devices"
    else:
        limit, what = _CPU_OVERSUBSCRIPTION * (os.cpu_count() or 1), f"CPU processes ({os.cpu_count()} cores)"
    if not 1 <= count <= limit:
        raise ConfigurationError(f"trainer.devices={count} is not allowed; valid: 1..{limit} {what}, or 'auto'.")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def _with_exact_resume(callbacks: list[Any], group: DictConfig | None) -> list[Any]:
    """The callbacks with :class:`~lit_parallel.callbacks.ExactResume` first (its RNG restore then precedes the
    other callbacks' batch hooks), also under ``callbacks=none``; ``callbacks.exact_resume=null`` turns it off."""
    from lit_parallel.callbacks import ExactResume

    turned_off = group is not None and "exact_resume" in group and group.exact_resume is None
    if turned_off or any(isinstance(callback, ExactResume) for callback in callbacks):
        return callbacks
    return [ExactResume(), *callbacks]


def _with_preemption(callbacks: list[Any], group: DictConfig | None) -> list[Any]:
    """The callbacks with :class:`~lit_parallel.callbacks.Preemption` (a signal stops every rank at one step
    boundary with a checkpoint that ``ckpt_path=auto`` resumes from), also under ``callbacks=none``;
    ``callbacks.preemption=null`` turns it off."""
    from lit_parallel.callbacks import Preemption

    turned_off = group is not None and "preemption" in group and group.preemption is None
    if turned_off or any(isinstance(callback, Preemption) for callback in callbacks):
        return callbacks
    return [*callbacks, Preemption()]


def _empty_init(value: Any, strategy: Any) -> bool:
    """``empty_init=auto``: build on the meta device whenever the hybrid strategy will split the model (it then
    materializes each rank's shards only); ``true`` / ``false`` force it.

    Raises:
        ConfigurationError: another value, or ``true`` with a strategy that cannot materialize meta tensors.
    """
    from lit_parallel.strategies import HybridParallelStrategy

    hybrid = isinstance(strategy, HybridParallelStrategy)
    if value == "auto":
        return hybrid
    if value not in (True, False):
        raise ConfigurationError(f"empty_init={value!r} is invalid; valid: auto, true or false.")
    if value and not hybrid:
        raise ConfigurationError(
            f"empty_init=true needs strategy=hybrid (it materializes each rank's shards); {type(strategy).__name__} "
            "would train on meta tensors. Use empty_init=false or auto."
        )
    return bool(value)


def _build_strategy(cfg: DictConfig) -> Any:
    """Instantiate ``cfg.strategy``, handing it ``cfg.compression`` when one is selected."""
    import inspect

    from hydra.utils import get_class, instantiate

    if not cfg.get("strategy"):
        if cfg.get("async_checkpoint"):
            raise ConfigurationError("async_checkpoint=true needs a strategy; valid: strategy=ddp, local_sgd, diloco, "
                                     "lightning_ddp or hybrid (or async_checkpoint=false).")
        if cfg.get("compression"):
            raise ConfigurationError("compression needs a data-parallel strategy; valid: strategy=ddp or hybrid.")
        return "auto"
    params = inspect.signature(get_class(cfg.strategy._target_).__init__).parameters
    extra = _async_checkpoint_kwargs(cfg, params)
    compression = cfg.get("compression")
    if not compression or "_target_" not in compression:
        return instantiate(cfg.strategy, **extra)
    for key in ("compression", "gradient_compression"):
        if key in params:
            return instantiate(cfg.strategy, **{key: instantiate(compression)}, **extra)
    raise ConfigurationError(
        f"compression={compression._target_.rsplit('.', 1)[-1]} needs a strategy that compresses gradients; "
        f"strategy {cfg.strategy._target_} does not (valid: strategy=ddp, hybrid, diloco)."
    )


def _async_checkpoint_kwargs(cfg: DictConfig, params: Any) -> dict[str, Any]:
    """``async_checkpoint: true``: the hybrid strategy's own option, or the DDP family's ``checkpoint_io``."""
    value = cfg.get("async_checkpoint", False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"async_checkpoint={value!r}; valid: true or false.")
    if not value:
        return {}
    if "async_checkpoint" in params:
        return {"async_checkpoint": True}
    if "checkpoint_io" in params:
        from lit_parallel.plugins import AsyncAtomicCheckpointIO

        return {"checkpoint_io": AsyncAtomicCheckpointIO()}
    raise ConfigurationError(f"async_checkpoint=true: strategy {cfg.strategy._target_} takes neither async_checkpoint "
                             "nor checkpoint_io; valid: strategy=ddp, local_sgd, diloco, lightning_ddp or hybrid.")


def launch_id() -> str:
    """A name for this run that every rank and every restart of the same job agrees on.

    torchrun: ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``), or, for its default ``none``, the agent's pid and
    start time (workers are the agent's children, restarts included); SLURM: the job id (stable across
    ``--requeue``); otherwise the local time, as Hydra does.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        agent = os.getppid()
        started = ""
        try:
            started = "-" + Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            pass
        return f"torchrun-{socket.gethostname()}-{agent}{started}"
    if os.environ.get("SLURM_JOB_ID"):
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + (f"_{array}" if array else "")
    return time.strftime("%Y-%m-%d_%H-%M-%S")


if not OmegaConf.has_resolver("lit_parallel.launch_id"):
    OmegaConf.register_new_resolver("lit_parallel.launch_id", launch_id, use_cache=True)


def resolve_ckpt_path(ckpt_path: Any, checkpoint_dir: Path) -> str | None:
    """``"auto"``: the newest complete checkpoint below ``checkpoint_dir`` (``None`` on a fresh run).

    Any other path is verified first (:func:`~lit_parallel.checkpointing.checkpoint_problem`).
    """
    from lit_parallel.checkpointing import checkpoint_problem, find_resume_checkpoint

    # Lightning's own keywords ("last", "hpc", "best") are resolved by the Trainer.
    if ckpt_path not in (None, "auto", "last", "hpc", "best"):
        problem = checkpoint_problem(ckpt_path)
        if problem is not None:
            raise ConfigurationError(f"ckpt_path={ckpt_path!r} cannot be resumed: {problem}. Valid: a complete "
                                     "checkpoint, 'auto' (the newest complete one under the output directory) or null.")
    if ckpt_path != "auto":
        return ckpt_path

    found = find_resume_checkpoint(checkpoint_dir)
    if found is not None:
        print(f"lit-parallel: resuming from {found}", file=sys.stderr)
    return None if found is None else str(found)


def _periodic_checkpoint(cfg: DictConfig, output_dir: Path) -> list[Any]:
    every = cfg.get("checkpoint_every_n_steps")
    if not every:
        return []
    if not isinstance(every, int) or every < 1:
        raise ConfigurationError(f"checkpoint_every_n_steps={every!r}; valid: a positive integer or null.")
    keep = cfg.get("keep_checkpoints", 2)
    if not isinstance(keep, int) or keep < 1:
        raise ConfigurationError(f"keep_checkpoints={keep!r}; valid: a positive integer (2 survives a bad newest).")
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints" / "steps"), filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=every, save_top_k=keep, monitor="step", mode="max", save_on_train_epoch_end=False,
    )]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything the config names, fit, test, and return the run summary.

    With ``ckpt_path=auto`` (the default) a run whose output directory already holds checkpoints
    resumes from the newest complete one; that is how a torchrun or SLURM restart continues.

    Raises:
        ConfigurationError: for any invalid setting, before a process group is created.
    """
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    import lit_parallel  # noqa: F401  (registers strategy names)
    from lit_parallel.callbacks import ModelSummary, RunSummary

    _check_devices(cfg.trainer)
    output_dir = Path(cfg.output_dir).resolve()
    if cfg.get("async_checkpoint"):
        from lit_parallel.parallel.async_checkpoint import check_writable

        check_writable(output_dir, "output_dir (checkpoints, async_checkpoint=true)")
    if cfg.get("threads_per_process"):
        torch.set_num_threads(int(cfg.threads_per_process))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    strategy = _build_strategy(cfg)
    summary = RunSummary(output_dir=str(output_dir))
    group = cfg.get("callbacks")
    callbacks = [*_with_preemption(_with_exact_resume(_instantiate_group(group), group), group),
                 *_periodic_checkpoint(cfg, output_dir), summary]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ModelSummary())  # Lightning's, without the "Total FLOPs: 0" it never measured
    logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
    trainer: L.Trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir),
        enable_model_summary=False,  # Lightning's default summary; ours is in `callbacks`
    )
    with trainer.init_module(empty_init=_empty_init(cfg.get("empty_init", "auto"), strategy)):
        model = instantiate(cfg.model)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    extra: dict[str, Any] = {"recipe": cfg.get("recipe_name", "custom")}
    if cfg.get("run_test", True):
        trainer.test(model, datamodule=datamodule, verbose=False)
    extra["wall_seconds_total"] = time.perf_counter() - _START
    result = summary.report(trainer, extra)
    result = result if result is not None else summary.summary(trainer) | extra
    if trainer.is_global_zero:
        _plot_run(Path(logger.log_dir) / "metrics.csv", str(extra["recipe"]))
    # Callers that train in-process (tests, notebooks) must be able to train again.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


_START = time.perf_counter()


def _plot_run(metrics_csv: Path, title: str) -> None:
    """``curves.png`` next to ``metrics.csv``; one line instead when matplotlib is not installed."""
    from lit_parallel.plotting import plot_curves

    if not metrics_csv.is_file():
        return
    try:
        png = plot_curves(metrics_csv, title=f"{title} ({metrics_csv.parent.parent.name})")
    except ModuleNotFoundError as err:
        print(f"lit-parallel: no curves.png: {err.name} is not installed (pip install matplotlib).", file=sys.stderr)
        return
    if png is not None:
        print(f"lit-parallel: curves: {png}", flush=True)


def _launch_key() -> str:
    """A name every rank of this launch shares (Lightning gives its ranks one ``MASTER_PORT``)."""
    if "TORCHELASTIC_RESTART_COUNT" in os.environ or os.environ.get("SLURM_JOB_ID"):
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
        return f"{launch_id()}-{restart}"
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', os.getpid())}"


def print_error_once(message: str) -> bool:
    """Print ``lit-parallel: error: <message>`` once per launch, not once per rank.

    Rank 0 always prints and leaves a marker in the temporary directory; another rank prints only when
    no rank of its launch printed the same message in the last two minutes, so an error that only it
    hit is still shown. (A rank that fails before rank 0 does with the same error prints it as well.)

    Returns:
        Whether this process printed it.
    """
    rank_zero = all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))
    digest = hashlib.sha1(f"{_launch_key()}\n{message}".encode()).hexdigest()[:16]
    marker = Path(tempfile.gettempdir()) / f"lit-parallel-error-{digest}"
    try:
        if rank_zero or (marker.is_file() and time.time() - marker.stat().st_mtime > 120):
            marker.unlink(missing_ok=True)
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        pass  # an unwritable temporary directory: better twice than never
    print(f"lit-parallel: error: {message}", file=sys.stderr, flush=True)
    return True


def _hydra_task(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    try:
        train(cfg)
    except (ConfigurationError, InstantiationException) as err:
        # Hydra wraps errors raised in constructors; the user needs our one-line message, not the wrapper.
        cause = err if isinstance(err, ConfigurationError) else err.__cause__
        if not isinstance(cause, ConfigurationError):
            raise
        print_error_once(str(cause))
        sys.exit(2)


# Variables a real launcher sets next to LOCAL_RANK (torchrun, SLURM's srun, Open MPI, MPICH/PMI, manual RANK).
_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                  "PMI_RANK", "RANK")


def inherited_launch_warning(environ: Mapping[str, str]) -> str | None:
    """A warning when ``LOCAL_RANK=0`` looks inherited from a process that trained earlier, else ``None``.

    Lightning writes ``LOCAL_RANK``, ``WORLD_SIZE`` and ``MASTER_PORT`` into the environment of the process
    that calls ``Trainer.fit`` (and starts its other ranks with ``LOCAL_RANK >= 1``). A ``lit-parallel``
    started from such a process (a notebook, a sweep script) sees ``LOCAL_RANK=0``, assumes an external
    launcher started its peers and waits for them until the rendezvous times out.
    """
    if environ.get("LOCAL_RANK") != "0" or any(name in environ for name in _LAUNCHER_VARS):
        return None
    return ("LOCAL_RANK=0 is set but no launcher variable is (none of " + ", ".join(_LAUNCHER_VARS) + "): "
            "this run assumes an external launcher started its peers "
            f"(WORLD_SIZE={environ.get('WORLD_SIZE', 'unset')}) and will wait for them. If this process merely inherited the variables from a process that "
            "trained before (Lightning sets them), unset LOCAL_RANK, WORLD_SIZE, NODE_RANK, MASTER_ADDR and "
            "MASTER_PORT.")


@record
def main() -> None:
    """Console entry point of ``lit-parallel``.

    Under torchrun, :func:`~torch.distributed.elastic.multiprocessing.errors.record` writes the failing
    rank's traceback to the agent's error file, so the job summary shows it as the root cause.
    """
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # Let the exception reach @record (Hydra would print it and exit 1), so torchrun's summary names
        # the failing rank and shows its traceback as the root cause.
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    warning = inherited_launch_warning(os.environ)
    if warning is not None:
        print(f"lit-parallel: warning: {warning}", file=sys.stderr)
    try:
        _check_recipe_overrides(sys.argv[1:])
    except ConfigurationError as err:
        print(f"lit-parallel: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_hydra_task)()


if __name__ == "__main__":
    main()
