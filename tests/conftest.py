import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: a Hub id must fail fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model  # noqa: E402

ROWS = [
    {"prompt": "What is 12 + 7?", "response": "The answer is \\boxed{19}."},
    {"prompt": [{"role": "system", "content": "Please reason step by step"}, {"role": "user", "content": "What is 3 * 4?"}],
     "response": "3 * 4 = 12, so the answer is 12."},
    {"prompt": "hello world", "response": "the quick brown fox jumps over the lazy dog"},
    {"prompt": "Please reason", "response": "0123456789 + - * = ? hello"},
    {"prompt": "the lazy dog", "response": "jumps"},
]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def rows_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path
