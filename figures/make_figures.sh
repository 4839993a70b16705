#!/usr/bin/env bash
# Regenerates every figure in figures/ and every number of the README's Results on a 2-core CPU: from scratch (about
# 2.5 hours), except the paper-ratio stage (about 7 hours of free CPU), which reuses the finished evaluations kept in
# figures/data/paper-ratio/ (move that folder aside to redo them too). Resumable: rerun it after an interruption and
# finished runs, evaluations and analyses are kept. From the project root, after `make venv`. Runs go to runs/ (not
# committed; about 12 GB); figures and experiments.json to figures/.
set -euo pipefail
B=.venv/bin
R=${RUNS:-runs/figures}

# 1. SmolLM2-135M-Instruct on 32 MATH-500 problems with generated responses, both norm modes on the same responses.
$B/ipolicy entropy --data math500 --limit 32 --max-new-tokens 128 --out $R/smollm2-math500-none -q
$B/ipolicy entropy --data $R/smollm2-math500-none/samples.jsonl --norm-mode final --out $R/smollm2-math500-final -q

# 2. GRPO and BuPO on the task ladder's add-sub-1 (figures/experiments.py gives the recipe): GRPO against the base
#    model; GRPO vs BuPO (K = 5, S = 2) over 5 seeds; the sweep of K in {5, 15} and S in {2, 6} over 3 seeds; and
#    the dynamics runs (a checkpoint every step, the internal policy entropy of every checkpoint on 16 held-out
#    prompts, with the refinement of layer 5). Writes figures/experiments.json and figures/sweep_avg_at_4.png.
$B/python figures/experiments.py --stage all --runs $R/experiments

# 3. The figures of those runs.
E=$R/experiments
$B/ipolicy figures $R/smollm2-math500-none $R/smollm2-math500-final \
  $E/dyn-grpo-seed1-entropy $E/dyn-bupo-k5-s2-seed1-entropy \
  $E/grpo-seed{1,2,3,4,5} $E/bupo-seed{1,2,3,4,5} --out figures
