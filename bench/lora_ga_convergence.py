"""LoRA-GA's convergence claim in miniature: full fine-tuning vs vanilla LoRA vs LoRA-GA on the embedded task
(pretrained MiniLM, stdlib_topics 4-way classification) exactly as the recipes run it by default (120 steps,
micro-batch 16, max_length 64, linear schedule with 10% warmup, rank 8, alpha 16, LoRA-GA's G from 8 batches
= 128 samples), same rank, each method at its best learning rate, 3 seeds.

Each grid (learning rates x seeds) is run as Hydra multiruns of the real CLI:

    runx train -m recipe=<sft|lora|lora_ga> optim.lr=<grid> seed=<seeds> trainer.eval_every=10 ...

Definitions (fixed before any run; best lr and target as in this bench's earlier versions):
  * best lr of a method = lowest mean (over seeds) final validation loss on the whole validation split (330);
  * target = the worst final validation loss among vanilla LoRA's seeds at LoRA's best lr (so every LoRA
    seed reaches it by its last step);
  * steps to target = the first evaluated step (every 10) whose validation loss <= target; a seed that never
    gets there counts as "more than max_steps" (earlier versions dropped it from the median);
  * ratio = median LoRA-GA steps / median LoRA steps. Claim (the paper: 2-4x faster): ratio <= 0.5.
The paper itself compares the methods at one shared lr; that regime is reported too (LoRA run at LoRA-GA's
best lr, target = LoRA's worst final loss there), and, as a diagnostic only, the mirror image (target =
LoRA-GA's worst final loss at its best lr). Every run's validation-loss curve is in `curves`.

Grids: per method, bracketing its optimum, about x1.5-2 apart. A 1-seed pilot at these settings over
1e-4..1e-2 (LoRA), 1e-4..1e-3 (LoRA-GA), 5e-5..1e-3 (full FT) located the optima; the result records
whether each best lr is interior to its grid (`bracketed`). (Full FT's best, 2e-4, is the top of its grid:
in the pilot 3e-4 was worse (0.454 vs 0.396 for seed 0); full FT is a reference row, in no target.)

Init cost: LoRA-GA's init (gradient estimate + SVD + init) as a share of the run's wall time, on the default
job as `runx train recipe=lora_ga` runs it (its 2 evaluations and 2 checkpoints included), run alone after the
grids; and the init against peft's own LoRA-GA preprocessing (`preprocess_loraga` +
`get_peft_model(init_lora_weights="lora_ga")`) on the same model and batches at the recipe's settings,
alternating rounds in this process. Timings taken while other work shares the cores are inflated: the grid
runs go 2 side by side on 2 cores, so their own init times are reported only for reference. (The earlier
version of this bench ran 3 sweeps side by side on 2 cores: that oversubscription, not a first-call cost, made
its in-run init 1.34 s against 0.86 s timed alone; the same standalone timing with two other single-thread
processes running took 1.60 s, and the estimate's first batch is no slower than its later ones.)

    python bench/lora_ga_convergence.py            # full: 30 runs of 120 steps, 2 side by side (38 min, 2 cores)
    python bench/lora_ga_convergence.py --quick    # the full run's best lrs, 2 seeds, 40 steps, no equal-lr
                                                   # arm, half the validation split (< 5 min)
    python bench/lora_ga_convergence.py --head probe   # the same comparison with every arm starting from one
                                                       # linear-probed classifier head (probed_head_checkpoint)
    python bench/lora_ga_convergence.py --fullft-grid 1e-5,2e-5,5e-5,1e-4   # full FT alone from the probed head,
                                                       # against the probed-head LoRA target (19 min)
Writes bench/results/lora_ga_convergence[_probed_head][_quick].json (lora_ga_fullft_probed_head.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sft", "lora", "lora_ga")
STEPS = 120           # the recipes' trainer.max_steps
EVAL_EVERY = 10
# per-method grids around each optimum (see the module docstring for the pilot that placed them)
GRIDS = {"sft": [5e-5, 1e-4, 2e-4],
         "lora": [1e-3, 2e-3, 3e-3],
         "lora_ga": [1e-4, 2e-4, 3e-4]}
# --quick: the best lrs of the full run (bench/results/lora_ga_convergence.json)
QUICK = {"sft": [2e-4], "lora": [2e-3], "lora_ga": [2e-4]}
# --head probe: grids placed by a 1-seed pilot with the probed head (LoRA 5e-4..2e-3 all ended within 0.02 of each
# other; LoRA-GA at 2e-4 and above oscillated early, 5e-5 ended best); full FT is the reference row at one lr
PROBE_GRIDS = {"sft": [2e-4], "lora": [5e-4, 1e-3, 2e-3], "lora_ga": [2e-5, 5e-5, 1e-4]}


def probed_head_checkpoint(root: str, threads: int) -> dict:
    """The paper's models start from a pretrained output head; the embedded task's classifier head is new (random),
    so LoRA-GA's gradient estimate at step 0 is the gradient through a random projection. This arm gives every
    method the same fitted head instead: a multinomial logistic regression (scikit-learn, C=1) on the frozen
    encoder's pooled features of the training split (linear probing, as in LP-FT, Kumar et al. 2022), saved with
    the encoder as a local checkpoint that the runs load through model.path. Validation data is not used."""
    code = r"""
