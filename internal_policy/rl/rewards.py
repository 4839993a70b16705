"""Rewards: the math verifier (docs/definitions.md §6) and user functions ``fn(prompt, response, ground_truth) -> float``.

``--reward math`` takes the last ``\\boxed{...}`` of the response (balanced braces) and checks it against the ground
truth with math-verify under an outer timeout. A verifier failure (error or timeout) scores 0 but is counted and
logged, never silently taken as a wrong answer.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IPolicyError

log = logging.getLogger("ipolicy.rewards")
RewardFn = Callable[[str, str, str], float]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None."""
    for marker in ("\\boxed{", "\\fbox{"):
        start = text.rfind(marker)
        if start < 0:
            continue
        depth, i = 1, start + len(marker)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(marker) : i - 1]
    return None


class VerifierTimeout(Exception):
    pass


@contextmanager
def outer_timeout(seconds: float):
    """SIGALRM-based timeout (main thread only; elsewhere math-verify's own timeouts still apply)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise VerifierTimeout(f"verifier took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class MathReward:
    """1.0 when the last boxed answer is mathematically equivalent to the ground truth, else 0.0."""

    timeout_seconds: float = 10.0
    failures: int = 0
    failure_log: list[str] = field(default_factory=list)

    def __call__(self, prompt: str, response: str, ground_truth: str) -> float:
        answer = last_boxed(response)
        if answer is None:
            return 0.0
        from math_verify import parse, verify

        try:
            with outer_timeout(self.timeout_seconds):
                gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=None)
                predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
                return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0
        except Exception as error:  # noqa: BLE001 - any verifier failure is counted and logged, then scored 0
            self.failures += 1
            message = f"verifier failed on answer {answer!r} vs {ground_truth!r}: {type(error).__name__}: {error}"
            self.failure_log.append(message)
            log.warning(message)
            return 0.0


def load_reward(spec: str | RewardFn) -> RewardFn:
    """``math``, ``path/to/file.py:function``, ``package.module:function``, or (from Python) the function itself."""
    if callable(spec):
        return spec
    if spec == "math":
        return MathReward()
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise IPolicyError(f"`reward` '{spec}' is not 'math', FILE.py:FUNCTION or module:function. Fix: use one of those forms.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise IPolicyError(f"Reward file '{target}' does not exist. Fix: check the path in `reward`.")
        module_spec = importlib.util.spec_from_file_location(f"ipolicy_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise IPolicyError(f"Reward file '{target}' failed to import: {error}. Fix: run it with python to see why.") from error
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise IPolicyError(f"Reward module '{target}' cannot be imported ({error}). Fix: check `reward`.") from error
    fn = getattr(module, name, None)
    if not callable(fn):
        raise IPolicyError(f"'{target}' has no function '{name}'. Fix: check the name after ':' in `reward`.")
    return fn


def score(fn: RewardFn, prompt: str, response: str, ground_truth: str | None) -> float:
    """Call a reward function and check that it returned a finite number."""
    value = fn(prompt, response, "" if ground_truth is None else ground_truth)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IPolicyError(
            f"The reward function returned {value!r} ({type(value).__name__}), not a finite number. "
            "Fix: make it return a float."
        )
    return float(value)
