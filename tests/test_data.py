"""Data readers and docs/definitions.md §2 tokenization."""

import json

import pytest
from transformers import AutoTokenizer

from internal_policy.data import Sample, arithmetic_samples, load_samples, tokenize_sample
from internal_policy.errors import IPolicyError


def test_verl_parquet_layout():
    samples = load_samples("math500", limit=3)
    assert len(samples) == 3
    first = samples[0]
    assert isinstance(first.prompt, list) and [m["role"] for m in first.prompt] == ["system", "user"]
    assert "polar coordinates" in first.prompt[1]["content"]
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.response is None


def test_plain_rows_and_problem_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "2+2=", "answer": 4, "response": "4"}, {"problem": "What is 1+1?", "answer": "2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a, b = load_samples(str(path))
    assert (a.prompt, a.answer, a.response) == ("2+2=", "4", "4")
    assert b.prompt[-1] == {"role": "user", "content": "What is 1+1?"} and b.answer == "2"


def test_arithmetic_is_seeded_and_correct():
    assert arithmetic_samples(5, seed=1) == arithmetic_samples(5, seed=1)
    assert arithmetic_samples(5, seed=1) != arithmetic_samples(5, seed=2)
    for s in arithmetic_samples(50, seed=0):
        expression = s.prompt[-1]["content"].removeprefix("What is ").removesuffix("?")
        assert eval(expression) == int(s.answer)  # noqa: S307 - our own generated expressions


def test_tokenization_follows_spec(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "user", "content": "hello world"}]
    t = tokenize_sample(tokenizer, Sample(id="x", prompt=messages, response="the lazy dog"))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    p = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    r = tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    assert t.input_ids == p + r
    assert list(t.analysed_positions) == list(range(len(p) - 1, len(p) + len(r) - 1))
    # a string prompt is used verbatim
    assert tokenize_sample(tokenizer, Sample(id="y", prompt="hi", response="x")).prompt_ids == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_too_long_for_context(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(IPolicyError, match="context"):
        tokenize_sample(tokenizer, Sample(id="x", prompt="hi", response="hello world " * 50), context_length=32)


@pytest.mark.parametrize("name, rows, answer", [("math500", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"), ("amc23", 40, None),
                                                ("aime24", 30, None), ("aime25", 30, None), ("deepmath-5k", 5000, None)])
def test_builtin_datasets_ship_with_the_package(name, rows, answer):
    samples = load_samples(name)
    assert len(samples) == rows
    assert all(s.answer for s in samples) and all(isinstance(s.prompt, list) for s in samples)
    assert len({s.id for s in samples}) == rows
    if answer is not None:
        assert samples[0].answer == answer
