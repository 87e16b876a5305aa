"""Every ``*_debug`` recipe trains and tests end to end; the results table and its reproducer agree."""

from __future__ import annotations

import math
import re

import pytest

from lit_parallel import reproduce
from lit_parallel.cli import available_recipes, compose, conf_dir, train
from lit_parallel.testing import run_distributed

DEBUG_RECIPES = [name for name in available_recipes() if name.endswith("_debug")]


def _train_recipe(recipe: str, output_dir: str) -> dict:
    return train(compose([f"recipe={recipe}", f"output_dir={output_dir}"]))


@pytest.mark.parametrize("recipe", DEBUG_RECIPES)
def test_debug_recipe_trains_and_tests(compose_cfg, tmp_path, recipe):
    cfg = compose_cfg(f"recipe={recipe}")
    devices = int(cfg.trainer.devices)
    if devices == 1:
        result = train(cfg)
    else:  # Lightning's launcher would re-run pytest: start the ranks ourselves
        results = run_distributed(_train_recipe, world_size=devices, args=(recipe, str(tmp_path)), timeout=280)
        result = next(r for r in results if r is not None)
    assert result["global_step"] > 0
    metrics = {k: v for k, v in result.items() if k.startswith(("test/", "val/"))}
    assert metrics, result
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if cfg.model._target_.endswith("CausalLM"):
        assert {"test/ppl", "val/ppl", "val/ppl_pretrained"} <= set(result)


def test_results_table_matches_recipes_and_readme():
    table = reproduce.load_table()
    readme = (conf_dir() / "recipe" / "README.md").read_text()
    for name, row in table.items():
        assert name in available_recipes(), name
        assert f"recipe={name}" in row["command"] or name == "mnist"
        assert re.search(rf"\|\s*`{name}`\s*\|", readme), f"README.md has no row for {name}"
        assert row["tolerance"] > 0 and row["wall_seconds"] > 0
