"""``Attention.GenerateStream``: many requests over one call, one message per delivery burst,
against real attention / expert processes."""

from __future__ import annotations

import queue
import time

import grpc
import pytest
from engine_helpers import grpc_generate
from metrics_helpers import scrape_metrics

from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from services.launch.procs import LocalMesh

_CLOSE = object()


@pytest.fixture(scope="module")
def mesh(engine_ckpt, tmp_path_factory):
    with LocalMesh.start(engine_ckpt("mixtral"), [list(range(8))], micro_batches=2,
                         workdir=tmp_path_factory.mktemp("stream"),
                         attention_args=["--metrics-port", "0"]) as m:
        yield m


def submit(request_id: str, prompt: list[int], max_tokens: int
           ) -> attention_pb2.GenerateStreamRequest:
    return attention_pb2.GenerateStreamRequest(submit=attention_pb2.StreamSubmit(
        request=attention_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens,
                                               ignore_eos=True)),
        arrival_unix_ns=time.time_ns()))


class StreamClient:
    """A GenerateStream call whose requests are sent from a queue (``send``, ``close``)."""

    def __init__(self, channel: grpc.Channel, timeout: float = 60.0) -> None:
        self._out: queue.Queue = queue.Queue()
        self.call = attention_pb2_grpc.AttentionStub(channel).GenerateStream(
            iter(self._out.get, _CLOSE), timeout=timeout)

    def send(self, msg: attention_pb2.GenerateStreamRequest) -> None:
        self._out.put(msg)

    def close(self) -> None:
        self._out.put(_CLOSE)


def finished(mesh: LocalMesh, reason: str) -> float:
    """Requests the replica finished for ``reason`` (counted by its engine)."""
    port = mesh.attention[0].info["metrics_port"]
    key = f'megascale:replica_request_success_total{{reason="{reason}"}}'
    return scrape_metrics(port).get(key, 0.0)


def running(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return attention_pb2_grpc.AttentionStub(ch).GetLoad(attention_pb2.GetLoadRequest(),
                                                            timeout=10).running


def test_one_call_carries_many_requests_in_bursts(mesh):
    """Requests submitted together and later in one call stream the same greedy tokens as one
    Generate call each, each in order with exactly one final event, several per message."""
    address = mesh.attention[0].grpc
    jobs = {f"s{i}": ([5 + i, 17, 3 * i + 1][: 1 + i % 3], 4 + 3 * i) for i in range(6)}
    tokens: dict[str, list[int]] = {rid: [] for rid in jobs}
    finals: dict[str, int] = {}
    messages = events = 0
    with grpc.insecure_channel(address) as ch:
        client = StreamClient(ch)
        for rid in list(jobs)[:4]:
            client.send(submit(rid, *jobs[rid]))
        late = True
        for msg in client.call:
            messages += 1
            assert msg.events, "an empty message"
            for se in msg.events:
                events += 1
                assert se.rejected_code == 0, se.rejected_message
                assert se.request_id not in finals, "an event after the final one"
                assert se.event.index == len(tokens[se.request_id]), "gap or duplicate"
                tokens[se.request_id].extend(se.event.token_ids)
                if se.event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finals[se.request_id] = se.event.finish_reason
            if late:  # the other two join a running call, then the client half-closes
                late = False
                for rid in list(jobs)[4:]:
                    client.send(submit(rid, *jobs[rid]))
                client.close()
    assert finals == {rid: common_pb2.FINISH_REASON_LENGTH for rid in jobs}
    for rid, (prompt, max_tokens) in jobs.items():
        assert tokens[rid] == grpc_generate(address, f"ref-{rid}", prompt, max_tokens).tokens
    assert messages < events, "every event went in a message of its own"


def test_refusals_and_aborts_stay_per_request(mesh):
    """Bad submissions are refused with INVALID_ARGUMENT one by one and an abort ends only its
    request; the call goes on for the others and ends after the half-close."""
    address = mesh.attention[0].grpc
    bad = {"": [1], "empty": [], "vocab": [10**6], "dup": [1, 2]}
    with grpc.insecure_channel(address) as ch:
        client = StreamClient(ch)
        client.send(submit("long", [1, 2, 3], 40))
        client.send(submit("dup", [4], 6))
        for rid, prompt in bad.items():
            client.send(submit(rid, prompt, 4))
        client.send(submit("short", [7, 8], 3))
        rejected: dict[str, tuple[int, str]] = {}
        finals: dict[str, int] = {}
        aborted = False
        for msg in client.call:
            for se in msg.events:
                if se.rejected_code:
                    rejected[se.request_id] = (se.rejected_code, se.rejected_message)
                elif se.event.finish_reason:
                    finals[se.request_id] = se.event.finish_reason
                elif se.request_id == "long" and not aborted:
                    aborted = True
                    client.send(attention_pb2.GenerateStreamRequest(
                        abort=attention_pb2.AbortRequest(request_id="long")))
                    client.send(attention_pb2.GenerateStreamRequest(  # not ours: ignored
                        abort=attention_pb2.AbortRequest(request_id="someone-else")))
            if {"long", "short", "dup"} <= finals.keys():
                client.close()
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert {rid: code for rid, (code, _) in rejected.items()} == {rid: invalid for rid in bad}
    assert "request_id" in rejected[""][1]
    assert "empty" in rejected["empty"][1] and "vocabulary" in rejected["vocab"][1]
    assert "already in use" in rejected["dup"][1]
    assert finals["long"] == common_pb2.FINISH_REASON_ABORT
    assert finals["short"] == finals["dup"] == common_pb2.FINISH_REASON_LENGTH
    assert running(address) == 0


def test_ending_the_call_aborts_its_requests(mesh):
    """A client that cancels the call (or goes away) leaves nothing running."""
    address = mesh.attention[0].grpc
    aborted, ended = finished(mesh, "abort"), finished(mesh, "length")
    with grpc.insecure_channel(address) as ch:
        client = StreamClient(ch)
        for i in range(2):  # 2 x 4000 tokens: seconds of decoding (the pool holds both)
            client.send(submit(f"gone-{i}", [3, i + 1], 4000))
        next(client.call)
        assert running(address) > 0
        client.call.cancel()
    deadline = time.monotonic() + 30
    while running(address) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(address) == 0
    # aborted, not run to their end: the engine counts them though no stream took the event
    assert finished(mesh, "abort") == aborted + 2
    assert finished(mesh, "length") == ended
    # the replica serves the next call as before
    with grpc.insecure_channel(address) as ch:
        client = StreamClient(ch)
        client.send(submit("after", [9], 2))
        client.close()
        got = [se for msg in client.call for se in msg.events]
    assert got[-1].event.finish_reason == common_pb2.FINISH_REASON_LENGTH
