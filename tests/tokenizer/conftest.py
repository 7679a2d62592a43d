"""Fixtures for the demo-tokenizer tests: one real tokenizer per family, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from services.core.tokenizer_build import FAMILIES, build_demo_tokenizer


class Built:
    """A tokenizer written by build_demo_tokenizer, loaded both ways."""

    def __init__(self, family: str, path: Path, ids: dict[str, int], vocab_size: int) -> None:
        self.family = family
        self.path = path
        self.ids = ids
        self.vocab_size = vocab_size
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.hf = AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session", params=FAMILIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    family: str = request.param
    path = tmp_path_factory.mktemp(f"tok-{family}")
    ids = build_demo_tokenizer(path, family, 32000)
    return Built(family, path, ids, 32000)


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Built:
    path = tmp_path_factory.mktemp("tok-mixtral-only")
    return Built("mixtral", path, build_demo_tokenizer(path, "mixtral", 32000), 32000)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Built:
    path = tmp_path_factory.mktemp("tok-qwen3-only")
    return Built("qwen3_moe", path, build_demo_tokenizer(path, "qwen3_moe", 32000), 32000)
