"""The OpenAI wire format: request models, their validation, and response/chunk builders.

Requests are parsed with pydantic in *strict* mode (``"5"`` is not an int, ``1`` is not a
bool), so a wrong type is a 400 naming the field, never a silent coercion. Every field is
either honoured or refused: an unknown field is a 400 naming it, and so are known-but-
unsupported values (``suffix``, non-text content parts). ``user`` is accepted: it only labels
the request, as at OpenAI.

Honoured beyond the OpenAI basics (vLLM spelling): ``top_k``, ``min_p``, ``ignore_eos``,
``stop_token_ids``, ``min_tokens``, ``repetition_penalty``, ``bad_words``,
``include_stop_str_in_output``, ``prompt_logprobs``, ``return_token_ids`` (adds
``prompt_token_ids`` and each choice's ``token_ids``),
``stream_options.continuous_usage_stats``, ``chat_template_kwargs``,
``add_generation_prompt``, structured outputs (``response_format``, ``structured_outputs``,
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``), ``n`` and
``best_of`` (independent sequences), batched completion prompts, and tools
(services/gateway/tools.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.logits_processors import TokenLogprobs
from services.core.request import InvalidField
from services.core.structured import compile_grammar
from services.gateway.backend import GenRequest, ReplicaGroup
from services.gateway.errors import GatewayError, bad_request, invalid_field
from services.gateway.generation import (
    MAX_CHOICES,
    check_choices,
    check_request,
    make_sampling,
    sibling_sampling,
)
from services.gateway.text import ModelText
from services.gateway.tools import ToolPlan
from services.gateway.tools import plan as tool_plan


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # usage (so far) on every chunk


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of the constraints."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
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
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool | None = False
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
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


class FunctionCall(_Strict):
    name: str
    arguments: str


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name, handed to the chat template
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call it answers


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True


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


def check_model(req: _Strict, text: ModelText) -> None:
    if req.model != text.card.id:
        raise GatewayError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{text.card.id!r}", param="model", code="model_not_found")


@dataclass
class ApiPlan:
    """A validated OpenAI request as the sequences it runs and how to answer with them.

    ``gens[i]`` is choice ``i``'s sequence (prompt ``prompt_of[i]``); with ``best_of`` the
    ``keep`` best per prompt (by cumulative logprob) become the answer's choices.
    """

    gens: list[GenRequest]
    prompt_of: list[int]
    prompts: list[list[int]]
    logprobs: int | None = None     # top alternatives to show (None: no logprobs)
    echo: list[str] | None = None   # per prompt: its text, put before the choices' text
    keep: int = 1                   # choices per prompt in the answer (n)
    best_of: int = 1                # sequences per prompt run (>= keep)
    tools: ToolPlan | None = None
    prompt_logprobs: int | None = None  # vLLM's choices[].prompt_logprobs, top k

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def to_plan(req: _Common, text: ModelText, request_id: str, tool_parser: str = "hermes"
            ) -> ApiPlan:
    """A validated OpenAI request -> the sequences to run (all 400s raised here)."""
    check_model(req, text)
    chat = isinstance(req, ChatRequest)
    n, best_of = check_choices(req.n, req.best_of if isinstance(req, CompletionRequest)
                               else None)
    logprobs: int | None = None
    echo = False
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if best_of > n and req.stream:
            raise bad_request("best_of > n cannot stream", "best_of")
        logprobs = req.logprobs
        echo = bool(req.echo)
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if req.logprobs:
            logprobs = req.top_logprobs or 0
    tools = (tool_plan(req.tools, req.tool_choice, tool_parser,
                       req.parallel_tool_calls is not False) if chat else None)
    grammar = _grammar(req, text, tools)
    max_tokens, mt_param = req.max_tokens, "max_tokens"
    if chat and req.max_completion_tokens is not None:
        max_tokens, mt_param = req.max_completion_tokens, "max_completion_tokens"
    common = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                  max_tokens=max_tokens, stop_token_ids=req.stop_token_ids,
                  ignore_eos=bool(req.ignore_eos), max_tokens_param=mt_param,
                  min_tokens=req.min_tokens, min_p=req.min_p,
                  presence_penalty=req.presence_penalty,
                  frequency_penalty=req.frequency_penalty,
                  repetition_penalty=req.repetition_penalty,
                  logit_bias=_logit_bias(req.logit_bias),
                  bad_words_ids=text.bad_words_ids(req.bad_words or []), grammar=grammar,
                  logprobs_param="top_logprobs" if chat else "logprobs",
                  # best_of ranks by cumulative logprob: it needs the sampled tokens'
                  logprobs=logprobs if best_of == n else (logprobs or 0),
                  # echo with logprobs shows the prompt tokens' too
                  prompt_logprobs=(max(logprobs, req.prompt_logprobs or 0)
                                   if echo and logprobs is not None else req.prompt_logprobs))
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if isinstance(req, CompletionRequest):
        prompts, param = _completion_prompts(req.prompt, text), "prompt"
    else:
        prompts = [text.encode_chat(_messages(req.messages), tools=tools and tools.tools,
                                    add_generation_prompt=req.add_generation_prompt is not False,
                                    kwargs=req.chat_template_kwargs)]
        param = "messages"
    if len(prompts) * best_of > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x {best_of} sequences exceed "
                          f"{MAX_CHOICES} per request", "n")
    gens, prompt_of = [], []
    for pi, ids in enumerate(prompts):
        group = ReplicaGroup() if best_of > 1 else None  # one replica: the prompt KV shared
        sampling = make_sampling(seed=req.seed, **common)
        check_request(text, ids, sampling, stop, param)
        for j in range(best_of):
            rid = request_id if len(prompts) * best_of == 1 else f"{request_id}-{len(gens)}"
            gens.append(GenRequest(ids, sibling_sampling(sampling, j, best_of), stop,
                                   request_id=rid,
                                   include_stop_str=bool(req.include_stop_str_in_output),
                                   group=group))
            prompt_of.append(pi)
    return ApiPlan(gens, prompt_of, prompts, logprobs,
                   [text.decode(p) for p in prompts] if echo else None, n, best_of, tools,
                   req.prompt_logprobs)


def _grammar(req: _Common, text: ModelText, tools: ToolPlan | None) -> str | None:
    """The llguidance grammar of the request's structured-output fields (at most one)."""
    specs: list[tuple[str, str, Any]] = []  # (field, kind, spec)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(("response_format", "json_object", None))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema.schema is required",
                              "response_format")
        specs.append(("response_format", "json_schema", rf.json_schema.schema_))
    so = req.structured_outputs
    if so is not None:
        given = [(k, v) for k, v in (("json_schema", so.json_), ("regex", so.regex),
                                     ("choice", so.choice), ("grammar", so.grammar),
                                     ("json_object", so.json_object or None)) if v is not None]
        if len(given) != 1:
            raise bad_request("structured_outputs must hold exactly one of json, regex, choice,"
                              " grammar, json_object", "structured_outputs")
        specs.append(("structured_outputs", *given[0]))
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            specs.append((name, kind, getattr(req, name)))
    if tools is not None and tools.schema is not None:
        specs.append(("tool_choice", "json_schema", tools.schema))
    if not specs:
        return None
    if len(specs) > 1:
        raise bad_request(f"give one structured output constraint, got {specs[0][0]} and "
                          f"{specs[1][0]}", specs[1][0])
    field, kind, spec = specs[0]
    try:
        grammar = compile_grammar(kind, spec, field)
        text.grammars().check(grammar, field)
    except InvalidField as exc:
        raise invalid_field(exc) from None
    return grammar


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for k, v in (bias or {}).items():
        if not k.isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")
        out.append((int(k), v))
    return tuple(sorted(out))


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


