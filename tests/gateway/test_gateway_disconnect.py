"""Non-streaming requests whose clients go away are aborted downstream, every one of them
(issue #25: 5 of 25 ran to their end). Real HTTP clients that give up and close their
connections; the replicas' own abort counters are the witness."""

from __future__ import annotations

import asyncio
import time

import httpx
from metrics_helpers import scrape_metrics

from services.launch.procs import LocalMesh

N = 25


def _aborted(mesh: LocalMesh) -> float:
    key = 'megascale:request_success_total{reason="abort"}'
    return sum(scrape_metrics(a.info["metrics_port"]).get(key, 0.0) for a in mesh.attention)


def test_every_disconnected_non_streaming_request_is_aborted(stack):
    before = _aborted(stack.mesh)
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
    end = time.monotonic() + 30
    while _aborted(stack.mesh) < before + gave_up and time.monotonic() < end:
        time.sleep(0.1)
    assert _aborted(stack.mesh) == before + gave_up
