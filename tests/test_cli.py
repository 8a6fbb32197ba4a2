"""The CLI surface: fast help, listing, validation of every config file, clear errors for bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import read_metrics, run_cli
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


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in ("recipe", "experiment")])
def test_every_group_option_composes_and_validates_with_every_recipe(group):
    """Recursively: each recipe file x each option of every other group composes and type-checks."""
    for recipe in group_options("recipe"):
        for opt in group_options(group):
            cfg = compose([f"recipe={recipe}", f"{group}={opt}"])
            problems = validate(cfg)
            # options that need a user value (model.path=???) may only fail for that reason; a data job refuses
            # data.* sources (it reads its own recipe.* input keys), a training recipe those of other recipes
            problems = [p for p in problems if "required" not in p and "reads no data.* key" not in p
                        and not (group == "data" and f"not a data source of recipe={recipe}." in p)
                        and not (group == "model" and ("loads no model.* model" in p or "trains a model" in p))]
            assert problems == [], f"recipe={recipe} {group}={opt}: {problems}"
    if group == "data":   # ... with the keys it does read; and each training recipe reads some of the options
        readers = {opt: [r for r in group_options("recipe") if RECIPES[r].kind == "train" and not
                         RECIPES[r].data_problem(compose([f"recipe={r}", f"data={opt}"]).data.kind, opt)]
                   for opt in group_options("data")}
        assert readers["stdlib_topics"] == ["lora", "lora_ga", "sft"] and readers["shapes"] == ["swav"]
        assert readers["verifree_arith"] == ["verifree"] and len(readers["jsonl"]) == 4 and readers["hf"] == \
            ["lora", "lora_ga", "sft", "swav", "verifree"]
        p = validate(compose(["recipe=verifree", "data=stdlib_topics"]))   # it ran on its arithmetic task instead
        assert p == ["data.kind=builtin data.name=stdlib_topics: not a data source of recipe=verifree. Valid choices: "
                     "data.kind=generated (data.name=verifree_arith), jsonl, parquet, csv, hf"]
        for recipe in ("preselect", "concept_prune"):
            found = validate(compose([f"recipe={recipe}", "data=jsonl", "data.path=/x.jsonl"]))
            assert found == [f"data.kind=jsonl: recipe={recipe} is a data job that reads no data.* key; its input is "
                             f"{RECIPES[recipe].input_keys}. Valid choices: those keys, and no data override."]
    if group == "model":   # a data job would have embedded / scored with its own models, the model.* ignored
        for recipe, override in (("concept_prune", "model.path=/models/x"), ("preselect", "model=minilm")):
            found = validate(compose([f"recipe={recipe}", override]))
            assert len(found) == 1 and found[0].startswith(f"{override}: recipe={recipe} is a data job that loads "
                                                           f"no model.* model; its models are recipe."), found
        assert validate(compose(["recipe=concept_prune"])) == []
        assert validate(compose(["recipe=sft", "model=none"]))[0].startswith("model=none: recipe=sft trains a model")


def test_experiment_presets_compose_validate_and_keep_the_papers_values():
    """Each experiment preset pins one recipe and validates; its only problems are the values the user must give
    (all of them reported at once), and the preset's paper values survive YAML escaping."""
    from runx.conf.schema.verifree import PAPER_ANSWER, PAPER_PROMPT
    options = group_options("experiment")
    assert len(options) >= 5
    pinned = set()
    for opt in options:
        cfg = compose([f"experiment={opt}"])
        pinned.add(cfg.recipe.name)
        problems = validate(cfg)
        assert all("required" in p for p in problems), (opt, problems)
        assert opt.split("_")[0] in cfg.recipe.name.replace("_", ""), (opt, cfg.recipe.name)
    assert pinned == {"lora_ga", "verifree", "swav", "preselect", "concept_prune"}
    pre = validate(compose(["experiment=preselect_llama_family"]))
    assert len(pre) == 2 and any("recipe.pool" in p for p in pre) and any("recipe.sample" in p for p in pre)
    vf = compose(["experiment=verifree_qwen3_base", "data.hf_name=/data/webdata"])
    assert validate(vf) == []
    assert vf.recipe.prompt_template == PAPER_PROMPT and vf.recipe.answer_template == PAPER_ANSWER
    assert vf.model.from_config is None and vf.data.kind == "hf" and vf.model.kind == "causal_lm"
    ga = compose(["experiment=lora_ga_llama2_metamath"])
    assert (ga.trainer.micro_batch_size * ga.trainer.grad_accum, ga.optim.lr, ga.recipe.rank) == (32, 2e-5, 8)
    sw = compose(["experiment=swav_imagenet_bs256", "data.path=/x"])
    assert sw.trainer.num_procs * sw.trainer.micro_batch_size == 256 and sw.recipe.nmb_crops == [2, 6]
    # the command line still wins over a preset
    assert compose(["experiment=lora_ga_llama2_metamath", "recipe=lora"]).recipe.name == "lora"


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
    # a run's (or a sweep's) folder that is a file: Hydra's mkdir traceback before
    (f"run_dir={os.path.abspath(__file__)}", "run_dir", "a file, not a folder"),
    (f"run_dir={os.path.abspath(__file__)}/sub", "run_dir", "is not a writable folder"),
])
def test_bad_override_is_a_clear_error(override, key, choice):
    p = run_cli(["train", override], check=False, timeout=60)
    assert p.returncode != 0
    err = p.stderr
    assert "Traceback" not in err and "Traceback" not in p.stdout
    assert key in err and choice in err, err
    assert len(err.strip().splitlines()) <= 4  # one paragraph


