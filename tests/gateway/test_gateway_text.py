"""Stop strings and incremental text (no processes: the real demo tokenizer only)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.text import ModelText, TextStream


@pytest.fixture(scope="module")
def text(gw_model_dir) -> ModelText:
    return ModelText(str(gw_model_dir), "m")


def _run(text: ModelText, ids: list[int], stop: tuple[str, ...], step: int) -> tuple[str, bool]:
    s = text.stream([], stop)
    out = []
    for i in range(0, len(ids), step):
        out.append(s.push(ids[i : i + step]))
        if s.stopped:
            return "".join(out), True
    out.append(s.finish())
    return "".join(out), False


def test_stop_string_across_tokens(text):
    ids = text.encode_text("the clockmaker smiled, took his tools")[1:]  # drop bos
    full = text.decode(ids)
    for stop in ("smiled", "d, t", "tools", "s"):
        for step in (1, 2, 5):
            got, stopped = _run(text, ids, (stop, "never-there"), step)
            assert (got, stopped) == (full[: full.index(stop)], True)
    got, stopped = _run(text, ids, ("absent!",), 1)
    assert (got, stopped) == (full, False)


@settings(max_examples=30, deadline=None)
@given(body=st.text(max_size=40), stop=st.text(min_size=1, max_size=4), step=st.integers(1, 4))
def test_stream_equals_truncated_decode(text, body, stop, step):
    ids = text.encode_text(body)[1:]
    full = text.decode(ids)
    got, stopped = _run(text, ids, (stop,), step)
    if stop in full:
        assert stopped and got == full[: full.index(stop)]
    else:
        assert not stopped and got == full


def test_held_back_text_is_released_when_it_is_not_a_stop(text):
    ids = text.encode_text("ab")[1:]
    s = TextStream(text.stream([], ()).__dict__["_detok"], ("abc",))
    assert "".join(s.push([t]) for t in ids) == ""  # "ab" could start "abc"
    assert s.finish() == "ab" and not s.stopped
