"""The demo tokenizer: real byte-level BPE files that load in `tokenizers` and transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.core.tokenizer_build import build_demo_tokenizer, normalize_family
from services.errors import ConfigError, UserError

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Grüße aus Köln — naïve café, ½ €",
    "日本語のテキスト、中文，한국어",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "math ∀x∈ℝ: x² ≥ 0",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_tokenizers(built, text: str) -> None:
    enc = built.tok.encode(text, add_special_tokens=False)
    assert built.tok.decode(enc.ids) == text
    assert all(0 <= i < built.tok.get_vocab_size() for i in enc.ids)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_transformers(built, text: str) -> None:
    ids = built.hf(text, add_special_tokens=False)["input_ids"]
    assert built.hf.decode(ids) == text
    # The same files give the same ids through both libraries.
    assert ids == built.tok.encode(text, add_special_tokens=False).ids


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_round_trip_any_text(mixtral, text: str) -> None:
    ids = mixtral.tok.encode(text, add_special_tokens=False).ids
    assert mixtral.tok.decode(ids, skip_special_tokens=False) == text


def test_special_token_ids_match(built) -> None:
    ids, tok, hf = built.ids, built.tok, built.hf
    assert hf.eos_token_id == ids["eos"]
    assert hf.pad_token_id == ids["pad"]
    if built.family == "mixtral":
        assert ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 0}
        assert tok.token_to_id("<s>") == ids["bos"] == hf.bos_token_id
        assert tok.token_to_id("</s>") == ids["eos"]
        assert tok.token_to_id("<unk>") == ids["unk"] == hf.unk_token_id
    elif built.family == "qwen3_moe":
        assert "bos" not in ids and hf.bos_token_id is None
        assert tok.token_to_id("<|im_end|>") == ids["eos"] == ids["im_end"]
        assert tok.token_to_id("<|im_start|>") == ids["im_start"]
        assert tok.token_to_id("<|endoftext|>") == ids["pad"] == ids["endoftext"]
    else:  # gpt_oss: harmony
        assert "bos" not in ids and hf.bos_token_id is None
        assert tok.token_to_id("<|return|>") == ids["eos"] == ids["return"]
        assert [ids[n] for n in ("start", "end", "message", "channel")] == [1, 2, 3, 4]
        assert tok.token_to_id("<|endoftext|>") == ids["pad"] == ids["endoftext"] == 0
    # Special tokens are matched as a whole even inside text.
    eos_text = {"mixtral": "</s>", "qwen3_moe": "<|im_end|>", "gpt_oss": "<|return|>"}
    assert tok.encode("a" + eos_text[built.family]).ids[-1] == ids["eos"]


def test_bos_prepended_only_for_mixtral(built) -> None:
    ids = built.tok.encode("Hello").ids
    hf_ids = built.hf("Hello")["input_ids"]
    assert ids == hf_ids
    if built.family == "mixtral":
        assert ids[0] == built.ids["bos"] and ids.count(built.ids["bos"]) == 1
    else:
        assert ids == built.tok.encode("Hello", add_special_tokens=False).ids


def test_config_file(built) -> None:
    cfg = json.loads((built.path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_max_length"] == 4096 == built.hf.model_max_length
    assert isinstance(cfg["chat_template"], str) and "{%" in cfg["chat_template"]


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
]


def test_chat_template_mixtral(mixtral) -> None:
    text = mixtral.hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] Be brief.\n\nHi there [/INST]Hello.</s>[INST] Bye [/INST]"
    ids = mixtral.hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    # The template carries bos itself: tokenizing it must not add a second one.
    assert ids[0] == mixtral.ids["bos"] and ids.count(mixtral.ids["bos"]) == 1
    assert ids.count(mixtral.ids["eos"]) == 1
    assert ids == mixtral.tok.encode(text, add_special_tokens=False).ids


def test_chat_template_mixtral_rejects_bad_roles(mixtral) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        mixtral.hf.apply_chat_template(bad, tokenize=False)


def test_chat_template_qwen3(qwen3) -> None:
    text = qwen3.hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = qwen3.hf.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert no_prompt + "<|im_start|>assistant\n" == text
    ids = qwen3.tok.encode(text).ids
    assert ids.count(qwen3.ids["im_start"]) == 5 and ids.count(qwen3.ids["im_end"]) == 4


@pytest.mark.parametrize("vocab_size", [300, 1000])
def test_vocab_size_is_filled_when_corpus_allows(tmp_path: Path, vocab_size: int) -> None:
    build_demo_tokenizer(tmp_path, "qwen3_moe", vocab_size)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab_size
    ids = tok.encode("The capital of France is Paris. 🎉").ids
    assert max(ids) < vocab_size


def test_large_vocab_is_an_upper_bound(built) -> None:
    n = built.tok.get_vocab_size()
    assert 1000 < n <= built.vocab_size


def test_deterministic_across_processes(tmp_path: Path) -> None:
    build_demo_tokenizer(tmp_path / "a", "mixtral", 2000)
    code = (
        "import sys; from pathlib import Path;"
        "from services.core.tokenizer_build import build_demo_tokenizer;"
        "build_demo_tokenizer(Path(sys.argv[1]), 'mixtral', 2000)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, timeout=60)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_family_aliases() -> None:
    assert normalize_family("Qwen3-MoE") == "qwen3_moe"
    assert normalize_family("MIXTRAL") == "mixtral"


@pytest.mark.parametrize(
    ("family", "vocab_size", "match"),
    [
        ("llama", 1000, "unknown model family 'llama'"),
        ("mixtral", 100, "vocab_size 100 out of range"),
        ("mixtral", 10**9, "out of range"),
        ("mixtral", 1000.0, "vocab_size must be an integer"),
        ("mixtral", True, "vocab_size must be an integer"),
    ],
)
def test_bad_input_is_a_config_error(tmp_path: Path, family, vocab_size, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_demo_tokenizer(tmp_path, family, vocab_size)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert not (tmp_path / "tokenizer.json").exists()


def test_bad_model_max_length(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_max_length"):
        build_demo_tokenizer(tmp_path, "mixtral", 1000, model_max_length=0)


def test_chat_template_harmony(tmp_path) -> None:
    from transformers import AutoTokenizer

    build_demo_tokenizer(tmp_path, "gpt_oss", 2000)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == ("<|start|>system<|message|>Be brief.<|end|>"
                    "<|start|>user<|message|>Hi there<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
                    "<|start|>user<|message|>Bye<|end|><|start|>assistant")