def test_a_sweep_folder_that_cannot_be_made_is_refused_before_the_sweep():
    """run_dir=<a file> for a sweep: one config-problem paragraph before any job (Hydra's mkdir traceback before)."""
    p = run_cli(["train", "-m", f"run_dir={os.path.abspath(__file__)}", "seed=0,1"], check=False, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "run_dir=" in p.stderr and \
        "a file, not a folder" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("overrides,words", [
    (["recipe=swav", "model=minilm"], ["recipe=swav needs a vision model", "resnet50"]),
    (["recipe=concept_prune", "recipe.input=text"], ["recipe.path", "recipe.input=text"]),
])
def test_a_recipes_own_config_checks_are_reported_without_a_traceback(tmp_path, overrides, words):
    """Cross-key checks that live in a recipe's constructor (model kind, inputs that need a path) exit 2 with
    the config-problem paragraph, from `runx train` and from `runx plan`."""
    for verb in (["train", f"run_dir={tmp_path / 'r'}", "logger=none"], ["plan"]):
        p = run_cli([*verb, *overrides], check=False, timeout=120)
        assert p.returncode == 2, (verb, p.stdout[-1000:], p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "Invalid configuration" in p.stderr
        assert all(w in p.stderr for w in words), p.stderr


def test_out_of_range_values_are_named_with_their_valid_range():
    problems = validate(compose(["optim.lr=-1", "trainer.micro_batch_size=0", "data.val_fraction=1.5"]))
    assert len(problems) == 3, problems
    assert any(p.startswith("optim.lr=-1") and "> 0" in p for p in problems)
    assert any(p.startswith("trainer.micro_batch_size=0") and ">= 1" in p for p in problems)
    assert any(p.startswith("data.val_fraction=1.5") and "[0, 1)" in p for p in problems)
    for recipe, override, rng in (("concept_prune", "recipe.keep_fraction=1.5", "(0, 1]"),
                                  ("lora_ga", "recipe.rank=0", ">= 1"), ("swav", "recipe.epsilon=0", "> 0"),
                                  ("verifree", "recipe.group_size=1", ">= 2")):
        problems = validate(compose([f"recipe={recipe}", override]))
        assert len(problems) == 1 and problems[0].startswith(override) and rng in problems[0], problems
    problems = validate(compose(["recipe=swav", "data.group_by_length=true"]))
    assert len(problems) == 1 and "data.group_by_length" in problems[0] and "recipe=sft" in problems[0]
    assert validate(compose(["recipe=lora", "data.group_by_length=true"])) == []
    problems = validate(compose(["recipe=lora_ga", "recipe.grad_sum_budget=lots", "plan.cpu_mem=big"]))
    assert len(problems) == 2 and all("not a size" in p for p in problems), problems
    assert validate(compose(["recipe=lora_ga", "recipe.grad_sum_budget=16GB", "plan.cpu_mem=64GB"])) == []
    # 0 was read as "unknown": a described GPU of 0 bytes fitted everything; plan.gpus=-3 planned this machine
    problems = validate(compose(["plan.gpus=-3", "plan.gpu_mem=0GB"]))
    assert len(problems) == 2 and problems[0].startswith("plan.gpus=-3: out of range") and \
        problems[1].startswith("plan.gpu_mem=0GB: no memory"), problems
    # a key of another recipe keeps its own meaning; null where allowed; every shipped config is in range
    assert validate(compose(["recipe=verifree", "recipe.group_size=1", "recipe.advantage=naive"])) == []
    assert validate(compose(["optim.head_lr=null", "data.max_train_samples=null"])) == []


@pytest.mark.parametrize("recipe,overrides,expected", [
    # each passed validate and then died in torchvision inside the data loader, trained nothing (one prototype:
    # the loss is 0 with no gradient), or stopped on a NaN loss with advice about the learning rate
    ("swav", ["recipe.min_scale_crops=[0.9,0.5]", "recipe.max_scale_crops=[0.1,0.2]"],
     ["recipe.min_scale_crops=[0.9, 0.5] with recipe.max_scale_crops=[0.1, 0.2]"]),
    ("swav", ["recipe.size_crops=[32,0]"], ["recipe.size_crops=[32, 0]: out of range"]),
    ("swav", ["recipe.blur_sigma=[2.0,0.5]"], ["recipe.blur_sigma=[2.0, 0.5]: the blur's [min, max] sigma"]),
    ("swav", ["recipe.normalize_std=[0,0,0]"], ["recipe.normalize_std=[0, 0, 0]: out of range. Valid values: each > 0"]),
    ("swav", ["recipe.nmb_prototypes=1", "recipe.hidden_mlp=-5"],
     ["recipe.nmb_prototypes=1: out of range. Valid values: >= 2", "recipe.hidden_mlp=-5: out of range"]),
    # each passed validate and then stopped in a traceback after the warm-up, or trained another objective
    ("verifree", ["recipe.eval_max_new_tokens=0", "recipe.task_eval_size=0", "recipe.task_steps=0"],
     ["recipe.eval_max_new_tokens=0: out of range", "recipe.task_eval_size=0: out of range",
      "recipe.task_steps=0: out of range"]),
    ("verifree", ["recipe.answer_split="], ["recipe.answer_split='': empty"]),
    ("lora_ga", ["recipe.save_init=false", "export_at_end=true"], ["recipe.save_init=false with export_at_end=true"]),
    # W&B refused these at wandb.init, after the model was built, in a pydantic traceback
    ("sft", ["logger=wandb", "logger.tags=[a,[b]]", "logger.project=team/proj"],
     ["logger.tags=['a', ['b']]: W&B takes tags of 1 to 64 characters", "logger.project=team/proj: W&B refuses"]),
    ("sft", ["logger=wandb", "logger.tags=[2026,seed0]"], []),      # numbers are written as text
    # each passed validate and trained nothing (eps=inf), or stopped after the model loaded in a traceback
    ("sft", ["optim.lr=nan", "optim.eps=inf"], ["optim.lr=nan: not a finite number", "optim.eps=inf: not a finite"]),
    ("sft", ["trainer.offload_param=cpu", "trainer.offload_optimizer=nvme"],
     ["trainer.offload_param=cpu with trainer.zero_stage=0", "trainer.offload_optimizer=nvme with trainer.zero_stage=0"]),
    ("lora_ga", ["trainer=zero2", "trainer.offload_param=cpu"], ["trainer.offload_param=cpu with trainer.zero_stage=2"]),
    ("sft", ["optim.betas=[0.9]"], ["optim.betas=[0.9]: Adam's two decay rates"]),
    ("lora", ["recipe.train_head=false", "optim.head_lr=1e-3"], ["optim.head_lr=0.001 with recipe.train_head=false"]),
    ("sft", ["optim.warmup_steps=10", "trainer.max_steps=10"], ["optim.warmup_steps=10 with trainer.max_steps=10"]),
    ("sft", ["optim.warmup_steps=10", "debug=smoke"], []),            # (a few steps to check a setup)
    ("sft", ["launcher=deepspeed", "launcher.num_nodes=2"], ["launcher.num_nodes=2 with launcher=deepspeed and no",
                                                             "launcher.num_nodes=2 with launcher=deepspeed: the other"]),
    ("sft", ["launcher.master_port=70000"], ["launcher.master_port=70000: out of range"]),
    ("swav", ["recipe.normalize_mean=[0.5,0.5]"], ["recipe.normalize_mean=[0.5, 0.5]: one value per RGB channel"]),
    ("sft", ["data.num_workers=4", "++data.extra.name=sst2"],
     ["data.num_workers=4: read by nothing", "data.extra={'name': 'sst2'}: keyword arguments of datasets.load_dataset"]),
    ("sft", ["objective=eval/accuracy", "data.max_eval_samples=0"], ["objective=eval/accuracy: not an evaluation"]),
    # a misspelt DeepSpeed key was silently ignored (the clip asked for never applied), others failed inside
    # deepspeed.initialize after the model was built
    ("sft", ["++trainer.ds_overrides.gradient_clippin=0.5", "++trainer.ds_overrides.gradient_accumulation_steps=2",
             "++trainer.ds_overrides={zero_optimization.reduce_bucket_sise:2e8}"],
     ["trainer.ds_overrides.gradient_clippin: not a DeepSpeed config key (DeepSpeed would ignore it). Did you mean "
      "trainer.ds_overrides.gradient_clipping?", "trainer.ds_overrides.gradient_accumulation_steps=2: runx sets it",
      "trainer.ds_overrides.zero_optimization.reduce_bucket_sise: not a key of DeepSpeed's zero_optimization block. "
      "Did you mean reduce_bucket_size?"]),
    # fp16's loss scaling skips steps on overflow that runx would count; bf16 is trainer.precision's
    ("sft", ["++trainer.ds_overrides={fp16:{enabled:true},bf16.enabled:true,bfloat16.enabled:false}"],
     ["trainer.ds_overrides.bf16.enabled=True: runx sets it from trainer.precision",
      "trainer.ds_overrides.bfloat16.enabled=False: runx sets it from trainer.precision",
      "trainer.ds_overrides.fp16: runx trains in fp32, bf16 or amp_bf16"]),
    ("sft", ["++trainer.ds_overrides={gradient_clipping:0.5,aio.queue_depth:16,comet.enabled:false}",
             "++trainer.ds_overrides.zero_optimization.stage3_max_live_parameters=1e9"], []),
    ("verifree", ["recipe.rollout_backend=vllm", "trainer=zero3"],
     ["recipe.rollout_backend=vllm with trainer.zero_stage=3"] +
     ([] if importlib.util.find_spec("vllm") else ["recipe.rollout_backend=vllm: the vllm package is not installed"])),
])
def test_recipe_values_that_broke_runs_late_are_named_by_validate(recipe, overrides, expected):
    problems = validate(compose([f"recipe={recipe}", *overrides]))
    assert len(problems) == len(expected) and all(any(p.startswith(e) for p in problems) for e in expected), \
        problems


def test_validate_reports_every_bad_override_at_once():
    """Hydra stops at its first unknown key or missing group option: a second typo, and every value problem,
    showed only once the first was fixed."""
    from runx.cli.main import _compose_validated
    cfg, problems = _compose_validated(["optim.lrr=1", "trainer.max_stepz=3", "optim.lr=oops", "data.max_length=-1"])
    assert cfg is None and [p.partition(":")[0] for p in problems] == [
        "optim.lrr=1", "trainer.max_stepz=3", "optim.lr=oops", "data.max_length=-1"], problems
    # a refused group option: the others' problems too, not those its stand-in default would give
    _, problems = _compose_validated(["trainer=zero3_cpu_ofload", "logger=wandbb", "trainer.offload_param=cpu",
                                      "optim.lr=-1"])
    assert [p.partition(":")[0] for p in problems] == ["trainer=zero3_cpu_ofload", "logger=wandbb", "optim.lr=-1"]
    # a recipe's own list of problems counts as that many (it was "1 problem" holding three)
    from runx.cli.main import _recipe_problems
    problems = _recipe_problems(compose(["recipe=preselect", "recipe.references=[{name: a, kind: x},{name: b, kind: y}]"]))
    assert problems == ["recipe.references[0].kind='x': valid choices are hf, ngram",
                        "recipe.references[1].kind='y': valid choices are hf, ngram"], problems
    # not past a bad recipe, which decides what recipe.* keys mean
    _, problems = _compose_validated(["recipe=lroa", "recipe.rank=4"])
    assert len(problems) == 1 and problems[0].startswith("recipe=lroa")


def test_values_given_through_interpolations_and_hostfiles_are_checked(tmp_path, monkeypatch):
    """A value written as an interpolation skipped every type and range check (${oc.env:MBS} with MBS=0 reached
    DeepSpeed's assertion after the model loaded); a number from oc.env (text) is read as the number. DeepSpeed's
    launcher read the hostfile only after runx had started it."""
    monkeypatch.setenv("MBS", "0")
    monkeypatch.setenv("STEPS", "abc")
    monkeypatch.setenv("LR", "1e-3")
    problems = validate(compose(["trainer.micro_batch_size=${oc.env:MBS}", "trainer.max_steps=${oc.env:STEPS}",
                                 "optim.lr=${oc.env:LR}"]))
    assert problems == ["trainer.max_steps=abc: expected int, got str.",
                        "trainer.micro_batch_size=0: out of range. Valid values: >= 1."], problems
    monkeypatch.setenv("MBS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")    # text fields stay text, however they read
    assert validate(compose(["trainer.micro_batch_size=${oc.env:MBS}", "optim.lr=${oc.env:LR}",
                             "logger.group=${oc.env:SLURM_JOB_ID}"])) == []
    from runx.cli.config import check_paths
    for text, expected in (("node01 slots=8 # gpus\nnode02 slots=8 max_slots=8\n", None), ("node01 slot=8\n", "line 1 is"),
                           ("# none yet\n\n", "names no host")):
        (tmp_path / "hostfile").write_text(text)
        problems = check_paths(compose(["launcher=deepspeed", f"launcher.hostfile={tmp_path / 'hostfile'}"]))
        assert (problems == []) if expected is None else (len(problems) == 1 and expected in problems[0]), problems


def test_sweep_jobs_expand_choices_ranges_and_interval_ends():
    from runx.cli.config import SWEEP_CHECK_ALL_MAX, sweep_jobs
    jobs = sweep_jobs(["recipe=lora", "optim.lr=1e-4,3e-4", "trainer.micro_batch_size=range(1,4)"])
    assert sorted(map(tuple, jobs)) == sorted(("recipe=lora", f"optim.lr={lr}", f"trainer.micro_batch_size={b}")
                                              for lr in ("0.0001", "0.0003") for b in (1, 2, 3))
    # past SWEEP_CHECK_ALL_MAX jobs: each swept value once, the other keys at their first value
    big = sweep_jobs([f"seed=range(0,{SWEEP_CHECK_ALL_MAX})", "optim.lr=1,2,3"])
    assert len(big) == SWEEP_CHECK_ALL_MAX + 2
    assert {j[1] for j in big} == {"optim.lr=1", "optim.lr=2", "optim.lr=3"}
    assert sweep_jobs(["optim.lr=tag(log, interval(1e-5, 1e-2))"]) == [["optim.lr=1e-05"], ["optim.lr=0.01"]]


def test_a_sweep_is_checked_before_its_first_job(tmp_path):
    """A bad value in a later job of a sweep, an Optuna sweep without an objective, or an evaluation objective the
    recipe does not report, stops the sweep before any job runs; a job whose objective names no final metric stops
    with the valid choices."""
    sweep = tmp_path / "sweep"
    p = run_cli(["train", "-m", "recipe=lora", "optim.lr=1e-4,-1", "seed=0,1", f"hydra.sweep.dir={sweep}",
                 "logger=none"], check=False, timeout=60)
    assert p.returncode == 2 and "optim.lr=-1" in p.stderr and "> 0" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not sweep.exists()
    p = run_cli(["train", "-m", "optim.lrr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"], check=False, timeout=60)
    assert p.returncode == 2 and "(1 problem)" in p.stderr and "Did you mean 'optim.lr'" in p.stderr, p.stderr
    p = run_cli(["train", "-m", "hydra/sweeper=runx_optuna", f"hydra.sweep.dir={sweep}"], check=False, timeout=60)
    assert p.returncode == 2 and "objective=<metric>" in p.stderr and not sweep.exists(), p.stderr
    p = run_cli(["train", "-m", "recipe=lora", "objective=eval/acc", "optim.lr=1e-4,1e-3", f"hydra.sweep.dir={sweep}"],
                check=False, timeout=60)
    assert p.returncode == 2 and "objective=eval/acc: not an evaluation metric of this run (recipe=lora)" in p.stderr \
        and "eval/accuracy" in p.stderr and not sweep.exists(), p.stderr
    p = run_cli(["train", "-m", "recipe=lora", "model=tiny_bert", "objective=final_los", f"hydra.sweep.dir={sweep}",
                 "logger=none",
                 "trainer.max_steps=1", "trainer.eval_every=1", "trainer.ckpt_every=0", "trainer.micro_batch_size=4",
                 "data.max_train_samples=16", "data.max_eval_samples=8", "trainer.progress=false"],
                check=False, timeout=300)
    assert p.returncode == 2 and "objective=final_los" in p.stderr and "final_loss" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and (sweep / "0" / "summary.json").exists()


def test_a_config_problem_in_one_job_does_not_stop_the_sweep(tmp_path):
    """A problem only the run finds (peft: no module of the model matches) fails that job with the config-problem
    paragraph; Hydra runs the other jobs, and `runx train -m` lists the failed one and exits 2 at the end."""
    sweep = tmp_path / "sweep"
    p = run_cli(["train", "-m", "recipe=lora", "model=tiny_bert", "recipe.target_modules=[nothere],[query]",
                 f"hydra.sweep.dir={sweep}", "logger=none", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.ckpt_every=0",
                 "trainer.micro_batch_size=4", "data.max_train_samples=8", "data.max_eval_samples=4",
                 "trainer.progress=false"], check=False, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "recipe.target_modules=['nothere']" in p.stderr and "Valid choices" in p.stderr, p.stderr
    assert f"#0 config problem: {sweep / '0'}" in p.stderr and "#1" not in p.stderr.split("of the sweep failed")[1]
    assert "Traceback" not in p.stderr
    assert (sweep / "1" / "summary.json").exists() and not (sweep / "0" / "summary.json").exists()
    assert "No modules were targeted" in (sweep / "0" / "train.log").read_text()


def test_the_optuna_preset_goes_on_after_a_failed_trial(tmp_path):
    """runx_optuna used Hydra's max_failure_rate 0.0, so the first diverged (or crashed) trial ended the study;
    now that trial is recorded as failed and the search goes on (the seeded TPE draws 1e-3, 1e36, 1e-3 here).
    Another sampler replaces the preset's seeded TPE whole (its `seed` key made hydra/sweeper/sampler=grid fail
    to compose)."""
    import yaml
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    from runx.cli.main import _find_hydra_plugins
    sweep = tmp_path / "optuna"
    p = run_cli(["train", "-m", "hydra/sweeper=runx_optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}",
                 "objective=final_loss", "optim.lr=choice(1e36,1e-3)", "model=tiny_bert", "logger=none",
                 "trainer.progress=false", "optim.warmup_ratio=0", "data.max_train_samples=64", "trainer.eval_every=0",
                 "optim.name=sgd", "optim.scheduler=constant", "trainer.grad_clip=0", "trainer.max_steps=3",
                 "trainer.ckpt_every=0", "trainer.micro_batch_size=8"], check=False)
    assert p.returncode == 1 and "#1 diverged" in p.stderr, p.stderr[-3000:]
    finals = {r: json.load(open(sweep / r / "summary.json")).get("final_loss") for r in ("0", "1", "2")}
    assert finals["1"] is None and finals["0"] is not None and finals["2"] is not None   # #2 ran after #1 failed
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert res["best_params"] == {"optim.lr": 0.001} and res["best_value"] == min(finals["0"], finals["2"])
    # the report says which job diverged, and lists it last
    from runx.cli.report import report
    assert report(str(sweep), objective="final_loss", plots=False) == 0
    rows = json.load(open(sweep / "report.json"))["rows"]
    assert rows[-1]["run"] == "1" and rows[-1]["status"] == "diverged at step 2", rows
    _find_hydra_plugins()
    with initialize_config_module(config_module="runx.conf", version_base="1.3"):
        for sampler, target in (("grid", "GridSampler"), ("random", "RandomSampler")):
            cfg = hcompose("config", overrides=["hydra/sweeper=runx_optuna", f"hydra/sweeper/sampler={sampler}"],
                           return_hydra_config=True)
            assert cfg.hydra.sweeper.sampler._target_ == f"optuna.samplers.{target}"
        cfg = hcompose("config", overrides=["hydra/sweeper=runx_optuna"], return_hydra_config=True)
        assert cfg.hydra.sweeper.sampler.seed == 0 and cfg.hydra.sweeper.max_failure_rate == 1.0


def test_an_optuna_grid_sweep_ends_cleanly_when_trials_fail(tmp_path):
    """Optuna's GridSampler calls study.stop() after the last grid point, which raises outside study.optimize;
    Hydra's sweeper swallowed that only after a completed trial, so a grid sweep whose last trial failed ended in
    a traceback without optimization_results.yaml. A one-point grid whose trial diverges is that case every time
    (and then no trial completed: one line says so, no traceback); in the two-point grid the failing point is
    drawn first or last at random, and either way the good point is the result."""
    import yaml
    common = ["hydra/sweeper=runx_optuna", "hydra/sweeper/sampler=grid", "objective=final_loss", "model=tiny_bert",
              "logger=none", "trainer.progress=false", "optim.warmup_ratio=0", "data.max_train_samples=64",
              "trainer.eval_every=0", "optim.name=sgd", "optim.scheduler=constant", "trainer.grad_clip=0",
              "trainer.max_steps=3", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"]
    p = run_cli(["train", "-m", f"hydra.sweep.dir={tmp_path / 'one'}", "optim.lr=choice(1e36)"] + common, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "every trial of the Optuna sweep failed, so it has no best trial" in p.stderr and "#0 diverged" in p.stderr
    assert "HYDRA_FULL_ERROR" not in p.stderr
    from runx.cli.report import report     # a report of a sweep without a finished job lists the failed one
    assert report(str(tmp_path / "one"), plots=False) == 0
    rows = json.load(open(tmp_path / "one" / "report.json"))["rows"]
    assert [(r["run"], r["status"]) for r in rows] == [("0", "diverged at step 2")]
    # (its jobs in their own processes: the sweep still exits 1 for the failed one, which Optuna went past)
    p = run_cli(["train", "-m", f"hydra.sweep.dir={tmp_path / 'two'}", "optim.lr=choice(1e-3,1e36)",
                 "hydra/launcher=runx_parallel"] + common, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "diverged" in p.stderr, p.stderr[-3000:]
    res = yaml.safe_load((tmp_path / "two" / "optimization_results.yaml").read_text())
    assert res["best_params"] == {"optim.lr": 0.001}


def test_a_job_that_fails_ends_its_w_and_b_run_and_the_next_job_logs_to_its_own(tmp_path):
    """A job of an in-process sweep that raised left its W&B run open; wandb.init then handed that run to the next
    job, whose curve and summary went into the failed job's W&B run (and none into its own)."""
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "ckpt").touch()   # job 0 fails at its first checkpoint, W&B running
    p = run_cli(["train", "-m", f"run_dir={sweep}", "seed=0,1", "model=tiny_bert", "debug=smoke", "logger=wandb",
                 "trainer.progress=false", "data.max_length=32", "trainer.max_steps=2", "trainer.ckpt_every=2",
                 "trainer.eval_every=0", "++trainer.ds_overrides.comet.api_key=SECRETX"], check=False, timeout=300)
    # (Hydra prints a failed job's overrides itself, and now its launcher's lines: the token stays out of both)
    assert "SECRETX" not in p.stdout + p.stderr and "Error executing job with overrides" in p.stderr
    assert p.returncode == 1 and "#0" in p.stderr, p.stderr[-3000:]
    own = list((sweep / "1" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert own and own[0].stat().st_size > 0, p.stdout[-2000:]
    assert f"wandb sync {own[0].parent}" in p.stdout and str(sweep / "0" / "wandb") not in p.stdout
    # the sweep says what it launches (Hydra's launcher lines were hidden), and each job's W&B run its sweep
    out = p.stdout + p.stderr
    assert "Launching 2 jobs locally" in out and any("#1 : " in line and "seed=1" in line for line in out.splitlines())


def test_a_submitit_sweep_lists_its_failed_jobs(tmp_path):
    """Jobs that ran in other processes (Hydra's submitit launcher, here its local flavour) fail there: runx finds
    them in the sweep's folder, which a Hydra callback recorded, and lists them as it lists in-process jobs."""
    sweep = tmp_path / "sweep"
    p = run_cli(["train", "-m", "hydra/launcher=submitit_local", f"run_dir={sweep}", "optim.lr=1e-3,1e36",
                 "model=tiny_bert", "logger=none", "trainer.progress=false", "optim.warmup_ratio=0",
                 "data.max_train_samples=64", "trainer.eval_every=0", "optim.name=sgd", "optim.scheduler=constant",
                 "trainer.grad_clip=0", "trainer.max_steps=3", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"],
                check=False, timeout=300)
    assert p.returncode == 1 and "of the sweep failed" in p.stderr, p.stderr[-3000:]
    assert p.stderr.split("of the sweep failed:")[1].split() == ["#1", "diverged:", str(sweep / "1")]
    assert json.load(open(sweep / "0" / "summary.json"))["steps"] == 3


def test_an_optuna_sweep_goes_the_way_its_objective_wants():
    """Hydra's optuna sweeper minimises unless told otherwise: runx sets the direction from the objective when
    the command line gives none, refuses a misspelt one, and `runx report` sorts a sweep the way it ran."""
    from runx.cli.config import optuna_direction_override, sweeper_problems
    assert optuna_direction_override(["-m", "hydra/sweeper=optuna", "objective=eval/accuracy"]) == \
        "hydra.sweeper.direction=maximize"
    assert optuna_direction_override(["-m", "hydra/sweeper=runx_optuna", "objective=eval/loss"]) == \
        "hydra.sweeper.direction=minimize"
    assert optuna_direction_override(["hydra/sweeper=optuna", "objective=eval/loss",
                                      "hydra.sweeper.direction=maximize"]) is None
    assert optuna_direction_override(["objective=eval/accuracy"]) is None       # basic sweeper: no direction
    bad = sweeper_problems(["hydra/sweeper=optuna", "objective=eval/loss", "hydra.sweeper.direction=minimise"])
    assert len(bad) == 1 and "minimise" in bad[0] and "maximize, minimize" in bad[0]
    assert sweeper_problems(["hydra/sweeper=optuna", "objective=eval/loss", "hydra.sweeper.direction=minimize"]) == []


def test_report_sorts_an_optuna_sweep_by_the_direction_it_ran_with(tmp_path):
    from runx.cli.report import sweep_direction
    assert sweep_direction(str(tmp_path), "eval/accuracy") == "maximize"
    assert sweep_direction(str(tmp_path), "final_loss") == "minimize"
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper\n"
        "    direction: minimize\n")
    assert sweep_direction(str(tmp_path), "eval/accuracy") == "minimize"
    # the Optuna sweeper writes no multirun.yaml: its jobs' .hydra/hydra.yaml hold the direction
    optuna = tmp_path / "optuna"
    (optuna / "0" / ".hydra").mkdir(parents=True)
    (optuna / "0" / "config.yaml").write_text("seed: 0\n")
    (optuna / "0" / "summary.json").write_text("{}")
    (optuna / "0" / ".hydra" / "hydra.yaml").write_text((tmp_path / "multirun.yaml").read_text())
    assert sweep_direction(str(optuna), "samples_per_s") == "minimize"


def test_a_sweep_with_a_pinned_run_dir_gives_each_job_its_own_folder(tmp_path, monkeypatch):
    """run_dir=<path> with -m: job k runs in <path>/k (before, every job shared <path> and the second resumed
    the first one's checkpoint); a sweep over recipes is one folder named after all of them."""
    root = tmp_path / "pinned"
    tiny = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1", "trainer.micro_batch_size=4",
            "data.max_train_samples=16", "data.max_eval_samples=8", "logger=none", "trainer.progress=false"]
    run_cli(["train", "-m", "recipe=lora,sft", f"run_dir={root}", *tiny], timeout=300)
    import yaml
    recipes = {yaml.safe_load((root / k / "config.yaml").read_text())["recipe"]["name"] for k in ("0", "1")}
    assert recipes == {"lora", "sft"}
    assert all((root / k / "summary.json").exists() and (root / k / "ckpt" / "latest").exists() for k in "01")
    assert not (root / "summary.json").exists() and (root / "multirun.yaml").exists()
    from runx.conf import _sweep_name
    monkeypatch.setattr(sys, "argv", ["runx train", "-m", "recipe=concept_prune,preselect", "seed=0,1"])
    assert _sweep_name("sft") == "concept_prune+preselect"
    monkeypatch.setattr(sys, "argv", ["runx train", "-m", "recipe=lora", "seed=0,1"])
    assert _sweep_name("lora") == "lora"


def test_multi_node_torchrun_agrees_on_its_rendezvous_without_talking(tmp_path):
    """Each node runs the same command: the rendezvous port must not be a per-node free port, the run folder
    must be named (not ${now}), and master_addr must not be the loopback address."""
    from runx.cli.train import launcher_command
    two = ["launcher=torchrun", "launcher.num_nodes=2", "trainer.num_procs=2"]
    problems = validate(compose(two))
    assert any("run_dir=" in p for p in problems) and any("launcher.master_addr=127.0.0.1" in p for p in problems)
    cfg = compose(two + ["launcher.master_addr=node01", f"run_dir={tmp_path}"])
    assert validate(cfg) == []
    cmds = [launcher_command(cfg, str(tmp_path)) for _ in range(2)]
    assert cmds[0] == cmds[1] and "node01:29500" in cmds[0]
    one = compose(["launcher=torchrun", "trainer.num_procs=2"])
    assert validate(one) == [] and "--master_port" in launcher_command(one, str(tmp_path))


def test_resume_refuses_a_checkpoint_of_another_config_and_keeps_the_run_dir_as_it_was(tmp_path):
    """resume=auto into a folder with a checkpoint: another recipe / seed is refused before config.yaml is
    rewritten (it loaded lora_ga's offset weights into a lora run); max_steps may grow; resume=never starts over."""
    run = tmp_path / "run"
    tiny = ["model=tiny_bert", "trainer.eval_every=0", "trainer.ckpt_every=1", "trainer.micro_batch_size=4",
            "data.max_train_samples=16", "data.max_eval_samples=8", "logger=none", "trainer.progress=false",
            f"run_dir={run}"]
    run_cli(["train", "recipe=lora", "trainer.max_steps=1", *tiny], timeout=300)
    before = (run / "config.yaml").read_text()
    p = run_cli(["train", "recipe=sft", "seed=3", "trainer.max_steps=1", *tiny], check=False, timeout=300)
    assert p.returncode == 2 and "recipe.name: lora -> sft" in p.stderr and "seed: 0 -> 3" in p.stderr, p.stderr
    assert "resume=never" in p.stderr and "Traceback" not in p.stderr
    assert (run / "config.yaml").read_text() == before
    p = run_cli(["train", "recipe=lora", "trainer.max_steps=2", *tiny], timeout=300)
    assert "resumed from" in p.stdout + p.stderr
    # resume=<another run's checkpoint> is held to the same rule: its saved scheduler state would have replaced the
    # new optim.lr silently, and another recipe's state dict failed to load with a traceback
    p = run_cli(["train", "recipe=lora", "optim.lr=0.5", "trainer.max_steps=3", f"resume={run}",
                 *tiny[:-1], f"run_dir={tmp_path / 'other'}"], check=False, timeout=300)
    assert p.returncode == 2 and f"resume={run}: {run / 'ckpt'} holds a checkpoint" in p.stderr, p.stderr
    assert "optim.lr: 0.001 -> 0.5" in p.stderr and "Traceback" not in p.stderr
    # resume=never starts over in the folder: the earlier run's checkpoints (step_2 > the new step_1) used to stay
    # in ckpt/, keep_last then deleted the new run's checkpoint and `latest` named a deleted folder
    (run / "eval").mkdir()
    (run / "eval" / "step_2.json").write_text("{}")   # `runx eval` of the earlier run: moves aside with it
    run_cli(["train", "recipe=sft", "trainer.max_steps=1", "trainer.keep_last=1", "resume=never", *tiny],
            timeout=300)
    assert not (run / "eval").exists()
    assert "name: sft" in (run / "config.yaml").read_text()
    assert sorted(os.listdir(run / "ckpt")) == ["latest", "step_1"] and (run / "ckpt" / "latest").read_text() == \
        "step_1"
    assert [r["step"] for r in read_metrics(run)] == [1]
    old = [d for d in os.listdir(run / ".runx") if d.startswith("superseded-")]
    assert len(old) == 1 and "step_2" in os.listdir(run / ".runx" / old[0] / "ckpt")
    assert os.listdir(run / ".runx" / old[0] / "eval") == ["step_2.json"]


def test_a_causal_lm_trains_with_fp32_master_weights_whatever_the_zero_stage(tmp_path):
    """model=hf_causal_lm loaded bf16 weights under the default fp32 trainer: ZeRO-0 stepped them in bf16 and
    rounded most updates away. The weights' dtype now follows trainer.precision; an explicit bf16 + fp32 is
    refused, and `runx validate` reports it together with a missing path."""
    from runx.cli.config import check_paths
    base = ["recipe=sft", "model=hf_causal_lm", f"model.path={tmp_path}"]
    assert compose(base).model.dtype == "fp32"
    assert compose(base + ["trainer.precision=bf16"]).model.dtype == "bf16"
    assert compose(base + ["trainer.precision=amp_bf16"]).model.dtype == "fp32"
    problems = validate(compose(base + ["model.dtype=bf16"]))
    assert len(problems) == 1 and "trainer.precision=bf16" in problems[0] and "model.dtype=fp32" in problems[0]
    assert validate(compose(base + ["model.dtype=bf16", "trainer.precision=bf16"])) == []
    p = run_cli(["validate", *base, "model.dtype=bf16", "data=jsonl", f"data.path={tmp_path}/nope.jsonl"],
                check=False, timeout=60)
    assert p.returncode == 2 and "model.dtype=bf16" in p.stderr and "nope.jsonl" in p.stderr, p.stderr


def test_debug_smoke_keeps_a_logger_the_command_line_chose():
    assert compose(["debug=smoke"]).logger.backend == "none"
    assert compose(["debug=smoke", "logger=wandb"]).logger.backend == "wandb"
    assert compose(["debug=smoke"]).trainer.max_steps == 4


def test_report_compares_recipes_lists_failed_jobs_and_refuses_an_unknown_objective(tmp_path, capsys,
                                                                                      monkeypatch):
    """Recipe-specific keys are not 'differing overrides' (recipe.name is); a job that failed before its first
    step is listed as failed; a data job's own metrics are shown; a misspelt --objective names the metrics;
    trainer.monitor's best value and step are columns."""
    from runx.cli.report import report
    import yaml
    runs = {"0": ({"recipe": {"name": "sft"}, "seed": 0}, {"steps": 4, "eval/accuracy": 0.5, "final_loss": 1.0}),
            "1": ({"recipe": {"name": "lora", "rank": 8}, "seed": 0}, {"steps": 4, "eval/accuracy": 0.7,
                                                                       "final_loss": 0.9, "best/eval/accuracy": 0.75,
                                                                       "best_step": 3}),
            "2": ({"recipe": {"name": "lora", "rank": 8}, "seed": 1}, None)}
    for k, (cfg, summary) in runs.items():
        (tmp_path / k).mkdir()
        (tmp_path / k / "config.yaml").write_text(yaml.safe_dump(cfg))
        (tmp_path / k / "env.json").write_text("{}")
        if summary:
            (tmp_path / k / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setenv("COLUMNS", "250")
    assert report(str(tmp_path), plots=False) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "eval/accuracy" in line)
    assert "best/eval/accuracy" in header and "best_step" in header, header
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["varying"] == ["recipe.name", "seed"] and rep["objective"] == "eval/accuracy"
    assert [r["run"] for r in rep["rows"]] == ["1", "0", "2"] and rep["rows"][2]["status"] == "failed"
    assert report(str(tmp_path), objective="eval/acc", plots=False) == 2
    # a loss given as --objective is minimised (it was sorted upwards unless --minimize was added)
    for way, order in ((None, ["1", "0", "2"]), (False, ["0", "1", "2"])):
        assert report(str(tmp_path), objective="final_loss", minimize=way, plots=False) == 0
        rep = json.loads((tmp_path / "report.json").read_text())
        assert rep["minimize"] is (way is None) and [r["run"] for r in rep["rows"]] == order
    data = tmp_path / "data"
    (data / "job").mkdir(parents=True)
    (data / "job" / "config.yaml").write_text(yaml.safe_dump({"recipe": {"name": "concept_prune"}}))
    (data / "job" / "summary.json").write_text(json.dumps({"kept": 512, "accuracy_kept": 0.91}))
    p = run_cli(["report", str(data)], env={"COLUMNS": "80"})   # one run: a metric per line, whole in 80 columns
    assert any("accuracy_kept" in line and "0.91" in line for line in p.stdout.splitlines()), p.stdout
    # W&B online (a key) but its server does not answer: the report says so at once instead of failing after ~90 s
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    capsys.readouterr()
    assert report(str(data), plots=False) == 0
    assert "W&B (http://127.0.0.1:9) cannot be reached" in capsys.readouterr().out


def test_report_of_runs_differing_in_many_keys_stays_readable_in_80_columns(tmp_path, capsys, monkeypatch):
    """Runs of several recipes and settings (`runx report outputs/`) differ in dozens of keys: one column each
    left every column one character wide in 80 columns. They go into one config column of key=value lines,
    with the metrics that fit beside it (the objective first) and a note on where the others are."""
    from runx.cli.report import report
    import yaml
    for k in range(3):
        cfg = {"recipe": {"name": "sft"}, "seed": k, **{f"opt{j}": k * j for j in range(12)}}
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "config.yaml").write_text(yaml.safe_dump(cfg))
        (tmp_path / str(k) / "summary.json").write_text(json.dumps(
            {"steps": 4, "eval/accuracy": 0.5 + k / 10, "eval/loss": 1.0 - k / 10, "final_loss": 1.1,
             "samples_per_s": 100.0, "train_wall_s": 3.0, "peak_mem_gb": 1.5}))
    monkeypatch.setenv("COLUMNS", "80")
    assert report(str(tmp_path), plots=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out if "more metrics" not in line) <= 80, "\n".join(out)
    header = next(line for line in out if "eval/accuracy" in line)
    assert "config" in header and "opt3" not in header, header
    assert any("opt11=22" in line for line in out) and any("seed=2" in line for line in out), "\n".join(out)
    assert f"5 more metrics in {tmp_path / 'report.json'}" in out, "\n".join(out)   # whole, to copy
    best = next(i for i, line in enumerate(out) if line.startswith("│ 2 "))
    assert best < next(i for i, line in enumerate(out) if line.startswith("│ 0 "))   # sorted by eval/accuracy
    monkeypatch.setenv("COLUMNS", "400")   # room for a column per key: as before
    assert report(str(tmp_path), plots=False) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "eval/accuracy" in line)
    assert "opt11" in header and "peak_mem_gb" in header, header


def test_report_shows_and_sorts_by_the_recipes_own_evaluation_metric(tmp_path, capsys, monkeypatch):
    """A VeriFree or SwAV sweep's report sorted by final_loss and left out eval/acc / eval/knn_acc (the list of
    shown metrics named only eval/accuracy and eval/loss): each recipe's first evaluation metrics are shown, and
    the first of them is the default objective."""
    from runx.cli.report import report
    import yaml
    for k, acc in (("0", 0.2), ("1", 0.6), ("2", 0.4)):
        (tmp_path / k).mkdir()
        (tmp_path / k / "config.yaml").write_text(yaml.safe_dump({"recipe": {"name": "verifree"}, "seed": int(k)}))
        (tmp_path / k / "summary.json").write_text(json.dumps(
            {"steps": 4, "eval/acc": acc, "eval/acc_sampled": acc / 2, "eval/response_len": 24.0,
             "final_loss": 1.0 - acc}))
    monkeypatch.setenv("COLUMNS", "250")
    assert report(str(tmp_path), plots=False) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "eval/acc" in line)
    assert "eval/acc ↑" in header and "eval/acc_sampled" in header and "response_len" not in header, header
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["objective"] == "eval/acc" and [r["run"] for r in rep["rows"]] == ["1", "2", "0"]


def test_export_and_eval_of_a_sweep_folder_name_its_runs():
    """`runx eval multirun/...` (the sweep, not a job) said only "not a runx run folder"; it names the runs."""
    import tempfile

    import yaml

    from runx.cli.evaluate import EvalError
    from runx.cli.export import ExportError, load_run_config
    root = tempfile.mkdtemp()
    for k in ("0", "1"):
        os.makedirs(os.path.join(root, k))
        with open(os.path.join(root, k, "config.yaml"), "w") as f:
            yaml.safe_dump({"recipe": {"name": "sft"}}, f)
        open(os.path.join(root, k, "summary.json"), "w").write("{}")
    with pytest.raises(EvalError, match=r"a folder of 2 runs, not one run; runx eval takes one run folder\. "
                                        r"Valid choices: 0, 1 \(e\.g\. runx eval .*/0\)"):
        load_run_config(root, "evaluate", EvalError)
    with pytest.raises(ExportError, match="runx export takes one run folder"):
        load_run_config(root)
    assert load_run_config(os.path.join(root, "1"))[1].name == "sft"


def test_a_cuda_device_is_checked_where_the_run_runs():
    """trainer.device=cuda on a machine without a visible GPU is a config problem before anything is built (it was
    a RuntimeError traceback once the trainer started); where there is a GPU, nothing to say."""
    import torch

    from runx.cli.config import check_paths
    problems = [p for p in check_paths(compose(["trainer.device=cuda"])) if "trainer.device" in p]
    assert problems == ([] if torch.cuda.is_available() else [
        "trainer.device=cuda: no CUDA device is visible on this machine. Valid choices: auto (the GPUs where there "
        "are some, else the CPU), cpu."])
    assert not [p for p in check_paths(compose(["trainer.device=cuda", "plan.gpus=8"])) if "trainer.device" in p]


def test_monitor_and_objective_name_metrics_this_run_reports():
    """trainer.monitor and an evaluation objective are checked before any work against what the run's evaluation
    reports: a classifier accuracy, a causal LM perplexity; VeriFree's sampled accuracy only with eval_samples."""
    ok = lambda *o: not validate(compose(list(o)))
    assert ok("trainer.monitor=eval/accuracy", "objective=best/eval/accuracy")
    assert not ok("trainer.monitor=eval/perplexity") and not ok("trainer.monitor=eval/acc")
    assert ok("model=tiny_llama", "data=tiny_text", "trainer.monitor=eval/perplexity")
    assert not ok("model=tiny_llama", "data=tiny_text", "trainer.monitor=eval/accuracy")
    assert not ok("objective=best/eval/accuracy")                          # no trainer.monitor
    assert not ok("trainer.monitor=eval/loss", "trainer.eval_every=0")
    assert not ok("trainer.early_stop_patience=3")
    assert ok("recipe=verifree", "objective=eval/acc_sampled")
    assert not ok("recipe=verifree", "recipe.eval_samples=0", "objective=eval/acc_sampled")
    assert ok("recipe=swav", "trainer.monitor=eval/knn_acc", "objective=final_loss")


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError):
        compose(["trainer=nope"])
    cfg = compose(["+trainer.bogus=1", "optim.scheduler=wavy", "trainer.micro_batch_size=many"])
    problems = validate(cfg)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "trainer.bogus" in text and "cosine, linear, constant" in text and "expected int" in text


def test_a_misspelt_group_is_named_with_the_root_keys_and_a_partial_from_config_is_refused():
    with pytest.raises(ConfigError) as e:
        compose(["modle.path=x"])
    assert "'modle' is not a key of '<root>'" in e.value.problems[0] and "Did you mean 'model'" in e.value.problems[0]
    problems = validate(compose(["model=tiny_llama", "~model.from_config.model_type"]))
    assert len(problems) == 1 and "model.from_config.model_type=" in problems[0], problems


def test_a_hub_id_that_cannot_be_fetched_is_a_config_problem():
    """Offline (or no network) and not cached: one paragraph naming model.path, not the retries of the memory
    check and again of the tokenizer load, then a traceback."""
    p = run_cli(["train", "recipe=sft", "model=hf_causal_lm", "model.path=nobody/not-cached", "logger=none"],
                check=False, timeout=120)
    assert p.returncode == 2 and "model.path=nobody/not-cached: not a local folder" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def _fake_hub_cache(home, repo: str) -> None:
    """A hub id in the Hugging Face cache layout (refs/main -> snapshots/<commit>/), as a download leaves it."""
    from transformers import LlamaConfig
    from runx.trainers.hf import byte_tokenizer
    root = os.path.join(home, "hub", "models--" + repo.replace("/", "--"))
    commit = "0" * 40
    snap = os.path.join(root, "snapshots", commit)
    LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(snap)
    byte_tokenizer().save_pretrained(snap)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)


def test_an_unreachable_hub_switches_to_the_cache_at_once(tmp_path):
    """No offline variable set and the hub's host refuses connections: runx goes offline after one probe, so a
    hub id that is not cached is refused in seconds (huggingface_hub's retries took ~50 s), and one that is
    cached validates from the cache."""
    import time
    _fake_hub_cache(tmp_path / "hf", "runx-test/cached-llama")
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": None, "https_proxy": None, "ALL_PROXY": None,
           "all_proxy": None}
    t0 = time.monotonic()
    p = run_cli(["validate", "recipe=sft", "model=hf_causal_lm", "model.path=nobody/not-cached"], env=env,
                check=False, timeout=120)
    assert p.returncode == 2 and "model.path=nobody/not-cached: not a local folder" in p.stderr, p.stderr
    assert "cannot be reached" in p.stderr and "Retrying" not in p.stderr and time.monotonic() - t0 < 40
    p = run_cli(["validate", "recipe=sft", "model=hf_causal_lm", "model.path=runx-test/cached-llama"], env=env,
                check=False, timeout=120)
    assert p.returncode == 0, p.stderr