import json, sys, numpy as np, torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from runx.cli.config import compose
from runx.recipes.text_data import load_rows
from runx.trainers.hf import resolve_path
out = sys.argv[1]
train, evals = load_rows(compose(["data=stdlib_topics"]).data)   # the embedded task's own split
src = resolve_path("builtin:minilm")
tok = AutoTokenizer.from_pretrained(src)
torch.manual_seed(0)
m = AutoModelForSequenceClassification.from_pretrained(src, num_labels=4).eval()
def feats(rows):
    with torch.no_grad():
        return torch.cat([m.bert(**tok([r["text"] for r in rows[i:i + 64]], truncation=True, max_length=64,
                                       padding=True, return_tensors="pt")).pooler_output
                          for i in range(0, len(rows), 64)]).numpy()
xt, yt = feats(train), np.array([r["label"] for r in train])
xe, ye = feats(evals), np.array([r["label"] for r in evals])
clf = LogisticRegression(C=1.0, max_iter=2000).fit(xt, yt)
m.classifier.weight.data = torch.tensor(clf.coef_, dtype=torch.float32)
m.classifier.bias.data = torch.tensor(clf.intercept_, dtype=torch.float32)
m.save_pretrained(out)
tok.save_pretrained(out)
print(json.dumps({"probe_train_accuracy": clf.score(xt, yt), "probe_eval_accuracy": clf.score(xe, ye),
                  "probe_eval_loss": log_loss(ye, clf.predict_proba(xe), labels=clf.classes_)}))
