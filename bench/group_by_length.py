"""data.group_by_length on the embedded default job: wall time and accuracy with and without it.

    python bench/group_by_length.py            # 2 rounds of (false, true), ~6 min on 2 CPU cores

Runs `runx train logger=none trainer.progress=false data.group_by_length=<false|true>` (pretrained MiniLM,
stdlib_topics, 120 steps of 16) alternately, reads each run's summary.json and prints the median training-loop
wall time, samples/s, held-out loss and accuracy of each arm and the wall-time ratio true / false.
Writes bench/results/group_by_length_default_job.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("train_wall_s", "samples_per_s", "tokens_per_s", "eval/loss", "eval/accuracy")


def run(grouped: bool, run_dir: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "runx.cli.main", "train", "logger=none", "trainer.progress=false",
           f"data.group_by_length={str(grouped).lower()}", f"run_dir={run_dir}"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {k: summary[k] for k in KEYS if k in summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list] = {"false": [], "true": []}
    with tempfile.TemporaryDirectory(prefix="runx_gbl_") as tmp:
        for r in range(args.rounds):
            for grouped in (False, True):
                runs[str(grouped).lower()].append(run(grouped, os.path.join(tmp, f"{grouped}-{r}")))
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in KEYS} for arm, rs in runs.items()}
    ratio = med["true"]["train_wall_s"] / med["false"]["train_wall_s"]
    print(f"{'group_by_length':>16} {'train_wall_s':>12} {'samples/s':>10} {'eval/loss':>10} {'eval/acc':>9}")
    for arm in ("false", "true"):
        m = med[arm]
        print(f"{arm:>16} {m['train_wall_s']:>12.1f} {m['samples_per_s']:>10.1f} {m['eval/loss']:>10.4f} "
              f"{m['eval/accuracy']:>9.4f}")
    print(f"train wall time, true / false: {ratio:.3f}")
    out = {"command": "python bench/group_by_length.py (runx train logger=none trainer.progress=false "
                      "data.group_by_length=<false|true>: the embedded default job, MiniLM, stdlib_topics, 120 steps "
                      f"of 16; {args.rounds} rounds, false then true each round)",
           "runs": runs, "median": med, "train_wall_ratio_true_over_false": ratio}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "group_by_length_default_job.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