def _completion_prompts(prompt: Any, text: ModelText) -> list[list[int]]:
    """``prompt``: a text, a token list, or a batch of either (one choice set each)."""
    batch = (prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
             else [prompt])
    if len(batch) > MAX_CHOICES:
        raise bad_request(f"prompt: at most {MAX_CHOICES} prompts per request", "prompt")
    out = []
    for p in batch:
        if isinstance(p, str):
            if not p:
                raise bad_request("prompt must not be empty", "prompt")
            out.append(text.encode_text(p))
        else:
            out.append(list(p))
    return out


# ---------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_json(text: ModelText, ids: list[int], lps: list[TokenLogprobs | None],
                  chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for ``ids`` (chat: ``content`` entries; completions:
    ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` from ``offset``; a
    None entry, the echoed prompt's first token, has no log-probability)."""
    toks = [text.token_str(t) for t in ids]
    if chat:
        return {"content": [
            {"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
             "top_logprobs": [{"token": (a := text.token_str(t)), "logprob": v,
                               "bytes": list(a.encode())}
                              for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]}
            for s, lp in zip(toks, lps, strict=True)]}
    offsets = []
    for s in toks:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": toks, "token_logprobs": [lp and lp.logprob for lp in lps],
            "top_logprobs": [lp and {text.token_str(t): v
                                     for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
                             for lp in lps],
            "text_offset": offsets}


def prompt_logprobs_json(text: ModelText, prompt: list[int], lps: list[TokenLogprobs],
                         k: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per prompt token a dict
    token id -> ``{logprob, rank, decoded_token}`` of the token itself and the top ``k``."""
    out: list[dict[str, Any] | None] = [None]
    for tok, lp in zip(prompt[1:], lps, strict=False):
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": text.token_str(t)}
                 for r, (t, v) in enumerate(zip(lp.top_ids[:k], lp.top_logprobs[:k],
                                                strict=True))}
        entry[str(tok)] = {"logprob": lp.logprob, "rank": lp.rank,
                           "decoded_token": text.token_str(tok)}
        out.append(entry)
    return out


def chunk(rid: str, model: str, created: int, chat: bool, index: int = 0, *,
          text: str | None = None, finish_reason: str | None = None,
          token_ids: list[int] | None = None, role: bool = False,
          include_usage: bool = False, logprobs: dict[str, Any] | None = None,
          tool_calls: list[dict[str, Any]] | None = None,
          usage_now: dict[str, int] | None = None) -> dict[str, Any]:
    """One SSE chunk with one choice (``usage: null`` when the client asked for usage, or the
    usage so far with ``continuous_usage_stats``)."""
    choice: dict[str, Any] = {"index": index, "logprobs": logprobs,
                              "finish_reason": finish_reason}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if token_ids is not None:
        choice["token_ids"] = token_ids
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "choices": [choice]}
    if usage_now is not None:
        out["usage"] = usage_now
    elif include_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, created: int, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The final chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