"""
    out = os.path.join(root, "minilm_probed_head")
    p = subprocess.run([sys.executable, "-c", code, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=env(threads))
    if p.returncode != 0:
        raise SystemExit(f"probing the head failed:\n{p.stderr[-4000:]}")
    return {"path": out, **json.loads(p.stdout.strip().splitlines()[-1])}


def env(threads: int) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(k, None)
    return e


def common_overrides(steps: int, eval_every: int, quick: bool) -> list[str]:
    """Shared by every arm: the recipes' own defaults (120 steps, micro-batch 16, max_length 64, warmup 10%,
    linear schedule, rank 8 / alpha 16, grad_batches 8), pinned so that the arms cannot drift apart, plus
    evaluation every `eval_every` steps on the whole validation split (a 165-sample half in --quick) and no
    checkpoints."""
    o = ["logger=none", "trainer.progress=false", "trainer.ckpt_every=0", f"trainer.max_steps={steps}",
         f"trainer.eval_every={eval_every}", "trainer.micro_batch_size=16", "data.max_length=64",
         "optim.warmup_ratio=0.1", "optim.scheduler=linear", "recipe.rank=8", "recipe.alpha=16",
         "recipe.grad_batches=8"]
    if quick:
        o.append("data.max_eval_samples=165")
    return o


def sweep_command(method: str, lrs: list[float], seeds: list[int], common: list[str], sweep_dir: str) -> list[str]:
    keys = {"sft": (), "lora": ("recipe.rank", "recipe.alpha"), "lora_ga": None}[method]  # None: all
    o = [x for x in common if not x.startswith("recipe.") or keys is None or x.split("=")[0] in keys]
    return [sys.executable, "-m", "runx.cli.main", "train", "-m", f"recipe={method}",
            "optim.lr=" + ",".join(str(x) for x in lrs), "seed=" + ",".join(str(s) for s in seeds), *o,
            f"hydra.sweep.dir={sweep_dir}"]


class Sweeps:
    """Hydra multiruns on `workers` processes of `threads` torch threads each (2 x 1 on 2 cores), taken from a
    queue in order; a sweep whose `after` names have not all finished waits."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.env = workers, env(threads)
        self.queue, self.done, self.failed, self.log = [], set(), [], []
        self.cv = threading.Condition()

    def add(self, name: str, cmd, after=()):
        """cmd: an argv list, or a callable returning one (or None: nothing to run) once `after` are done."""
        with self.cv:
            self.queue.append((name, cmd, tuple(after)))
            self.cv.notify_all()

    def _next(self):
        with self.cv:
            while True:
                if self.failed:
                    return None
                for i, (name, cmd, after) in enumerate(self.queue):
                    if all(a in self.done for a in after):
                        return self.queue.pop(i)
                if not self.queue:
                    return None
                self.cv.wait()

    def _worker(self):
        while True:
            item = self._next()
            if item is None:
                return
            name, cmd, _ = item
            cmd = cmd() if callable(cmd) else cmd
            t0 = time.perf_counter()
            if cmd is not None:
                with self.cv:
                    sys.stdout.write("runx " + " ".join(cmd[4:]) + "\n")
                    sys.stdout.flush()
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
                if p.returncode != 0:
                    with self.cv:
                        self.failed.append(f"{' '.join(cmd)}\nexited {p.returncode}\n{p.stdout[-3000:]}\n"
                                           f"{p.stderr[-5000:]}")
                        self.cv.notify_all()
                    return
            with self.cv:
                self.done.add(name)
                self.log.append({"sweep": name, "wall_s": round(time.perf_counter() - t0, 1)})
                self.cv.notify_all()

    def run(self) -> float:
        t0 = time.perf_counter()
        ts = [threading.Thread(target=self._worker) for _ in range(self.workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if self.failed:
            raise SystemExit(self.failed[0])
        return time.perf_counter() - t0


def read_runs(sweep_dir: str) -> list[dict]:
    from omegaconf import OmegaConf
    runs = []
    if not os.path.isdir(sweep_dir):
        return runs
    for d in sorted(os.listdir(sweep_dir)):
        run = os.path.join(sweep_dir, d)
        if not os.path.exists(os.path.join(run, "summary.json")):
            continue
        cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        evals = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
        runs.append({"lr": float(cfg.optim.lr), "seed": int(cfg.seed), "summary": summary, "evals": evals,
                     "step_time_s": sum(r["step_time_s"] for r in recs)})
    return runs


def steps_to(evals: list, target: float):
    return next((s for s, l in evals if l <= target), None)


def median_steps(xs: list):
    """Median with 'never reached' (None) counted as more than any step; None if the median seed never got there."""
    ys = sorted(math.inf if x is None else x for x in xs)
    if not ys:
        return None
    m = statistics.median(ys)
    return None if math.isinf(m) else m


def curves(runs: dict) -> dict:
    """method -> lr -> seed -> [[step, eval loss], ...] (to see where an arm plateaus or diverges)."""
    out = {}
    for m, rs in runs.items():
        for r in sorted(rs, key=lambda x: (x["lr"], x["seed"])):
            out.setdefault(m, {}).setdefault(str(r["lr"]), {})[str(r["seed"])] = \
                [[int(s), round(float(l), 4)] for s, l in r["evals"]]
    return out


def best_lr(runs: list) -> float:
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["summary"]["eval/loss"])
    return min(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))


def time_default_job(root: str, threads: int, extra: tuple = (), name: str = "default_job") -> dict:
    """`runx train recipe=lora_ga` as the default job runs it (its evals and checkpoints), alone; where its wall
    time goes and LoRA-GA's init as a share of it."""
    run_dir = os.path.join(root, name)
    cmd = [sys.executable, "-m", "runx.cli.main", "train", "recipe=lora_ga", "logger=none", "trainer.progress=false",
           f"run_dir={run_dir}", *extra]
    print("runx " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(threads))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r["step_time_s"] for r in recs]
    init, train = s["lora_ga/init_s"], s["train_wall_s"]
    return {"command": " ".join(["runx train recipe=lora_ga logger=none trainer.progress=false", *extra]),
            "threads": threads, "eval_loss": s.get("eval/loss"), "eval_accuracy": s.get("eval/accuracy"),
            "process_wall_s": wall, "init_s": init, "estimate_s": s["lora_ga/estimate_s"],
            "svd_init_s": s["lora_ga/svd_init_s"], "train_wall_s": train, "steps_time_s": sum(steps),
            "median_step_s": statistics.median(steps), "steps": len(steps),
            "init_in_median_steps": init / statistics.median(steps),
            # the target's definition (this bench's since its first version): init / (init + training loop),
            # the loop counting its evaluations and checkpoints as a run does
            "init_share_of_run": init / (init + train),
            "init_share_of_process_wall": init / wall,
            "init_share_of_step_time": init / (init + sum(steps))}


