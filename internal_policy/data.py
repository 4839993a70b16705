"""Prompts, responses and ground truths: one data module for the entropy engine and the trainer.

``--data`` may be ``arithmetic`` (the built-in, seeded task), a level of the task ladder (``add-sub-1``,
``add-sub-2x1``, ``add-sub-2``, ``mul-1``, each with a held-out split ``NAME:test``), a shipped benchmark by name (``math500``, ``amc23``,
``aime24``, ``aime25``, ``deepmath-5k``; see ``datasets/README.md``), a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a
Hugging Face Hub dataset name (``HuggingFaceH4/MATH-500``, optionally ``NAME:SPLIT``). Accepted rows:

* the verl layout: ``prompt`` as a list of chat messages, ``reward_model.ground_truth``;
* plain rows: ``prompt`` (a string, used verbatim, or chat messages) with optional ``answer`` and ``response``;
* rows with only ``problem`` or ``question`` (MATH-500 on the Hub): turned into chat messages with the same
  step-by-step instruction the verl files use.

Tokenization follows docs/definitions.md §2: prompt and response are tokenized separately without special tokens and concatenated.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import BUILTIN_ARITHMETIC
from .errors import IPolicyError
from .io import json_lines

# Shipped math benchmarks in the verl layout (origin and licence: datasets/README.md), selected by name.
BUILTIN_DATASETS = {
    "math500": "math500.parquet",
    "amc23": "amc2023.parquet",
    "aime24": "aime_2024.parquet",
    "aime25": "aime_2025.parquet",
    "deepmath-5k": "deepmath-5k.parquet",
}
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

Prompt = str | list[dict[str, str]]


@dataclass
class Sample:
    """One prompt with an optional response and ground truth. ``prompt`` is a string or chat messages.

    ``eos``: the stop token that ended the response (its text, e.g. ``"<|im_end|>"``), or None when the response is
    the text alone (given text, or a generated response cut at ``max_new_tokens``). A stop token is analysed as the
    response's last token: the model decided to stop there (docs/definitions.md §2). ``response_ids``: a generated
    response's sampled token ids (stop token excluded), analysed as they are by a tokenizer that decodes them to
    ``response``.
    """

    id: str
    prompt: Prompt
    response: str | None = None
    answer: str | None = None
    source: str = ""
    eos: str | None = None
    response_ids: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenizedSample:
    """Token ids of one sample (docs/definitions.md §2). The analysed positions are ``analysed_positions``."""

    sample: Sample
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def analysed_positions(self) -> range:
        """Positions whose next-token policy produced a response token: len(p)-1 .. len(p)+len(r)-2."""
        start = len(self.prompt_ids) - 1
        return range(start, start + len(self.response_ids))


def arithmetic_samples(n: int, seed: int = 0) -> list[Sample]:
    """The built-in task: seeded two-operand arithmetic questions with integer answers, as chat messages."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        messages = [
            {"role": "system", "content": MATH_INSTRUCTION},
            {"role": "user", "content": f"What is {a} {op} {b}?"},
        ]
        samples.append(Sample(id=f"arithmetic-{seed}-{i}", prompt=messages, answer=str(answer), source=BUILTIN_ARITHMETIC))
    return samples


# The task ladder: graded arithmetic a small model can learn from on a CPU. Each level's problems are split once and
# for all into train and held-out ("NAME:test") problems, by a hash of the problem, so the two never overlap.
# level -> (operators, first operands, second operands); subtraction keeps a >= b, so every answer is >= 0.
TASK_LADDER = {
    "add-sub-1": ("+-", range(0, 10), range(0, 10)),       # one-digit addition and subtraction
    "add-sub-2x1": ("+-", range(10, 100), range(0, 10)),   # a two-digit number plus or minus a one-digit number
    "add-sub-2": ("+-", range(10, 100), range(10, 100)),   # two-digit addition and subtraction
    "mul-1": ("*", range(2, 10), range(2, 10)),            # one-digit multiplication
}
TASK_INSTRUCTION = "Put the final answer in \\boxed{}."


def is_ladder_task(spec: str) -> bool:
    """Whether ``spec`` names a ladder level or its split: "add-sub-1", "add-sub-1:train", "add-sub-1:test"."""
    level, _, split = spec.partition(":")
    return level in TASK_LADDER and split in ("", "train", "test")


def ladder_problems(level: str, split: str = "train") -> list[tuple[int, str, int]]:
    """Every problem (a, op, b) of a ladder level in one split ("train" or "test", about a fifth), in a fixed order."""
    ops, first, second = TASK_LADDER[level]
    problems = [(a, op, b) for op in ops for a in first for b in second if op != "-" or a >= b]
    held_out = lambda p: int(hashlib.sha256(f"{level}:{p}".encode()).hexdigest(), 16) % 5 == 0  # noqa: E731
    return [p for p in problems if held_out(p) == (split == "test")]


