"""Non-streaming requests whose clients go away are aborted downstream, every one of them
(issue #25: 5 of 25 ran to their end). Real HTTP clients that give up and close their
connections; the replicas' own finish counters are the witness: none of them runs to its
length (one the gateway cancels before it reached a replica never starts there)."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
from metrics_helpers import scrape_metrics

from megascale.v1 import attention_pb2, attention_pb2_grpc
from services.launch.procs import LocalMesh

N = 25


def _finished(mesh: LocalMesh, reason: str) -> float:
    key = f'megascale:request_success_total{{reason="{reason}"}}'
    return sum(scrape_metrics(a.info["metrics_port"]).get(key, 0.0) for a in mesh.attention)


async def _busy(addresses: list[str]) -> int:
    out = 0
    for a in addresses:
        async with grpc.aio.insecure_channel(a) as ch:
            r = await attention_pb2_grpc.AttentionStub(ch).GetLoad(
                attention_pb2.GetLoadRequest(), timeout=5)
            out += r.running + r.waiting
    return out


def test_every_disconnected_non_streaming_request_is_aborted(stack):
    lengths = _finished(stack.mesh, "length")
    body = {"model": "mixtral-gw", "prompt": "Once upon a time", "max_tokens": 240,
            "temperature": 0, "ignore_eos": True}

    async def give_up(i: int) -> bool:
        """True when the client gave up (and closed its connection) before the answer."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=0.3 + 0.02 * i)) as c:
            try:
                r = await c.post(stack.http + "/v1/completions", json=body)
            except httpx.ReadTimeout:
                return True
            assert r.status_code == 200, r.text
            return False

    async def all_give_up() -> int:
        return sum(await asyncio.gather(*(give_up(i) for i in range(N))))

    gave_up = asyncio.run(all_give_up())
    assert gave_up >= N // 2, gave_up  # 25 x 240 tokens take far longer than 0.3..0.8 s
    replicas = [a.grpc for a in stack.mesh.attention]
    end = time.monotonic() + 60
    while asyncio.run(_busy(replicas)) and time.monotonic() < end:
        time.sleep(0.1)
    assert asyncio.run(_busy(replicas)) == 0
    assert _finished(stack.mesh, "length") == lengths + (N - gave_up)
