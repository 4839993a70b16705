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
import re
import signal
import threading
import traceback
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


def last_number(prompt: str, response: str, ground_truth: str) -> float:
    """1.0 when the last integer in the response equals the (integer) ground truth, else 0.0: a reward a small model
    earns before it learns to write \\boxed{} answers."""
    numbers = re.findall(r"-?\d+", response.replace(",", ""))
    try:
        return float(bool(numbers) and int(numbers[-1]) == int(ground_truth.strip()))
    except ValueError:  # a ground truth that is not an integer
        return 0.0


def check_answer(answer: str, ground_truth: str) -> tuple[float, str | None]:
    """math-verify's verdict on a boxed ``answer`` against ``ground_truth``: (1.0 or 0.0, None), or (0.0, why) when the
    verifier cannot judge (a ground truth it parses to nothing). Runs without math-verify's own signal timeouts: the
    caller bounds the time."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=None)
    if not gold:
        return 0.0, f"the ground truth {ground_truth!r} parses to nothing"
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return (1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0), None


@dataclass
class MathReward:
    """1.0 when the last boxed answer is mathematically equivalent to the ground truth, else 0.0.

    Every check is bounded by ``timeout_seconds``: in the main thread by SIGALRM, in any other thread (a data loader,
    an evaluation pool) in a worker process that is killed on timeout. A check that fails, times out, or meets a
    ground truth it cannot parse scores 0 and is counted (``failures``) and logged (``failure_log``)."""

    timeout_seconds: float = 10.0
    failures: int = 0
    failure_log: list[str] = field(default_factory=list)
    _worker: object = field(default=None, repr=False)

    def __call__(self, prompt: str, response: str, ground_truth: str) -> float:
        answer = last_boxed(response)
        if answer is None:
            return 0.0
        try:
            if threading.current_thread() is threading.main_thread():
                with outer_timeout(self.timeout_seconds):
                    value, problem = check_answer(answer, ground_truth)
            else:
                value, problem = self._in_worker(answer, ground_truth)
        except Exception as error:  # noqa: BLE001 - any verifier failure is counted and logged, then scored 0
            value, problem = 0.0, f"{type(error).__name__}: {error}"
        if problem is not None:
            self.failures += 1
            message = f"verifier failed on answer {answer!r} vs {ground_truth!r}: {problem}"
            self.failure_log.append(message)
            log.warning(message)
        return value

    def _in_worker(self, answer: str, ground_truth: str) -> tuple[float, str | None]:
        """``check_answer`` in a worker process, killed (and replaced on the next call) when it overruns."""
        import concurrent.futures
        import multiprocessing

        if self._worker is None:
            self._worker = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        future = self._worker.submit(check_answer, answer, ground_truth)
        try:
            return future.result(timeout=self.timeout_seconds)
        except concurrent.futures.TimeoutError:
            for process in list(getattr(self._worker, "_processes", {}).values()):
                process.kill()
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None
            raise VerifierTimeout(f"verifier took more than {self.timeout_seconds} s") from None


def load_reward(spec: str | RewardFn) -> RewardFn:
    """``math``, ``path/to/file.py:function``, ``package.module:function``, or (from Python) the function itself."""
    if callable(spec):
        return spec
    if spec == "math":
        return MathReward()
    if spec == "last-number":
        return last_number
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


def score(fn: RewardFn, prompt: str, response: str, ground_truth: str | None, where: str = "") -> float:
    """Call a reward function and check that it returned a finite number. ``where`` names the prompt and response
    for the message when the function raises: its exception and its own traceback frames (not ipolicy's)."""
    try:
        value = fn(prompt, response, "" if ground_truth is None else ground_truth)
    except Exception as error:  # noqa: BLE001 - the user's code: report it with its own frames
        package = str(Path(__file__).resolve().parents[1])
        frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(package)]
        raise IPolicyError(
            f"The reward function raised {type(error).__name__}: {error} {where}. Fix: make it return a float for "
            "every response (its frames follow).\n" + "".join(traceback.format_list(frames)).rstrip()
        ) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IPolicyError(
            f"The reward function returned {value!r} ({type(value).__name__}), not a finite number. "
            "Fix: make it return a float."
        )
    return float(value)