def ladder_samples(spec: str, n: int | None, seed: int = 0) -> list[Sample]:
    """``n`` problems (all of them when None) of the ladder level ``spec`` ("add-sub-1" or "add-sub-1:test"), in a
    seeded order, as chat messages: "What is 6 - 3? Put the final answer in \\boxed{}."."""
    level, _, split = spec.partition(":")
    problems = ladder_problems(level, split or "train")
    random.Random(seed).shuffle(problems)
    samples = []
    for a, op, b in problems[:n]:
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompt = [{"role": "user", "content": f"What is {a} {op} {b}? {TASK_INSTRUCTION}"}]
        samples.append(Sample(id=f"{level}-{a}{op}{b}", prompt=prompt, answer=str(answer), source=spec))
    return samples


def _plain(value: Any) -> Any:
    """numpy arrays / pyarrow structs from parquet -> plain lists and dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _row_to_sample(row: dict[str, Any], index: int, source: str) -> Sample:
    prompt = _plain(row.get("prompt"))
    if prompt is None:
        question = row.get("problem", row.get("question"))
        if question is None:
            raise IPolicyError(
                f"Row {index} of '{source}' has no 'prompt' (nor 'problem'/'question') field. "
                "Fix: give each row a 'prompt': a string or a list of chat messages."
            )
        prompt = [{"role": "system", "content": MATH_INSTRUCTION}, {"role": "user", "content": str(question)}]
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise IPolicyError(
                f"Row {index} of '{source}': 'prompt' is a list but not of {{'role', 'content'}} chat messages. "
                "Fix: use a string or chat messages."
            )
    elif not isinstance(prompt, str):
        raise IPolicyError(f"Row {index} of '{source}': 'prompt' must be a string or chat messages, got {type(prompt).__name__}.")
    answer = None
    reward_model = _plain(row.get("reward_model"))
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        answer = reward_model["ground_truth"]
    for key in ("answer", "final_answer", "ground_truth"):
        if answer is None and row.get(key) is not None:
            answer = row[key]
    response, eos = row.get("response"), row.get("eos")
    if eos is not None and not isinstance(eos, str):
        raise IPolicyError(f"Row {index} of '{source}': 'eos' must be the stop token's text (e.g. \"<|im_end|>\"), got "
                           f"{eos!r}. Fix: write the stop token's text there, or leave it out to analyse the response text "
                           "alone.")
    return Sample(
        id=str(row.get("id", f"{Path(source).stem}-{index}")),
        prompt=prompt,
        response=None if response is None else str(response),
        answer=None if answer is None else str(answer),
        source=str(row.get("data_source", source)),
        eos=eos,
    )


def builtin_dataset_path(name: str) -> Path:
    """The parquet file of a built-in dataset (a key of ``BUILTIN_DATASETS``), inside the installed package."""
    return Path(__file__).parent / "datasets" / BUILTIN_DATASETS[name]


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a parquet file as plain Python values: a null stays None (pandas would turn a null in a string
    column into the text "nan", and an integer column with nulls into floats: "4.0")."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_rows(spec: str) -> list[dict[str, Any]]:
    if spec in BUILTIN_DATASETS:
        return _parquet_rows(builtin_dataset_path(spec))
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise IPolicyError(f"Data file '{spec}' does not exist. Fix: check the path, or use `data` 'arithmetic'.")
        if path.suffix == ".parquet":
            return _parquet_rows(path)
        text = path.read_text()
        try:
            if path.suffix == ".json":
                rows = json.loads(text)
                return rows if isinstance(rows, list) else [rows]
            return json_lines(text)
        except ValueError as error:
            raise IPolicyError(f"'{spec}' is not valid JSON lines ({error}). Fix: one JSON object per line.") from error
    _refuse_near_misses(spec)
    name, _, split = spec.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split or "test")
    except Exception as error:
        raise IPolicyError(
            f"Could not load dataset '{spec}': not a local file, and the Hub gave: {str(error).splitlines()[0]}. "
            f"Fix: pass a .jsonl/.parquet file, 'arithmetic', a built-in dataset ({', '.join(BUILTIN_DATASETS)}), or a Hub "
            "dataset as OWNER/NAME[:SPLIT]."
        ) from error
    return list(dataset)


def data_location(spec: str) -> str:
    """``data`` as a fingerprint records it: a local file as an absolute path (``rows.jsonl`` and ``/abs/rows.jsonl``
    are one file), anything else (a built-in name, a Hub dataset) as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_file() else spec


def _refuse_near_misses(spec: str) -> None:
    """A `data` that is no file and no built-in name but looks like one (``math-500``, ``add-sub-1:tset``) is a typo,
    refused at once with the name it was probably meant to be, rather than spending half a minute on Hub retries.
    Hub datasets are named OWNER/NAME, so a spec with a '/' is left to the Hub."""
    import difflib

    level, _, split = spec.partition(":")
    if level in TASK_LADDER:
        raise IPolicyError(f"`data` '{spec}': the task {level} has the splits train (the default) and test, not "
                           f"'{split}'. Fix: use '{level}' or '{level}:test'.")
    if "/" in level:
        return
    names = [BUILTIN_ARITHMETIC, *BUILTIN_DATASETS, *TASK_LADDER, *(f"{name}:test" for name in TASK_LADDER)]
    close = difflib.get_close_matches(spec, names, n=1, cutoff=0.6)
    if close:
        raise IPolicyError(f"`data` '{spec}' is neither a file nor a built-in name. Fix: did you mean '{close[0]}'? "
                           f"(Built-in: {', '.join(names)}; a Hub dataset is OWNER/NAME[:SPLIT].)")


