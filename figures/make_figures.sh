#!/usr/bin/env bash
# Regenerates every figure in figures/ from real runs on a 2-core CPU (about 30 minutes). From the project root,
# after `make venv`. Intermediate results go to runs/figures/ (not committed); the figures to figures/.
set -euo pipefail
B=.venv/bin
R=${RUNS:-runs/figures}


# 1. SmolLM2-135M-Instruct on 32 MATH-500 problems with generated responses, both norm modes on the same responses.
$B/ipolicy entropy --data math500 --limit 32 --max-new-tokens 128 --out $R/smollm2-math500-none -q
$B/ipolicy entropy --data $R/smollm2-math500-none/samples.jsonl --norm-mode final --out $R/smollm2-math500-final -q

# 2. GRPO vs BuPO at small scale: built-in arithmetic, 3 seeds each, the same rollout budget (4 prompts x
#    8 responses x 48 tokens per step, 4 steps: small, to fit one session's CPU time). SmolLM2 has no FFN layer that raises entropy in norm mode 'none' (so no boundary layer);
#    BuPO trains layer 5 of 30 (about L/6, the paper's 6 of 36) for its first 2 steps.
#    Reward: last-number (built in: the last number of the response equals the answer); with --reward math
#    SmolLM2 scores 0 on every rollout and nothing is learnt.
COMMON="--data arithmetic --data-limit 256 --steps 4 --prompts-per-step 4 --group-size 8 --max-new-tokens 48 --lr 1e-5 --save-every 2 --reward last-number -q"
for seed in 1 2 3; do
  $B/ipolicy train-grpo $COMMON --seed $seed --out $R/grpo-seed$seed
  $B/ipolicy train-bupo $COMMON --seed $seed --internal-layer 5 --internal-steps 2 --out $R/bupo-seed$seed
done

# 3. Avg@4 and pass@k on 24 held-out arithmetic problems (seed 1000: not the training problems).
$B/ipolicy eval --model smollm2-135m-instruct $(for s in 1 2 3; do echo --model $R/grpo-seed$s/checkpoints/step-4 --model $R/bupo-seed$s/checkpoints/step-4; done) \
  --data arithmetic --limit 24 --seed 1000 --n 4 --k 1 --k 2 --k 4 --max-new-tokens 48 --reward last-number --out $R/eval -q

# 4. Entropy dynamics across the checkpoints of one GRPO and one BuPO run (same 8 prompts, responses of the base model),
#    with feature refinement of the BuPO layer.
$B/ipolicy entropy --run $R/grpo-seed1 --limit 8 --max-new-tokens 32 --fast --refine-layer 5 --out $R/grpo-seed1-entropy -q
$B/ipolicy entropy --run $R/bupo-seed1 --limit 8 --max-new-tokens 32 --fast --refine-layer 5 --out $R/bupo-seed1-entropy -q

$B/ipolicy figures $R/smollm2-math500-none $R/smollm2-math500-final $R/grpo-seed1-entropy $R/bupo-seed1-entropy \
  $R/grpo-seed1 $R/grpo-seed2 $R/grpo-seed3 $R/bupo-seed1 $R/bupo-seed2 $R/bupo-seed3 $R/eval --out figures
