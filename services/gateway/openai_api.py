"""The OpenAI wire format: request models, their validation, and response/chunk builders.

Requests are parsed with pydantic in *strict* mode (``"5"`` is not an int, ``1`` is not a
bool), so a wrong type is a 400 naming the field, never a silent coercion. Every field is
either honoured or refused: an unknown field (``response_format``, ``min_p``, ...) is a 400
naming it, and so are known-but-unsupported values (``n > 1``, ``logprobs``, ``echo``,
``best_of > 1``, penalties, tools, non-text content parts). ``user`` is accepted: it only
labels the request, as at OpenAI.

Extension fields (vLLM spelling): ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``, and
``return_token_ids`` (adds ``prompt_token_ids`` and each choice's ``token_ids``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.gateway.backend import GenRequest
from services.gateway.errors import GatewayError, bad_request
from services.gateway.generation import Delta, check_request, make_sampling
from services.gateway.text import ModelText


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = None  # vLLM extension: no EOS / stop token id before this many
    stop_token_ids: list[int] | None = None
    return_token_ids: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None  # an end-user label; nothing depends on it


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]  # images and audio are not supported: a 400, never dropped
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name, handed to the chat template


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: ``prompt`` (raw text) or ``messages`` (the chat template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``."""

    model: str
    tokens: list[int]


def parse(model: type[_Strict], obj: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        where = ".".join(loc) or "body"
        msg = ("this field is not supported by this server" if err["type"] == "extra_forbidden"
               else err["msg"])
        raise bad_request(f"{where}: {msg}", loc[0] if loc else None) from None


def _is_union_tag(p: Any) -> bool:
    # pydantic names the union member it tried ("list[int]"); the client never wrote that.
    return isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool"))


def _unsupported(req: _Common) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"n must be 1 (one choice per request), got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise bad_request("logprobs is not supported", "logprobs")
        if req.echo:
            raise bad_request("echo is not supported", "echo")
        if req.best_of not in (None, 1):
            raise bad_request("best_of must be 1", "best_of")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
    if isinstance(req, ChatRequest):
        if req.logprobs or req.top_logprobs:
            raise bad_request("logprobs is not supported", "logprobs")
        if req.tools:
            raise bad_request("tools are not supported", "tools")


def check_model(req: _Strict, text: ModelText) -> None:
    if req.model != text.card.id:
        raise GatewayError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{text.card.id!r}", param="model", code="model_not_found")


def to_gen_request(req: _Common, text: ModelText, request_id: str) -> GenRequest:
    """A validated OpenAI request -> the gateway's GenRequest (all 400s raised here)."""
    _unsupported(req)
    check_model(req, text)
    max_tokens, mt_param = req.max_tokens, "max_tokens"
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens, mt_param = req.max_completion_tokens, "max_completion_tokens"
    sampling = make_sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                             seed=req.seed, max_tokens=max_tokens,
                             stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos),
                             max_tokens_param=mt_param, min_tokens=req.min_tokens)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if isinstance(req, CompletionRequest):
        prompt_ids, param = _completion_prompt(req.prompt, text), "prompt"
    else:
        prompt_ids, param = text.encode_chat(_messages(req.messages)), "messages"
    gen = GenRequest(prompt_ids, sampling, stop, request_id=request_id)
    check_request(text, prompt_ids, sampling, stop, param)
    return gen


def tokenize(req: TokenizeRequest, text: ModelText) -> dict[str, Any]:
    """``/tokenize``: the ids a request with this prompt or these messages would carry."""
    check_model(req, text)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        ids = text.encode_chat(_messages(req.messages))
    else:
        text.check_text_length([req.prompt], "prompt")
        ids = list(text.tokenizer.encode(req.prompt,
                                         add_special_tokens=bool(req.add_special_tokens)))
    return {"count": len(ids), "max_model_len": text.card.max_model_len, "tokens": ids}


def detokenize(req: DetokenizeRequest, text: ModelText) -> dict[str, Any]:
    """``/detokenize``: the text of ``tokens`` (special tokens skipped, as in completions)."""
    check_model(req, text)
    text.check_ids(req.tokens, "tokens")
    return {"prompt": text.decode(req.tokens)}


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as the chat template takes them (content "" when absent)."""
    out = [m.model_dump(exclude_none=True) for m in messages]
    for m in out:
        m.setdefault("content", "")
    return out


def _completion_prompt(prompt: Any, text: ModelText) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"prompt: one prompt per request, got a batch of {len(prompt)}",
                              "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return text.encode_text(prompt)
    return list(prompt)


# ---------------------------------------------------------------------- responses
def usage(d: Delta) -> dict[str, int]:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


def completion_response(rid: str, model: str, text: str, last: Delta, token_ids: list[int],
                        prompt_ids: list[int] | None, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                           "created": int(time.time()), "model": model, "choices": [choice],
                           "usage": usage(last)}
    if prompt_ids is not None:
        choice["token_ids"] = token_ids
        out["prompt_token_ids"] = prompt_ids
    return out


def chunk(rid: str, model: str, created: int, chat: bool, text: str | None,
          finish_reason: str | None, token_ids: list[int] | None = None,
          role: bool = False, include_usage: bool = False) -> dict[str, Any]:
    """One SSE chunk with one choice (``usage: null`` when the client asked for usage)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if token_ids is not None:
        choice["token_ids"] = token_ids
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, created: int, chat: bool, last: Delta) -> dict[str, Any]:
    """The final chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage(last)}