def time_inits(rounds: int, grad_batches: int, micro: int, max_length: int, threads: int) -> dict:
    """Our prepare (estimate + SVD + init) vs peft's preprocess_loraga + get_peft_model, same batches."""
    import copy
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(threads)
    from peft import LoraConfig, LoraGAConfig, TaskType, get_peft_model, preprocess_loraga

    import runx.conf  # noqa: F401
    from runx.cli.config import compose
    from runx.recipes.lora_ga import LoRAGA, lora_ga_targets
    from runx.recipes.sft import SFT

    cfg = compose(["recipe=lora_ga", "logger=none", f"recipe.grad_batches={grad_batches}",
                   f"trainer.micro_batch_size={micro}", f"data.max_length={max_length}"])
    tmp = tempfile.mkdtemp()
    recipe = LoRAGA(cfg, tmp)
    train, _ = recipe.build_data()
    # shuffled as the trainer draws them (padding per batch as in a run, not the split's sorted head)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [recipe.collate([train[order[i * micro + j]] for j in range(micro)]) for i in range(grad_batches)]
    torch.manual_seed(0)
    base = SFT.build_model(recipe)
    # the same layers as ours (peft resolves "all-linear" only inside get_peft_model, preprocess_loraga needs names)
    ours_targets = [n.removeprefix("base_model.model.") for n in
                    lora_ga_targets(get_peft_model(copy.deepcopy(base), recipe.peft_config()))]

    class Batches:  # the trainer surface prepare uses
        device = "cpu"

        def train_loader_for_estimation(self, n, batch_size=None, by_length=False):
            return batches

        def to_device(self, b):
            return b

    def ours():
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        model = get_peft_model(m, recipe.peft_config())
        recipe._init_applied = False
        recipe.cfg.recipe.save_init = False
        recipe.prepare(Batches(), model)
        dt = time.perf_counter() - t0
        phases.append(dict(recipe.timings))
        return dt

    def theirs():
        m = copy.deepcopy(base)
        pc = LoraConfig(r=8, lora_alpha=16, target_modules=ours_targets,
                        task_type=TaskType.SEQ_CLS, use_rslora=True, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
        t0 = time.perf_counter()

        def train_step():
            for b in batches:
                out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                torch.nn.functional.cross_entropy(out.logits, b["labels"]).backward()
        m.eval()
        preprocess_loraga(m, pc, train_step)
        get_peft_model(m, pc)
        return time.perf_counter() - t0

    a, b, phases = [], [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(theirs())
    return {"runx_init_s": statistics.median(a), "peft_preprocess_loraga_s": statistics.median(b),
            "ratio_runx_over_peft": statistics.median(a) / statistics.median(b), "rounds": rounds,
            "runx_phases": phases, "runx_rounds_s": a, "peft_rounds_s": b,
            "grad_batches": grad_batches, "micro_batch": micro, "max_length": max_length, "threads": threads}


def estimation_dtype_effect(threads: int, grad_batches: int = 8, micro: int = 16) -> dict:
    """How far bf16 estimation moves G on the default job's data, next to how far another draw of the same
    number of samples moves it: relative norm of the difference, and the overlap of the top-2r left singular
    subspaces (mean squared cosine of the principal angles, 1 = the same subspace), averaged over the layers."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(threads)
    from runx.cli.config import compose
    from runx.recipes.lora_ga import LoRAGA, estimate_full_gradients, lora_ga_targets
    from runx.trainers.deepspeed_trainer import token_lengths

    recipe = LoRAGA(compose(["recipe=lora_ga", "logger=none"]), tempfile.mkdtemp())
    train, _ = recipe.build_data()
    torch.manual_seed(0)
    model = recipe.build_model()
    lengths = token_lengths(train)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    n = grad_batches * micro

    def draw(idx):  # by-length micro-batches, as the recipe's default grouping forms them
        idx = sorted(idx, key=lambda i: lengths[i])
        return [recipe.collate([train[i] for i in idx[j:j + micro]]) for j in range(0, len(idx), micro)]
    weights = {k: l.get_base_layer().weight for k, l in lora_ga_targets(model).items()}
    loss = lambda b: recipe.loss(model, b, 0)[0]
    first, second = draw(order[:n]), draw(order[n:2 * n])
    g = {"fp32": estimate_full_gradients(model, weights, first, loss)[0],
         "bf16": estimate_full_gradients(model, weights, first, loss, autocast_bf16=True)[0],
         "fp32_other_samples": estimate_full_gradients(model, weights, second, loss)[0]}
    k = 2 * int(recipe.cfg.recipe.rank)

    def compare(other):
        rel, ov = [], []
        for name in weights:
            a, b = g["fp32"][name], g[other][name]
            rel.append(float((a - b).norm() / a.norm()))
            ua, ub = torch.linalg.svd(a)[0][:, :k], torch.linalg.svd(b)[0][:, :k]
            ov.append(float(torch.linalg.matrix_norm(ua.T @ ub) ** 2 / k))
        return {"relative_diff_mean": statistics.mean(rel), "relative_diff_max": max(rel),
                "top2r_subspace_overlap_mean": statistics.mean(ov), "top2r_subspace_overlap_min": min(ov)}
    return {"samples": n, "layers": len(weights), "vs_fp32_same_samples": {"bf16": compare("bf16")},
            "vs_fp32_other_samples": {"fp32": compare("fp32_other_samples")}}


def init_share_ab(root: str, threads: int, rounds: int) -> dict:
    """The default job's init share with the estimation micro-batches grouped by length (the default), in
    training order, and by length with bf16 estimation; the arms' order rotates each round;
    bench/results/lora_ga_init_share.json."""
    arms = {"by_length": (), "training_order": ("recipe.grad_batching=training_order",),
            "by_length_bf16_estimation": ("recipe.estimation_dtype=bf16",)}
    runs = {k: [] for k in arms}
    for r in range(rounds):
        names = list(arms)
        for k in names[r % len(names):] + names[:r % len(names)]:
            runs[k].append(time_default_job(root, threads, arms[k], name=f"{k}_{r}"))
            print(f"round {r} {k}: init {runs[k][-1]['init_s']:.2f} s, share {runs[k][-1]['init_share_of_run']:.4f}",
                  flush=True)
    med = lambda k, key: statistics.median(x[key] for x in runs[k])
    effect = estimation_dtype_effect(threads)
    print(f"G, bf16 vs fp32 estimation: {json.dumps(effect['vs_fp32_same_samples'])}; fp32 on another "
          f"{effect['samples']} samples: {json.dumps(effect['vs_fp32_other_samples'])}", flush=True)
    return {"rounds": rounds, "threads": threads, "runs": runs,
            "median": {k: {key: med(k, key) for key in ("init_s", "estimate_s", "train_wall_s",
                                                          "init_share_of_run", "eval_loss")
                           if key in runs[k][0]} for k in arms},
            "estimation_dtype_effect_on_G": effect,
            "definition": "init_share_of_run = init / (init + training loop wall), the loop with its evals and "
                          "checkpoints, as in lora_ga_convergence.json's default_job"}


def fullft_grid(lrs: list[float], seeds: list[int], root: str, workers: int, threads: int) -> dict:
    """Is full fine-tuning itself faster than LoRA here? LoRA-GA's premise is that its first steps follow full
    FT's, so its speed-up over LoRA can be no larger than full FT's. With the probed head (the same checkpoint as
    --head probe), full FT over `lrs` x `seeds`, scored against the probed-head result's LoRA target (same
    evaluation schedule), without rerunning LoRA."""
    with open(os.path.join(HERE, "results", "lora_ga_convergence_probed_head.json")) as f:
        ref = json.load(f)
    target, lora = ref["target_eval_loss"], ref["methods"]["lora"]
    head = probed_head_checkpoint(root, threads)
    common = common_overrides(STEPS, EVAL_EVERY, False) + [f"model.path={head['path']}"]
    sw = Sweeps(workers, threads)
    for s in seeds:          # split by seed so that the workers finish together
        sw.add(f"sft_seed{s}", sweep_command("sft", lrs, [s], common, os.path.join(root, f"sft_seed{s}")))
    wall = sw.run()
    runs = [r for s in seeds for r in read_runs(os.path.join(root, f"sft_seed{s}"))]
    rows = {}
    for lr in lrs:
        rs = sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["seed"])
        st = [steps_to(r["evals"], target) for r in rs]
        rows[str(lr)] = {"steps_to_lora_target": st, "median_steps": median_steps(st),
                         "final_eval_loss": statistics.mean(r["summary"]["eval/loss"] for r in rs),
                         "final_eval_loss_per_seed": [r["summary"]["eval/loss"] for r in rs],
                         "final_accuracy": statistics.mean(r["summary"]["eval/accuracy"] for r in rs),
                         "best_eval_loss_mean": statistics.mean(min(l for _, l in r["evals"]) for r in rs)}
    best = min(rows, key=lambda k: rows[k]["final_eval_loss"])
    m_ft, m_lora = rows[best]["median_steps"], lora["median_steps_to_target"]
    return {"head": head, "lora_target_eval_loss": target, "lora": {k: lora[k] for k in (
                "best_lr", "steps_to_target", "median_steps_to_target", "final_eval_loss")},
            "lora_ga": {k: ref["methods"]["lora_ga"][k] for k in (
                "best_lr", "steps_to_target", "median_steps_to_target", "final_eval_loss")},
            "full_ft": rows, "full_ft_best_lr": float(best),
            "ratio_full_ft_over_lora_steps": m_ft / m_lora if m_ft and m_lora else None,
            "seeds": seeds, "sweeps_wall_s": wall, "common_overrides": common,
            "curves": {f"{r['lr']}/seed{r['seed']}": r["evals"] for r in runs}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--init-share", type=int, default=0, metavar="ROUNDS",
                    help="only time the default job's init share, by_length vs training_order grouping, ROUNDS "
                         "rounds each (writes bench/results/lora_ga_init_share.json)")
    ap.add_argument("--seeds", type=int, default=None, help="3 (full), 2 (--quick)")
    ap.add_argument("--steps", type=int, default=None, help=f"{STEPS} (full), 40 (--quick)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--workers", type=int, default=2, help="sweep processes side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per sweep process")
    ap.add_argument("--head", choices=("new", "probe"), default="new",
                    help="new: the embedded task as the recipes run it (a new classifier head); probe: every arm "
                         "starts from the same linear-probed head (see probed_head_checkpoint; writes "
                         "lora_ga_convergence_probed_head.json, no init timings)")
    ap.add_argument("--fullft-grid", default=None, metavar="LRS",
                    help="only full fine-tuning from the probed head over these lrs (comma list), scored against "
                         "lora_ga_convergence_probed_head.json's LoRA target (writes lora_ga_fullft_probed_head.json)")
    a = ap.parse_args()
    if a.fullft_grid:
        t0 = time.perf_counter()
        res = fullft_grid([float(x) for x in a.fullft_grid.split(",")], list(range(a.seeds or 3)),
                          a.workdir or tempfile.mkdtemp(prefix="lora_ga_fullft_"), a.workers, a.threads)
        res.update(total_wall_s=time.perf_counter() - t0,
                   command=f"python bench/lora_ga_convergence.py --fullft-grid {a.fullft_grid}",
                   machine={"cpus": os.cpu_count(), "platform": platform.platform()})
        out = os.path.join(HERE, "results", "lora_ga_fullft_probed_head.json")
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"LoRA target {res['lora_target_eval_loss']:.4f}: LoRA (lr {res['lora']['best_lr']}) median "
              f"{res['lora']['median_steps_to_target']} steps, LoRA-GA (lr {res['lora_ga']['best_lr']}) "
              f"{res['lora_ga']['median_steps_to_target']}")
        for lr, r in res["full_ft"].items():
            print(f"full FT lr {lr}: steps {r['steps_to_lora_target']} median {r['median_steps']}, final loss "
                  f"{r['final_eval_loss']:.4f} acc {r['final_accuracy']:.3f}, best-seen loss {r['best_eval_loss_mean']:.4f}")
        print(f"full FT (best lr {res['full_ft_best_lr']}) / LoRA steps: {res['ratio_full_ft_over_lora_steps']}\nwrote {out}")
        return 0
    if a.init_share:
        res = init_share_ab(a.workdir or tempfile.mkdtemp(prefix="lora_ga_init_"), a.threads, a.init_share)
        res["command"] = f"python bench/lora_ga_convergence.py --init-share {a.init_share}"
        res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
        out = os.path.join(HERE, "results", "lora_ga_init_share.json")
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res["median"], indent=1), f"\nwrote {out}")
        return 0
    steps = a.steps or (40 if a.quick else STEPS)
    seeds = list(range(a.seeds or (2 if a.quick else 3)))
    probe = a.head == "probe"
    grids = (PROBE_GRIDS if probe else GRIDS) if not a.quick else \
        ({"sft": [2e-4], "lora": [1e-3], "lora_ga": [5e-5]} if probe else QUICK)
    root = a.workdir or tempfile.mkdtemp(prefix="lora_ga_bench_")
    common = common_overrides(steps, EVAL_EVERY, a.quick)
    t_start = time.perf_counter()
    head = None
    if probe:
        head = probed_head_checkpoint(root, a.threads)
        print(f"probed head: {head}", flush=True)
        common.append(f"model.path={head['path']}")
    d = lambda name: os.path.join(root, name)

    # LoRA-GA's grid first: the equal-lr arm (LoRA at LoRA-GA's best lr) waits for it. Full FT's grid is split
    # by seed so that the two workers finish together.
    sw = Sweeps(a.workers, a.threads)
    sw.add("lora_ga", sweep_command("lora_ga", grids["lora_ga"], seeds, common, d("lora_ga")))
    sw.add("lora", sweep_command("lora", grids["lora"], seeds, common, d("lora")))

    def equal_lr_cmd():
        lr = best_lr(read_runs(d("lora_ga")))
        if lr in grids["lora"]:
            return None
        return sweep_command("lora", [lr], seeds, common, d("lora_equal_lr"))
    if not a.quick:      # (--quick: no time for it)
        sw.add("lora_equal_lr", equal_lr_cmd, after=("lora_ga",))
    for s in seeds:
        sw.add(f"sft_seed{s}", sweep_command("sft", grids["sft"], [s], common, d(f"sft_seed{s}")))
    sweep_wall = sw.run()
    all_runs = {"lora_ga": read_runs(d("lora_ga")), "lora": read_runs(d("lora")) + read_runs(d("lora_equal_lr")),
                "sft": [r for s in seeds for r in read_runs(d(f"sft_seed{s}"))]}
    print(f"    {sum(len(r) for r in all_runs.values())} runs in {sweep_wall:.0f}s", flush=True)

    best = {m: best_lr([r for r in all_runs[m] if r["lr"] in grids[m]]) for m in METHODS}
    grid_table = {m: {str(lr): statistics.mean(x["summary"]["eval/loss"] for x in all_runs[m] if x["lr"] == lr)
                      for lr in sorted({x["lr"] for x in all_runs[m]})} for m in METHODS}
    runs = {m: [r for r in all_runs[m] if r["lr"] == best[m]] for m in METHODS}
    target = max(r["summary"]["eval/loss"] for r in runs["lora"])
    rows = {}
    for m in METHODS:
        st = [steps_to(r["evals"], target) for r in runs[m]]
        at = {}
        for r in runs[m]:
            for s, l in r["evals"]:
                at.setdefault(s, []).append(l)
        rows[m] = {"best_lr": best[m], "grid": grids[m],
                   "bracketed": len(grids[m]) < 3 or grids[m][0] < best[m] < grids[m][-1],
                   "seeds": len(runs[m]), "steps_to_target": st, "median_steps_to_target": median_steps(st),
                   "final_eval_loss": statistics.mean(r["summary"]["eval/loss"] for r in runs[m]),
                   "final_eval_loss_per_seed": [r["summary"]["eval/loss"] for r in runs[m]],
                   "final_accuracy": statistics.mean(r["summary"]["eval/accuracy"] for r in runs[m]),
                   "final_accuracy_per_seed": [r["summary"]["eval/accuracy"] for r in runs[m]],
                   "mean_eval_loss_at_step": {str(s): round(statistics.mean(v), 4) for s, v in sorted(at.items())},
                   "train_wall_s": statistics.median(r["summary"]["train_wall_s"] for r in runs[m])}
    ga = runs["lora_ga"]
    rows["lora_ga"].update(
        init_s_in_grid_runs=statistics.median(r["summary"]["lora_ga/init_s"] for r in ga),
        init_share_in_grid_runs=statistics.median(
            r["summary"]["lora_ga/init_s"] / (r["summary"]["lora_ga/init_s"] + r["summary"]["train_wall_s"])
            for r in ga),
        grad_energy_2r=statistics.mean(r["summary"]["lora_ga/grad_energy_2r"] for r in ga))
    m_ga, m_lora = rows["lora_ga"]["median_steps_to_target"], rows["lora"]["median_steps_to_target"]
    ratio = m_ga / m_lora if m_ga and m_lora else None

    # the mirror image (a diagnostic, not the claim): target = LoRA-GA's worst final loss at its best lr
    t_ga = max(r["summary"]["eval/loss"] for r in runs["lora_ga"])
    s_ga, s_lora = ([steps_to(r["evals"], t_ga) for r in runs[m]] for m in ("lora_ga", "lora"))
    mirror = {"target_eval_loss": t_ga, "lora_ga_steps": s_ga, "lora_steps": s_lora,
              "ratio_steps_lora_ga_over_lora": (median_steps(s_ga) / median_steps(s_lora)
                                                if median_steps(s_ga) and median_steps(s_lora) else None)}

    # the paper's regime: LoRA at LoRA-GA's (full-FT-like) lr; target = LoRA's worst final loss there
    equal = None
    same = [r for r in all_runs["lora"] if r["lr"] == best["lora_ga"]]
    if same:
        t_eq = max(r["summary"]["eval/loss"] for r in same)
        s_lora = [steps_to(r["evals"], t_eq) for r in same]
        s_ga = [steps_to(r["evals"], t_eq) for r in runs["lora_ga"]]
        ml, mg = median_steps(s_lora), median_steps(s_ga)
        equal = {"lr": best["lora_ga"], "target_eval_loss": t_eq, "lora_steps": s_lora, "lora_ga_steps": s_ga,
                 "lora_final_eval_loss": statistics.mean(r["summary"]["eval/loss"] for r in same),
                 "ratio_steps_lora_ga_over_lora": mg / ml if mg and ml else None}

    default_job = init_cmp = None
    if not a.quick and not probe:
        print("the default job, alone, for the init's share of a run ...", flush=True)
        default_job = time_default_job(root, a.threads)
    if not probe:
        print("timing the init against peft's preprocess_loraga ...", flush=True)
        init_cmp = time_inits(rounds=2 if a.quick else 3, grad_batches=8, micro=16, max_length=64,
                              threads=a.threads)

    print(f"\nvalidation-loss target {target:.4f} (worst vanilla-LoRA seed at its best lr, step {steps})")
    print(f"{'method':8s} {'best lr':>8s} {'grid':>30s} {'steps to target (per seed)':>28s} {'median':>7s} "
          f"{'final loss':>10s} {'final acc':>9s}")
    for m in METHODS:
        r = rows[m]
        print(f"{m:8s} {r['best_lr']:8.0e} {str(r['grid']):>30s} {str(r['steps_to_target']):>28s} "
              f"{str(r['median_steps_to_target']):>7s} {r['final_eval_loss']:10.4f} {r['final_accuracy']:9.3f}")
    print(f"\nLoRA-GA / LoRA steps to target, each at its best lr: {ratio if ratio is None else round(ratio, 3)} "
          f"(target <= 0.5)")
    mr = mirror["ratio_steps_lora_ga_over_lora"]
    print(f"mirror target {t_ga:.4f} (worst LoRA-GA seed at its best lr): LoRA-GA steps {mirror['lora_ga_steps']}, "
          f"LoRA steps {mirror['lora_steps']}, ratio {mr if mr is None else round(mr, 3)}")
    if equal:
        er = equal["ratio_steps_lora_ga_over_lora"]
        print(f"at the same lr {equal['lr']:.0e} (the paper's setting): target {equal['target_eval_loss']:.4f}, "
              f"LoRA steps {equal['lora_steps']}, LoRA-GA steps {equal['lora_ga_steps']}, ratio "
              f"{er if er is None else round(er, 3)}")
    print("mean final validation loss per lr: " + "; ".join(
        f"{m} " + ", ".join(f"{lr}: {v:.3f}" for lr, v in grid_table[m].items()) for m in METHODS))
    marks = [steps * k // 4 for k in range(1, 5)]
    print(f"mean validation loss at steps {'/'.join(map(str, marks))} (best lrs): " + "; ".join(
        f"{m} " + "/".join(str(rows[m]["mean_eval_loss_at_step"].get(str(s), "-")) for s in marks)
        for m in METHODS))
    if default_job:
        print(f"LoRA-GA init share of the default job: {default_job['init_share_of_run']:.2%} of init + training "
              f"loop (target <= 3%); {default_job['init_share_of_process_wall']:.2%} of the whole process, "
              f"{default_job['init_share_of_step_time']:.2%} of init + step time; init {default_job['init_s']:.2f}s "
              f"= {default_job['init_in_median_steps']:.1f} median training steps")
    if init_cmp:
        print(f"LoRA-GA init {init_cmp['runx_init_s']:.2f}s vs peft preprocess_loraga+get_peft_model "
              f"{init_cmp['peft_preprocess_loraga_s']:.2f}s: ratio {init_cmp['ratio_runx_over_peft']:.2f} "
              f"(target <= 1.0)")

    import torch
    result = {"quick": a.quick, "head": head or "new (random, as the recipes run)", "steps": steps, "eval_every": EVAL_EVERY, "seeds": seeds, "grids": grids,
              "common_overrides": common,
              "definitions": {"best_lr": "lowest mean final validation loss over seeds",
                              "target": "worst final validation loss among LoRA's seeds at LoRA's best lr",
                              "steps_to_target": "first evaluated step with validation loss <= target; "
                                                 "never reached counts as > max_steps in the median",
                              "mirror_target": "diagnostic only: the same with the worst final validation "
                                               "loss among LoRA-GA's seeds at its best lr as the target",
                              "init_share": "init / (init + training loop wall) of the default job"},
              "target_eval_loss": target, "methods": rows,
              "ratio_steps_lora_ga_over_lora": ratio, "mirror_target": mirror, "equal_lr": equal, "final_eval_loss_per_lr": grid_table,
              "default_job": default_job, "init_vs_peft": init_cmp, "sweeps_wall_s": sweep_wall,
              "sweeps": sw.log, "workers": a.workers, "threads": a.threads,
              # every run's validation-loss curve: method -> lr -> seed -> [[step, eval loss], ...]
              "curves": curves(all_runs),
              "total_wall_s": time.perf_counter() - t_start,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_avg_1m_at_end": os.getloadavg()[0]},
              "command": "python bench/lora_ga_convergence.py" + (" --quick" if a.quick else "") +
                         (" --head probe" if probe else "")}
    name = "lora_ga_convergence" + ("_probed_head" if probe else "") + ("_quick" if a.quick else "")
    out = os.path.join(HERE, "results", name + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out} (total {result['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