def test_hub_problems_name_the_key_whose_id_is_missing(tmp_path):
    """Offline, a cached model with an uncached tokenizer id names model.tokenizer; an uncached encoder id of a
    data job names recipe.encoder, as a config problem instead of a traceback; and a hub that accepts the
    connection but never answers counts as unreachable after the probe's 3 s, not after the retries."""
    import socket
    import threading
    import time
    _fake_hub_cache(tmp_path / "hf", "runx-test/cached-llama")
    env = {"HF_HOME": str(tmp_path / "hf")}
    p = run_cli(["validate", "recipe=sft", "model=hf_causal_lm", "model.path=runx-test/cached-llama",
                 "model.tokenizer=nobody/not-cached-tok"], env=env, check=False, timeout=120)
    assert p.returncode == 2 and "model.tokenizer=nobody/not-cached-tok: not a local folder" in p.stderr, p.stderr
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(8)))
    p = run_cli(["train", "recipe=concept_prune", "recipe.input=text", f"recipe.path={texts}",
                 "recipe.encoder=nobody/not-cached-encoder", f"run_dir={tmp_path / 'cp'}"], env=env, check=False,
                timeout=180)
    assert p.returncode == 2 and "recipe.encoder=nobody/not-cached-encoder: not a local folder" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_hold():           # answer nothing; ends when the server socket closes
        try:
            while True:
                held.append(server.accept())
        except OSError:
            pass
    acceptor = threading.Thread(target=accept_and_hold, daemon=True)
    acceptor.start()
    stalled = {**env, "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HTTPS_PROXY": None,
               "https_proxy": None, "HTTP_PROXY": None, "http_proxy": None, "ALL_PROXY": None, "all_proxy": None,
               "HF_ENDPOINT": f"https://127.0.0.1:{server.getsockname()[1]}"}
    t0 = time.monotonic()
    p = run_cli(["validate", "recipe=sft", "model=hf_causal_lm", "model.path=nobody/not-cached"], env=stalled,
                check=False, timeout=120)
    assert p.returncode == 2 and "model.path=nobody/not-cached" in p.stderr and time.monotonic() - t0 < 40, p.stderr
    server.shutdown(socket.SHUT_RDWR)     # wakes the acceptor (close() alone leaves it blocked in accept)
    acceptor.join(timeout=5)
    server.close()
    for conn, _ in held:
        conn.close()


