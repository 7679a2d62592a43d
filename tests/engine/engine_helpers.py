"""Helpers for the engine tests (imported by test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2


@dataclass
class Result:
    tokens: list[int]
    final: attention_pb2.GenerateEvent


def grpc_generate(address: str, request_id: str, prompt: list[int], max_tokens: int,
                  timeout: float = 120.0,
                  on_event: Callable[[attention_pb2.GenerateEvent], None] | None = None,
                  **sampling) -> Result:
    """Drive ``Attention.Generate`` to the end; returns the streamed tokens and last event
    (``on_event`` sees every event as it arrives)."""
    sampling.setdefault("temperature", 0.0)
    with grpc.insecure_channel(address) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)
        tokens: list[int] = []
        final = None
        req = attention_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                               **sampling))
        for ev in stub.Generate(req, timeout=timeout):
            assert ev.index == len(tokens), "gap or duplicate in the token stream"
            tokens.extend(ev.token_ids)
            final = ev
            if on_event is not None:
                on_event(ev)
        return Result(tokens, final)

