"""The ``lit-parallel`` command: a Hydra app whose only job is to call :func:`train`.

Usage::

    lit-parallel                                   # default recipe (MNIST, 2 CPU processes)
    lit-parallel recipe=mnist trainer.devices=1 trainer.max_epochs=1 data.batch_size=128
    lit-parallel --help                            # lists config groups and recipes

Tests and notebooks call :func:`train` with a composed config (see :func:`compose`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lit_parallel.errors import ConfigurationError

__all__ = ["available_recipes", "compose", "conf_dir", "main", "train"]

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


def _build_strategy(cfg: DictConfig) -> Any:
    """Instantiate ``cfg.strategy``, handing it ``cfg.compression`` when one is selected."""
    import inspect

    from hydra.utils import get_class, instantiate

    if not cfg.get("strategy"):
        if cfg.get("compression"):
            raise ConfigurationError("compression needs a data-parallel strategy; valid: strategy=ddp or hybrid.")
        return "auto"
    compression = cfg.get("compression")
    if not compression or "_target_" not in compression:
        return instantiate(cfg.strategy)
    params = inspect.signature(get_class(cfg.strategy._target_).__init__).parameters
    for key in ("compression", "gradient_compression"):
        if key in params:
            return instantiate(cfg.strategy, **{key: instantiate(compression)})
    raise ConfigurationError(
        f"compression={compression._target_.rsplit('.', 1)[-1]} needs a strategy that compresses gradients; "
        f"strategy {cfg.strategy._target_} does not (valid: strategy=ddp, hybrid, diloco)."
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything the config names, fit, test, and return the run summary.

    Raises:
        ConfigurationError: for any invalid setting, before a process group is created.
    """
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    import lit_parallel  # noqa: F401  (registers strategy names)
    from lit_parallel.callbacks import RunSummary

    _check_devices(cfg.trainer)
    output_dir = Path(cfg.output_dir).resolve()
    if cfg.get("threads_per_process"):
        torch.set_num_threads(int(cfg.threads_per_process))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = _build_strategy(cfg)
    summary = RunSummary(output_dir=str(output_dir))
    callbacks = [*_instantiate_group(cfg.get("callbacks")), summary]
    logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
    trainer: L.Trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir)
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    extra: dict[str, Any] = {"recipe": cfg.get("recipe_name", "custom")}
    if cfg.get("run_test", True):
        trainer.test(model, datamodule=datamodule, verbose=False)
    extra["wall_seconds_total"] = time.perf_counter() - _START
    result = summary.report(trainer, extra)
    result = result if result is not None else summary.summary(trainer) | extra
    # Callers that train in-process (tests, notebooks) must be able to train again.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


_START = time.perf_counter()


def _hydra_task(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    try:
        train(cfg)
    except (ConfigurationError, InstantiationException) as err:
        # Hydra wraps errors raised in constructors; the user needs our one-line message, not the wrapper.
        cause = err if isinstance(err, ConfigurationError) else err.__cause__
        if not isinstance(cause, ConfigurationError):
            raise
        print(f"lit-parallel: error: {cause}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point of ``lit-parallel``."""
    try:
        _check_recipe_overrides(sys.argv[1:])
    except ConfigurationError as err:
        print(f"lit-parallel: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_hydra_task)()


if __name__ == "__main__":
    main()