def test_the_hub_probe_leaves_explicit_settings_alone(monkeypatch):
    """Offline mode set either way, or a proxy (a direct probe would bypass it): no probe, no switch."""
    import huggingface_hub.constants as hc
    from runx.trainers import hf
    for env in ({"HF_HUB_OFFLINE": "0"}, {"HTTPS_PROXY": "http://proxy:3128"}, {"http_proxy": "http://proxy:3128"}):
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                  "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(hf, "_HUB_PROBED", False)
        before = hc.HF_HUB_OFFLINE
        assert hf.offline_if_hub_unreachable() is False and hc.HF_HUB_OFFLINE == before
    monkeypatch.delenv("http_proxy")
    monkeypatch.setattr(hf, "_HUB_PROBED", False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    assert hf.offline_if_hub_unreachable() is True and hc.HF_HUB_OFFLINE is True   # port 9 refuses: offline
    assert hf.offline_if_hub_unreachable() is False                                 # probed once per process


def test_validate_runs_the_recipes_own_checks():
    """What `runx train` would refuse at once, `runx validate` refuses too (it ran only the schema checks)."""
    p = run_cli(["validate", "recipe=swav", "trainer=zero3"], check=False, timeout=120)
    assert p.returncode == 2 and "trainer.zero_stage=3" in p.stderr, p.stderr
    p = run_cli(["validate", "recipe=concept_prune"], timeout=120)
    assert p.stdout.strip() == "ok: recipe=concept_prune"


def test_nvme_offload_needs_a_folder_and_the_async_io_op_before_anything_runs(tmp_path, monkeypatch):
    from runx.cli.config import check_paths
    (tmp_path / "f").write_text("")
    problems = check_paths(compose(["trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'f'}"]))
    assert any("a file, not a folder" in p for p in problems), problems
    import runx.trainers.nvme as nvme
    monkeypatch.setattr(nvme, "aio_available", lambda: False)
    problems = check_paths(compose(["trainer=zero3", "trainer.offload_optimizer=nvme"]))
    assert len(problems) == 1 and "libaio-dev" in problems[0] and "zero3_cpu_offload" in problems[0], problems
    assert check_paths(compose(["trainer=zero3_cpu_offload"])) == []


def test_cfg_job_prints_resolved_config():
    p = run_cli(["train", "recipe=lora", "--cfg", "job"])
    assert "rank: 8" in p.stdout and "name: lora" in p.stdout
    assert "train_head: true" in p.stdout          # the recipe schema's defaults, as the job runs with them
    p = run_cli(["train", "recipe=lora", "recipe.rnk=3", "--cfg", "job"], check=False)   # checked like a run
    assert p.returncode == 2 and "Did you mean 'recipe.rank'" in p.stderr, p.stderr


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


def test_llm_presets_run_on_local_stand_ins(tmp_path):
    """The LoRA-GA and VeriFree paper presets end-to-end, with a local HF causal-LM folder and saved `datasets`
    folders in place of the hub ids (the real loading path for `model.path=` and `data.hf_name=`)."""
    import datasets
    import torch
    import transformers

    from runx.trainers.hf import byte_tokenizer
    tok = byte_tokenizer()
    conf = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                    pad_token_id=256, bos_token_id=257, eos_token_id=258)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    mm = [{"query": f"What is {i}+{i % 7}?", "response": f"{i}+{i % 7}={i + i % 7}."} for i in range(48)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(mm)}).save_to_disk(str(tmp_path / "mm"))
    web = [{"problem": f"What is {i}+{i % 7}?", "answer": f"{i + i % 7}"} for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(web)}).save_to_disk(str(tmp_path / "web"))
    small = ["logger=none", "trainer.progress=false", "trainer.ckpt_every=0", f"model.path={tmp_path / 'llama'}"]

    run_cli(["train", "experiment=lora_ga_llama2_metamath", f"data.hf_name={tmp_path / 'mm'}", "data.val_fraction=0.25",
             "data.max_length=48", "trainer.max_steps=3", "trainer.grad_accum=2", "trainer.micro_batch_size=2",
             "recipe.grad_batches=2", "trainer.eval_every=3", f"run_dir={tmp_path / 'ga'}", *small])
    summary = json.load(open(tmp_path / "ga" / "summary.json"))
    assert summary["steps"] == 3 and summary["lora_ga/grad_energy_2r"] > 0.5 and "eval/loss" in summary
    cfg = open(tmp_path / "ga" / "config.yaml").read()
    assert "meta-math" not in cfg and "prompt_field: query" in cfg and "lr: 2.0e-05" in cfg

    run_cli(["train", "experiment=verifree_qwen3_base", f"data.hf_name={tmp_path / 'web'}", "data.val_fraction=0.1",
             "recipe.max_new_tokens=12", "recipe.group_size=2", "trainer.max_steps=2", "trainer.grad_accum=1",
             "trainer.eval_every=0", f"run_dir={tmp_path / 'vf'}", *small])
    assert [r["step"] for r in read_metrics(tmp_path / "vf")] == [1, 2]


