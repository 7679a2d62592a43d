"""IncrementalDetokenizer on the real demo tokenizer: complete UTF-8 deltas only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.detokenize import IncrementalDetokenizer

TEXT = "Hi 🎉! Grüße, 日本語 and 👨‍👩‍👧 end."


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_prefix_by_prefix_yields_full_text(built) -> None:
    ids = built.tok.encode(TEXT, add_special_tokens=False).ids
    deltas = _stream(IncrementalDetokenizer(built.tok), ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    # Multi-byte characters really are split across tokens here, so some pushes must wait.
    assert deltas.count("") > 1
    emitted = ""
    for i, delta in enumerate(deltas[:-1]):
        emitted += delta
        # Whatever was emitted is a prefix of the final text and never taken back.
        assert TEXT.startswith(emitted)
        full = built.tok.decode(ids[: i + 1])
        if not full.endswith("\ufffd"):
            assert emitted == full


def test_waits_for_split_character(mixtral) -> None:
    ids = mixtral.tok.encode("🎉", add_special_tokens=False).ids
    assert len(ids) > 1  # the emoji is several byte tokens in this tiny vocabulary
    detok = IncrementalDetokenizer(mixtral.tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.pending_tokens == len(ids) - 1
    assert detok.push(ids[-1]) == "🎉"
    assert detok.pending_tokens == 0 and detok.text == "🎉" and detok.num_tokens == len(ids)


def test_flush_emits_incomplete_bytes_as_replacement(mixtral) -> None:
    ids = mixtral.tok.encode("a🎉", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(mixtral.tok)
    assert "".join(detok.push(i) for i in ids[:-1]) == "a"
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_invalid_byte_in_the_middle_does_not_block(mixtral) -> None:
    lead = mixtral.tok.encode("🎉", add_special_tokens=False).ids[0]  # a lone lead byte
    tail = mixtral.tok.encode(" ok", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(mixtral.tok)
    assert detok.push(lead) == ""
    assert "".join(detok.push(i) for i in tail) == "\ufffd ok"


def test_special_tokens_skipped_or_kept(built) -> None:
    ids = built.tok.encode("ok", add_special_tokens=False).ids + [built.ids["eos"]]
    assert "".join(_stream(IncrementalDetokenizer(built.tok), ids)) == "ok"
    kept = "".join(_stream(IncrementalDetokenizer(built.tok, skip_special_tokens=False), ids))
    assert kept == "ok" + built.tok.id_to_token(built.ids["eos"])


def test_ids_beyond_tokenizer_vocab_decode_to_nothing(built) -> None:
    # The model's vocab_size may exceed the tokenizer's: such ids must not break the stream.
    unknown = built.vocab_size - 1
    assert built.tok.id_to_token(unknown) is None
    ids = built.tok.encode("é!", add_special_tokens=False).ids
    assert "".join(_stream(IncrementalDetokenizer(built.tok), [unknown, *ids, unknown])) == "é!"


def test_works_with_transformers_tokenizer(built) -> None:
    ids = built.hf(TEXT, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(built.hf, prompt_ids=built.hf("Prompt: ")["input_ids"])
    assert "".join(_stream(detok, ids)) == TEXT == detok.text


def test_batched_pushes(mixtral) -> None:
    ids = mixtral.tok.encode(TEXT, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(mixtral.tok)
    out = detok.push(ids[:7]) + detok.push([]) + detok.push(ids[7:]) + detok.flush()
    assert out == TEXT


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_any_text_any_chunking(mixtral, text: str, cuts: list[int]) -> None:
    ids = mixtral.tok.encode(text, add_special_tokens=False).ids
    bounds = sorted({0, len(ids), *(c for c in cuts if c < len(ids))})
    detok = IncrementalDetokenizer(mixtral.tok, skip_special_tokens=False)
    out = "".join(detok.push(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert out + detok.flush() == text


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_ids_rejected(mixtral, bad) -> None:
    detok = IncrementalDetokenizer(mixtral.tok)
    for ids in (bad, [7, bad]):
        with pytest.raises(ValueError, match="non-negative integers"):
            detok.push(ids)
    assert detok.num_tokens == 0 and detok.push(7) == mixtral.tok.decode([7])


def test_bad_context_tokens(mixtral) -> None:
    with pytest.raises(ValueError, match="context_tokens"):
        IncrementalDetokenizer(mixtral.tok, context_tokens=-1)


def test_numpy_integer_ids_accepted(mixtral) -> None:
    np = pytest.importorskip("numpy")
    ids = np.array(mixtral.tok.encode("né", add_special_tokens=False).ids, dtype=np.int64)
    detok = IncrementalDetokenizer(mixtral.tok)
    assert "".join(detok.push(i) for i in ids) + detok.push(ids[:0]) == "né"
