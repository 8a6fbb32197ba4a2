"""The CLI surface: fast help, listing, validation of every config file, clear errors for bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from runx.cli.config import GROUPS, ConfigError, compose, group_options, validate
from runx.recipes import RECIPES


def test_help_is_fast():
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "runx.cli.main", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "train" in p.stdout and "validate" in p.stdout
    assert time.perf_counter() - t0 < 2.0


def test_ls_lists_every_recipe_with_description():
    p = run_cli(["ls"], env={"COLUMNS": "250"})
    for name, info in RECIPES.items():
        assert name in p.stdout
        assert info.description.split()[0] in p.stdout
    assert set(group_options("recipe")) == set(RECIPES), "every registered recipe has a config file"


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "recipe"])
def test_every_group_option_composes_and_validates_with_every_recipe(group):
    """Recursively: each recipe file x each option of every other group composes and type-checks."""
    for recipe in group_options("recipe"):
        for opt in group_options(group):
            cfg = compose([f"recipe={recipe}", f"{group}={opt}"])
            problems = validate(cfg)
            # options that need a user value (model.path=???) may only fail for that reason
            problems = [p for p in problems if "required" not in p]
            assert problems == [], f"recipe={recipe} {group}={opt}: {problems}"


def test_validate_all_recipes_cli():
    p = run_cli(["validate", "--all"])
    for name in RECIPES:
        assert f"ok  recipe={name}" in p.stdout


@pytest.mark.parametrize("override,key,choice", [
    ("trainer=zero9", "trainer", "zero3_cpu_offload"),
    ("optim.lrr=1", "optim.lrr", "optim.lr"),
    ("+optim.lrr=1", "optim.lrr", "weight_decay"),
    ("trainer.zero_stage=7", "trainer.zero_stage", "0, 1, 2, 3"),
    ("trainer.precision=fp16", "trainer.precision", "bf16"),
    # a group option whose value the user must give (not a silent fall-back to the base default)
    ("model=hf_causal_lm", "model.path", "model.path=Qwen/"),
    ("data=jsonl", "data.path", "required"),
])
def test_bad_override_is_a_clear_error(override, key, choice):
    p = run_cli(["train", override], check=False, timeout=60)
    assert p.returncode != 0
    err = p.stderr
    assert "Traceback" not in err and "Traceback" not in p.stdout
    assert key in err and choice in err, err
    assert len(err.strip().splitlines()) <= 4  # one paragraph


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError):
        compose(["trainer=nope"])
    cfg = compose(["+trainer.bogus=1", "optim.scheduler=wavy", "trainer.micro_batch_size=many"])
    problems = validate(cfg)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "trainer.bogus" in text and "cosine, linear, constant" in text and "expected int" in text


def test_cfg_job_prints_resolved_config():
    p = run_cli(["train", "recipe=lora", "--cfg", "job"])
    assert "rank: 8" in p.stdout and "name: lora" in p.stdout


def test_installed_wheel_ships_configs(tmp_path):
    """A non-editable wheel holds runx.* packages and the YAML tree (nothing generic in site-packages)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "whl"), root], check=True, capture_output=True, timeout=300)
    whl = next((tmp_path / "whl").glob("runx-*.whl"))
    import zipfile
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    # hydra_plugins is Hydra's own namespace package for plugin discovery (our launcher lives under it)
    assert tops <= {"runx", "hydra_plugins"}, tops
    assert all(n.startswith("hydra_plugins/runx_") for n in names if n.startswith("hydra_plugins/")), names
    assert "runx/conf/config.yaml" in names and "runx/conf/trainer/zero3_nvme.yaml" in names
    assert "runx/conf/hydra/job_logging/rich.yaml" in names and "runx/recipes/assets/stdlib_topics.jsonl" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run([sys.executable, "-c", "import runx.cli.config as c, sys; from runx.cli.main import main;"
                        "print(c.__file__); sys.exit(main(['validate', 'recipe=lora']))"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    assert str(target) in p.stdout and "ok: recipe=lora" in p.stdout