def test_missing_local_paths_fail_before_any_model_is_built(tmp_path):
    """A local model folder, data file or recipe input that does not exist is named with its key, before the
    run starts (no traceback); hub ids are left to the loaders; an existing file passes."""
    p = run_cli(["train", "data=jsonl", f"data.path={tmp_path / 'nope.jsonl'}", "model.path=/no/such/model",
                 "logger=none"], check=False, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "model.path=/no/such/model" in p.stderr and "data.path=" in p.stderr and "Loading" not in p.stderr
    from runx.cli.config import check_paths
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 0}\n')
    assert check_paths(compose(["data=jsonl", f"data.path={tmp_path / 'a.jsonl'}"])) == []
    assert check_paths(compose(["data=jsonl", f"data.path={tmp_path}/*.jsonl"])) == []
    assert check_paths(compose(["model=hf_causal_lm", "model.path=Qwen/Qwen2.5-0.5B"])) == []   # a hub id
    bad = check_paths(compose(["experiment=preselect_llama_family", f"recipe.pool={tmp_path}/pool/*.jsonl",
                               f"recipe.sample={tmp_path / 'a.jsonl'}"]))
    assert len(bad) == 1 and bad[0].startswith("recipe.pool=")


def test_report_lists_jobs_stopped_by_a_config_problem_and_tells_running_from_stopped(tmp_path):
    """A sweep job refused on a config problem found at run time (no config.yaml, only Hydra's copy and
    train.log) was missing from the report ("1 run" for a 2-job sweep); a run that had crashed mid-training read
    "unfinished", like one still training."""
    import fcntl

    from runx.cli.report import collect
    for job in ("0", "1", "2", "3", "4"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text(f"seed: {job}\n")
        (tmp_path / job / "train.log").write_text("...")
    for job in ("0", "2", "3", "4"):
        (tmp_path / job / "config.yaml").write_text(f"seed: {job}\n")
    (tmp_path / "0" / "summary.json").write_text('{"final_loss": 0.5}')
    for job in ("2", "3", "4"):
        (tmp_path / job / "metrics.jsonl").write_text('{"step": 1, "loss": 0.9, "eval/loss": 0.8}\n'
                                                      '{"step": 2, "loss": 0.7}\n')
        (tmp_path / job / ".runx").mkdir()
        (tmp_path / job / ".runx" / "runx.lock").write_text("")
    (tmp_path / "2" / "train.log").write_text("runx: stopped by SIGTERM after step 2, checkpoint saved\n")
    (tmp_path / "4" / "train.log").write_text("[runx][ERROR] the run failed: RuntimeError\n")
    with open(tmp_path / "3" / ".runx" / "runx.lock") as held:   # job 3's runx is alive
        fcntl.flock(held, fcntl.LOCK_EX)
        rows, varying = collect(str(tmp_path))
    assert {r["run"]: r["_status"] for r in rows} == {"0": "done", "1": "config problem", "2": "stopped",
                                                      "3": "running", "4": "crashed"}
    assert varying == ["seed"]
    # an unfinished run shows the latest value of each metric it logged (the last line alone had no eval)
    assert {k: v for k, v in rows[2].items() if not k.startswith("_")} == {"run": "2", "step": 2, "loss": 0.7,
                                                                            "eval/loss": 0.8}


def test_report_sorts_a_nan_objective_last_and_writes_strict_json(tmp_path, capsys):
    """A run whose objective is NaN (trained on with stop_on_nonfinite_loss=false) left the table unsorted (NaN
    compares false with everything) and report.json held a bare NaN, which strict JSON parsers refuse."""
    import yaml

    from runx.cli.report import report
    for k, loss in enumerate([0.5, float("nan"), 0.3, 0.9]):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "config.yaml").write_text(yaml.safe_dump({"recipe": {"name": "sft"}, "seed": k}))
        (tmp_path / str(k) / "summary.json").write_text(json.dumps({"eval/loss": loss}))
    assert report(str(tmp_path), objective="eval/loss", plots=False) == 0
    rows = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))["rows"]
    assert [r["run"] for r in rows] == ["2", "0", "3", "1"] and rows[-1]["eval/loss"] is None