def load_samples(spec: str = BUILTIN_ARITHMETIC, *, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """Read ``spec`` (see the module docstring) into samples; ``limit`` keeps the first rows.

    Examples:
        >>> first = load_samples("add-sub-1:test", limit=2, seed=0)[0]
        >>> first.prompt[-1]["content"].split("?")[0], first.answer
        ('What is 1 + 5', '6')
    """
    if spec == BUILTIN_ARITHMETIC:
        samples = arithmetic_samples(limit or 8, seed)
    elif is_ladder_task(spec):
        samples = ladder_samples(spec, limit, seed)
    else:
        rows = _read_rows(spec)
        if limit is not None:
            rows = rows[:limit]
        samples = [_row_to_sample(row, i, spec) for i, row in enumerate(rows)]
    if not samples:
        raise IPolicyError(f"Dataset '{spec}' has no rows. Fix: point `data` at a file with at least one prompt.")
    return samples


def render_prompt(tokenizer, prompt: Prompt, chat_template_kwargs: dict | None = None) -> str:
    """A string prompt verbatim; chat messages through the model's chat template with the generation prompt (and
    ``chat_template_kwargs``, e.g. ``{"enable_thinking": False}``)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise IPolicyError(
            "The prompts are chat messages but the tokenizer has no chat template. "
            "Fix: use a chat model, or give prompts as plain strings."
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_id(tokenizer, eos: str) -> int:
    """The id of stop token ``eos`` in this tokenizer's vocabulary, or, where it has no such token (another model
    family analysing the same responses), the tokenizer's own EOS token (docs/definitions.md §2)."""
    token_id = tokenizer.convert_tokens_to_ids(eos)
    if token_id is None or (token_id == tokenizer.unk_token_id and eos != tokenizer.unk_token):
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise IPolicyError(f"The response ends with the stop token {eos!r}, but this tokenizer has neither that token nor "
                           "an EOS token. Fix: drop 'eos' from the samples, or use a tokenizer with an EOS token.")
    return token_id


def check_prompt_fits(sample_id: str, n_prompt: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse a prompt of ``n_prompt`` tokens whose response of up to ``max_new_tokens`` cannot fit the model's
    ``context`` (tokens; None: the model does not say). The one such check, for generation and training alike."""
    if context is not None and n_prompt + max_new_tokens > context:
        raise IPolicyError(f"Sample '{sample_id}' has a {n_prompt}-token prompt; with `max_new_tokens` {max_new_tokens} "
                           f"it exceeds the model's context of {context}. Fix: lower `max_new_tokens`, or drop the row.")


def tokenize_sample(tokenizer, sample: Sample, context_length: int | None = None,
                    chat_template_kwargs: dict | None = None) -> TokenizedSample:
    """docs/definitions.md §2: prompt and response tokenized separately, without special tokens, then concatenated
    (a generated response keeps its sampled ids where this tokenizer decodes them to its text); a response that ended
    with a stop token (``sample.eos``) has that token as its last token."""
    if sample.response is None:
        raise ValueError(f"sample {sample.id} has no response to analyse")
    prompt_ids = encode(tokenizer, render_prompt(tokenizer, sample.prompt, chat_template_kwargs))
    sampled = sample.response_ids
    if sampled is not None and tokenizer.decode(sampled, skip_special_tokens=True) == sample.response:
        response_ids = list(sampled)  # exactly the tokens the model produced (text can re-tokenize otherwise)
    else:
        response_ids = encode(tokenizer, sample.response)
    response_ids += [stop_token_id(tokenizer, sample.eos)] if sample.eos else []
    if not prompt_ids:
        raise IPolicyError(f"Sample '{sample.id}' has an empty prompt. Fix: drop the row or give it a prompt.")
    total = len(prompt_ids) + len(response_ids)
    if context_length is not None and total > context_length:
        raise IPolicyError(
            f"Sample '{sample.id}' is {total} tokens long, more than the model's context of {context_length}. "
            "Fix: lower `max_new_tokens`, or drop or shorten that row."
        )
    return TokenizedSample(sample, prompt_ids, response_ids)


def write_jsonl(path: Path, samples: list[Sample]) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples))


def read_jsonl_samples(path: Path) -> list[Sample]:
    return [Sample(**row) for row in json_lines(path.read_text())]


def samples_digest(samples: list[Sample]) -> str:
    """A short content hash of samples (ids, prompts, responses, answers, stop tokens; not ``source``, which names where
    a row was read and is the same file however it is spelled): two runs on the same digest analyse the same text."""
    text = json.dumps([{k: v for k, v in s.to_json().items() if k != "source"} for s in samples], sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
