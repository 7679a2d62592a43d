"""Failures downstream: a client disconnect aborts the request on the replica, and a replica
killed mid-stream is replaced by another that resumes from the tokens already streamed."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest
from metrics_helpers import scrape_metrics

from megascale.v1 import attention_pb2, attention_pb2_grpc
from services.launch.procs import LocalMesh

MODEL = "mixtral-gw"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
        "ignore_eos": True, "stream": True, "return_token_ids": True}


async def _loads(addresses: list[str]) -> list[int]:
    out = []
    for a in addresses:
        async with grpc.aio.insecure_channel(a) as ch:
            r = await attention_pb2_grpc.AttentionStub(ch).GetLoad(
                attention_pb2.GetLoadRequest(), timeout=5)
            out.append(r.running + r.waiting)
    return out


def _wait(cond, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _events(lines) -> list[dict]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def _aborted(mesh: LocalMesh) -> float:
    """Requests the replicas finished because they were aborted."""
    key = 'megascale:replica_request_success_total{reason="abort"}'
    return sum(scrape_metrics(a.info["metrics_port"]).get(key, 0.0) for a in mesh.attention)


def test_client_disconnect_aborts_downstream(stack):
    replicas = [a.grpc for a in stack.mesh.attention]
    before = _aborted(stack.mesh)
    with httpx.stream("POST", stack.http + "/v1/completions", json=LONG, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert _events(got)
        assert sum(asyncio.run(_loads(replicas))) >= 1  # it is running downstream
    assert _wait(lambda: sum(asyncio.run(_loads(replicas))) == 0)
    # aborted there, not run to its end (counted by the replica's engine)
    assert _wait(lambda: _aborted(stack.mesh) == before + 1)


def test_deadline_gives_504_and_aborts_downstream(stack, gateway_factory):
    """The gateway keeps each request's deadline on the shared replica stream: past it the
    client gets 504 and the replica stops the request."""
    gw = gateway_factory(stack.model_dir, [a.grpc for a in stack.mesh.attention],
                         stack.workdir, "gw-deadline", "--request-timeout", "0.1")
    try:
        before = _aborted(stack.mesh)
        resp = httpx.post(gw.info["http"] + "/v1/completions", timeout=60,
                          json={**LONG, "stream": False})
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["type"] == "timeout"
        replicas = [a.grpc for a in stack.mesh.attention]
        assert _wait(lambda: sum(asyncio.run(_loads(replicas))) == 0)
        assert _wait(lambda: _aborted(stack.mesh) == before + 1)
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def fragile(gw_model_dir, tmp_path_factory, gateway_factory):
    workdir = tmp_path_factory.mktemp("gw-failover")
    mesh = LocalMesh.start(gw_model_dir, expert_ids=[list(range(8))], attention_replicas=2,
                           micro_batches=2, workdir=workdir)
    try:
        gw = gateway_factory(gw_model_dir, [a.grpc for a in mesh.attention], workdir, "gw-f")
    except BaseException:
        mesh.stop()
        raise
    yield mesh, gw
    gw.stop()
    mesh.stop()


def test_replica_killed_mid_stream_is_resumed_elsewhere(fragile):
    mesh, gw = fragile
    body = {**LONG, "max_tokens": 120}
    resp = httpx.post(gw.info["http"] + "/v1/completions", timeout=120,
                      json={**body, "stream": False})
    assert resp.status_code == 200, resp.text
    ref = resp.json()["choices"][0]
    replicas = [a.grpc for a in mesh.attention]
    with httpx.stream("POST", gw.info["http"] + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        head = [next(lines) for _ in range(6)]
        loads = asyncio.run(_loads(replicas))
        victim = loads.index(1)
        mesh.attention[victim].kill()
        events = _events(head + list(lines))
    ids = [t for e in events if e.get("choices") for t in e["choices"][0]["token_ids"]]
    assert not any("error" in e for e in events), events
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(ids) == 120  # nothing lost, nothing duplicated
    assert ids == ref["token_ids"]  # greedy: the resumed replica continues the same sequence
    assert "".join(e["choices"][0]["text"] for e in events) == ref["text"]
    metrics = httpx.get(gw.info["http"] + "/metrics").text
    assert 'megascale:gateway_replica_retries_total{reason="resume"} 1.0' in metrics


def test_requests_go_on_while_the_scheduler_is_unreachable(stack, tmp_path, gateway_factory):
    """A gateway whose scheduler does not answer (down, or its Redis is) places requests
    on the replicas it knows (its --attention list) instead of failing them all."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: the scheduler is down
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = gateway_factory(stack.model_dir, [a.grpc for a in stack.mesh.attention], tmp_path,
                         "gateway-no-scheduler", "--scheduler", dead)
    try:
        for i in range(4):
            r = httpx.post(gw.info["http"] + "/v1/completions", timeout=60, json={
                "model": stack.model_dir.name, "prompt": f"still here {i}", "max_tokens": 3,
                "temperature": 0})
            assert r.status_code == 200, r.text
        log = (tmp_path / "gateway-no-scheduler.log").read_text()
        assert "unreachable" in log and "known replicas" in log
    finally:
        gw.stop()


def test_ready_tells_whether_a_request_could_be_served(stack, tmp_path, gateway_factory):
    """/health is liveness (the process serves); /ready is readiness: 200 when a replica
    answers and reaches every expert, 503 with the reason when none does."""
    import socket

    assert httpx.get(stack.http + "/ready", timeout=10).json() == {"status": "ready"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = gateway_factory(stack.model_dir, [dead], tmp_path, "gateway-dead-replica")
    try:
        assert httpx.get(gw.info["http"] + "/health", timeout=10).status_code == 200
        r = httpx.get(gw.info["http"] + "/ready", timeout=10)
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]["message"]
    finally:
        gw.stop()