def test_a_missing_hostfile_is_a_config_problem():
    """launcher.hostfile was never checked: a missing one ran the job on this machine alone (num_nodes=1) or
    ended in DeepSpeed's ValueError traceback (num_nodes > 1)."""
    from runx.cli.config import check_paths
    problems = check_paths(compose(["launcher=deepspeed", "launcher.hostfile=/nonexistent/hostfile"]))
    assert "launcher.hostfile=/nonexistent/hostfile: no such file on this machine." in problems, problems


def test_nvme_path_is_made_absolute_with_its_home_expanded(tmp_path, monkeypatch):
    """`trainer.nvme_path='~/nvme'` (quoted for Hydra's grammar) reaches runx with the ~: the space check and the
    aio probe ran in ./~/nvme while DeepSpeed swapped to the home folder. A relative nvme_path
    (a folder runx creates, so it need not exist) is made absolute like the other paths."""
    from runx.cli.config import absolute_local_paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = compose(["trainer=zero3_nvme", "trainer.nvme_path='~/nvme'"])
    assert "trainer.nvme_path" in absolute_local_paths(cfg) and cfg.trainer.nvme_path == str(tmp_path / "home" / "nvme")
    cfg = compose(["trainer=zero3_nvme", "trainer.nvme_path=swap"])
    absolute_local_paths(cfg)
    assert cfg.trainer.nvme_path == str(tmp_path / "swap")
    default = compose(["trainer=zero3_nvme"])
    assert "trainer.nvme_path" not in absolute_local_paths(default)    # ${oc.env:TMPDIR,/tmp}/runx_nvme stays
    # the space ZeRO-Infinity needs counts optimizer states for the trainable parameters only (a LoRA run on a
    # 7B base was refused for 129 GiB where 15 GiB do)
    from runx.trainers.nvme import nvme_bytes_needed
    full = nvme_bytes_needed(7 * 10**9, True, True, 2)
    lora = nvme_bytes_needed(7 * 10**9, True, True, 2, n_trainable=20 * 10**6)
    assert full / 2**30 > 120 and 14 < lora / 2**30 < 16


