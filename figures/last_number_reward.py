"""Reward of the small-scale GRPO vs BuPO figure: 1.0 when the last number in the response equals the ground truth.

SmolLM2-135M-Instruct almost never writes a correct \\boxed{} answer within 48 tokens, so the default math reward is
always 0 there and GRPO gets no signal; this denser reward gives the comparison something to learn.
"""

import re


def last_number(prompt: str, response: str, ground_truth: str) -> float:
    numbers = re.findall(r"-?\d+", response.replace(",", ""))
    return 1.0 if numbers and numbers[-1] == ground_truth.strip() else 0.0