def test_a_sweep_stopped_by_a_signal_says_how_to_resume_and_lists_no_failure(tmp_path):
    """SIGTERM to `runx train -m` (basic launcher): the job it stopped saved its checkpoint, and the sweep then
    listed it as "1 job(s) of the sweep failed: #0 running" (its own lock, still held, read as a live run) and
    said "rerun the same command" (a new sweep in a new folder without run_dir=). `-m --cfg job` ended in a
    ValueError traceback."""
    import signal
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "runx.cli.main", "train", "-m", f"hydra.sweep.dir={sweep}", "seed=0,1",
           "model=tiny_bert", "logger=none", "trainer.progress=false", "data.max_length=32",
           "trainer.max_steps=100000", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"]
    from conftest import child_env
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.time() + 240
    while time.time() < deadline and not (sweep / "0" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=180)[1]
    assert p.returncode == 143 and "of the sweep failed" not in err, err[-3000:]
    assert f"to resume, rerun the sweep with run_dir={sweep}" in err and "Traceback" not in err, err[-3000:]
    assert (sweep / "0" / "ckpt" / "latest").exists() and not (sweep / "1").exists()
    q = run_cli(["train", "-m", "--cfg", "job", "seed=0,1"], check=False)
    assert q.returncode == 2 and "give one of them" in q.stderr and "Traceback" not in q.stderr, q.stderr


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """outputs/<date>/<time>-<recipe> has a one-second grain: two runs a script started together shared a folder,
    the second was refused as "in use by another runx run" and Hydra's files of both mixed there. A run now takes
    its folder when Hydra names it, and a taken name gets -2, -3, ..."""
    from runx.conf import _CLAIMED, _new_run_dir
    taken = tmp_path / "outputs" / "d" / "12-00-00-sft"
    taken.mkdir(parents=True)                                   # another process's run, a moment earlier
    assert _new_run_dir(None, str(taken)) == f"{taken}-2" and os.path.isdir(f"{taken}-2")
    assert _new_run_dir(None, str(taken)) == f"{taken}-2"       # Hydra resolves it again: the same folder
    fresh = tmp_path / "outputs" / "d" / "12-00-01-sft"
    assert _new_run_dir("null", str(fresh)) == str(fresh) and fresh.is_dir()
    assert _new_run_dir("/pinned/run", str(tmp_path / "never")) == "/pinned/run" and not (tmp_path / "never").exists()
    _CLAIMED.pop(str(taken)), _CLAIMED.pop(str(fresh))


@pytest.mark.parametrize("transform", [["model_type=gemma2"], ["model_type=cohere"],
                                       ["model_type=granite", "logits_scaling=8.0"]])
def test_fused_logprob_is_refused_for_a_model_that_transforms_its_logits_after_the_head(transform):
    """The fused head scores h W^T; Gemma-2's softcap, Cohere's logit_scale and Granite's logits_scaling are not
    in it (sampled and evaluated with, trained without). Refused before any weight is read; plain llama is not."""
    from runx.cli.main import _recipe_problems
    base = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "recipe.fused_logprob=true"]
    problems = _recipe_problems(compose(base + [f"++model.from_config.{t}" for t in transform]))
    assert len(problems) == 1 and "recipe.fused_logprob=false" in problems[0], problems
    assert any(k in problems[0] for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")), problems
    assert _recipe_problems(compose(base)) == []


def test_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Two sweeps started together by a script took one multirun/<date>/<time>-<recipe> folder, and each job resumed
    the other sweep's job of the same number. The sweep's folder is claimed by `runx train -m` and passed on as a
    value (a submitit job resolves its config again in its own process, at its own time)."""
    import time as time_mod

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from runx.cli.main import _claimed_sweep_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time_mod, "strftime", lambda fmt, *a: "2026-01-02/03-04-05")
    sweep = ["recipe=lora", "optim.lr=1e-4,1e-3"]
    from runx import conf
    got = []
    for _ in range(3):   # (one process claims one sweep folder: each call here is another `runx train -m`)
        monkeypatch.setattr(conf, "_CLAIMED", {})
        got.append(_claimed_sweep_dir(sweep))
    parsed = [OverridesParser.create().parse_overrides(g)[0] for g in got]
    assert [(o.key_or_group, o.value()) for o in parsed] == [
        ("hydra.sweep.dir", "multirun/2026-01-02/03-04-05-lora" + s) for s in ("", "-2", "-3")]
    assert all((tmp_path / o.value()).is_dir() for o in parsed)
    assert _claimed_sweep_dir(sweep + [f"run_dir={tmp_path}/r"]) == []
    assert _claimed_sweep_dir(sweep, [f"hydra.sweep.dir={tmp_path}/s"]) == []
