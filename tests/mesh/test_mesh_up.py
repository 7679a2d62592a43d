"""`megascale up` end to end: the official openai client against the whole mesh (real
redis-server, scheduler-backed replica picking, 2 experts, 2 attention replicas, m = 2),
Prometheus metrics on every role, one trace across roles, and a clean SIGTERM shutdown."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0, timeout=120)


def counters(url: str) -> dict[str, float]:
    """Sum of every sample of each metric family at a /metrics URL (parsed by the official
    parser, so a malformed exposition fails the test)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {fam.name: sum(s.value for s in fam.samples)
            for fam in text_string_to_metric_families(text)}


def test_greedy_completion_equals_transformers(up, client, hf_greedy):
    tok = AutoTokenizer.from_pretrained(up.model_dir)
    prompt = "The experts answered"
    ids = tok.encode(prompt)
    want = tok.decode(hf_greedy(up.model_dir, [ids], NEW_TOKENS)[0], skip_special_tokens=True)
    got = client.completions.create(model=up.model, prompt=prompt, max_tokens=NEW_TOKENS,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == NEW_TOKENS


def test_launcher_flags_reach_every_role(up, client):
    """--device/--dtype auto resolve to the CPU here; --served-model-name and --max-model-len
    reach the gateway (and the replicas: a request over the length is refused)."""
    ready = up.ready()
    for name in ("expert-0", "expert-1", "attention-0", "attention-1"):
        assert (ready[name]["device"], ready[name]["dtype"]) == ("cpu", "float32"), name
    assert [m.id for m in client.models.list().data] == [up.model] != [up.model_dir.name]
    for name in ("scheduler", "expert-0", "expert-1", "attention-0", "attention-1", "gateway"):
        port = ready[name]["metrics_port"]
        assert f"{name}=http://127.0.0.1:{port}/metrics" in up.banner, up.banner
    # the API key reached the gateway through a file: no process shows it in its argv
    assert httpx.get(f"{up.base_url}/models").status_code == 401
    for info in ready.values():
        argv = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
        assert up.api_key.encode() not in argv
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=up.model, prompt=[5] * 100, max_tokens=up.max_model_len)
    assert str(up.max_model_len) in str(info.value)


def test_streaming_chat_and_concurrency(up, client):
    def run(i: int, out: list) -> None:
        stream = client.chat.completions.create(
            model=up.model, messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        out.append((i, text, finish))

    results: list = []
    threads = [threading.Thread(target=run, args=(i, results)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 20 and all(f == "length" for _, _, f in results)
    by_prompt = {i: text for i, text, _ in results}
    again: list = []
    run(3, again)  # greedy: the same text alone as under load
    assert again[0][1] == by_prompt[3]


def test_metrics_on_every_role_move(up, client):
    ready = up.ready()
    urls = {name: f"http://127.0.0.1:{info['metrics_port']}/metrics"
            for name, info in ready.items()}
    assert {"scheduler", "gateway", "expert-0", "expert-1", "attention-0",
            "attention-1"} <= set(urls)
    before = {name: counters(u) for name, u in urls.items()}
    for _ in range(4):  # requests spread over both replicas by the scheduler
        client.completions.create(model=up.model, prompt=[5, 6, 7], max_tokens=4,
                                  temperature=0)
    after = {name: counters(u) for name, u in urls.items()}

    def moved(name: str, metric: str) -> bool:
        return after[name].get(metric, 0) > before[name].get(metric, 0)

    assert moved("gateway", "megascale:gateway_requests")
    assert moved("expert-0", "megascale:expert_tokens") or moved("expert-1",
                                                                 "megascale:expert_tokens")
    assert any(moved(f"attention-{i}", "megascale:replica_generation_tokens") for i in (0, 1))
    assert any(moved(f"attention-{i}", "megascale:replica_time_to_first_token_seconds")
               for i in (0, 1))
    assert moved("scheduler", "megascale:scheduler_pick_replica")
    for i in (0, 1):
        assert "megascale:kv_cache_usage_perc" in after[f"attention-{i}"]
    for name, got in after.items():  # every role froze its start-up heap and times GC pauses
        assert got["python_gc_frozen_objects"] > 10_000, name
        assert "python_gc_pause_seconds" in got and got["process_cpu_seconds"] > 0, name


def test_one_trace_spans_gateway_attention_and_expert(up):
    trace_id = secrets.token_hex(16)
    r = httpx.post(f"{up.base_url}/completions", timeout=120, json={
        "model": up.model, "prompt": "trace me", "max_tokens": 4, "temperature": 0},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
                 "Authorization": f"Bearer {up.api_key}"})
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    want = {"megascale-gateway", "megascale-attention", "megascale-expert"}
    while time.monotonic() < deadline and not want <= up.otlp.services_for(trace_id):
        time.sleep(0.2)
    assert want <= up.otlp.services_for(trace_id)


def test_a_killed_role_is_restarted_and_the_mesh_serves_on(up, client):
    """megascale up supervises: SIGKILL one expert node and it comes back on the same
    addresses (a new process), rejoins through the scheduler, and requests that need its
    experts complete again; the launcher and every other role stay up."""
    before = up.ready()
    victim = before["expert-1"]
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 90
    while up.ready().get("expert-1", victim)["pid"] == victim["pid"]:  # (rewritten when up)
        assert time.monotonic() < deadline, "expert-1 was not restarted"
        assert up.proc.poll() is None, "the launcher exited"
        time.sleep(0.2)
    again = up.ready()["expert-1"]
    assert (again["grpc"], again["m2n_url"]) == (victim["grpc"], victim["m2n_url"])
    # every expert is needed by some of these prompts: retry until the mesh has healed
    while True:
        try:
            for i in range(4):
                client.completions.create(model=up.model, prompt=f"after {i}", max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "requests kept failing after the restart"
            time.sleep(0.5)
    print(f"expert-1 SIGKILLed: serving again after {time.monotonic() - killed:.1f} s")
    now = up.ready()
    for name in ("scheduler", "expert-0", "attention-0", "attention-1", "gateway"):
        assert now[name]["pid"] == before[name]["pid"], f"{name} was restarted too"
    assert up.proc.poll() is None


def test_requests_go_on_while_redis_restarts(up, client):
    """SIGKILL the launch's redis-server: requests keep being served (the scheduler picks
    from its view of the nodes), and the launcher brings Redis back on its port."""

    argv = Path(f"/proc/{up.ready()['scheduler']['pid']}/cmdline").read_bytes().split(b"\0")
    url = argv[argv.index(b"--redis-url") + 1].decode()      # redis://127.0.0.1:PORT/0
    port = url.rsplit(":", 1)[1].split("/")[0]

    def redis_pids() -> list[int]:  # redis-server retitles itself "redis-server HOST:PORT"
        out = subprocess.run(["pgrep", "-f", f"redis-server .*:{port}"],
                             capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    (old,) = redis_pids()
    os.kill(old, signal.SIGKILL)
    for i in range(3):  # while it is down or coming back
        client.completions.create(model=up.model, prompt=f"no redis {i}", max_tokens=3,
                                  temperature=0)
    deadline = time.monotonic() + 60
    while redis_pids() in ([], [old]):
        assert time.monotonic() < deadline, "redis-server was not restarted"
        time.sleep(0.2)
    client.completions.create(model=up.model, prompt="redis is back", max_tokens=3,
                              temperature=0)
    assert up.proc.poll() is None


def test_internal_links_require_the_launchs_cluster_token(up):
    """megascale up writes a cluster token (mode 0600) and every role requires it: an internal
    gRPC call without it is UNAUTHENTICATED (health probes stay open), a libm2n sender without
    it is refused before it gets slot memory."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import libm2n
    from megascale.v1 import attention_pb2, attention_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

    token_file = up.workdir / "cluster.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text()
    ready = up.ready()
    attention = ready["attention-0"]["grpc"]
    with grpc.insecure_channel(attention) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetLoad(attention_pb2.GetLoadRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:  # a streaming method too
            list(stub.Generate(attention_pb2.GenerateRequest(request_id="x",
                                                             prompt_token_ids=[1]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        from services.common import auth
        stub.GetLoad(attention_pb2.GetLoadRequest(), timeout=10,
                     metadata=[(auth.ROLE_KEY, "admin"), (auth.CREDENTIAL_KEY,
                                                         auth.role_credential(token.encode(),
                                                                              "admin"))])
        # the gateway holds only its own role's credential, not the token
        gateway = auth.load_credential(up.workdir / "gateway.credential")
        assert gateway.token is None and gateway.role == "gateway"
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(ready["scheduler"]["grpc"]) as ch:
        with pytest.raises(grpc.RpcError) as info:
            scheduler_pb2_grpc.SchedulerStub(ch).Deregister(
                scheduler_pb2.DeregisterRequest(node_id="attention-0"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(libm2n.PeerLost, match="failed authentication"):
        libm2n.connect(ready["expert-0"]["m2n_url"],
                       libm2n.SenderConfig(sender_id=4242, connect_timeout_s=5))


def test_sigterm_stops_every_child_and_leaves_no_shared_memory(up):
    pids = [info["pid"] for info in up.ready().values()]
    redis_pid = _redis_pid(up.workdir)
    shm_before = set(os.listdir("/dev/shm"))
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    alive = [p for p in [*pids, redis_pid] if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    assert not alive, f"children left running: {alive}"
    leftover = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("m2n-")}
    assert not leftover and not any(n.startswith("m2n-") for n in os.listdir("/dev/shm"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes (its parent will reap it)
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _redis_pid(workdir: Path) -> int:
    for line in (workdir / "redis.log").read_text().splitlines():
        if "pid=" in line:
            return int(line.split("pid=")[1].split(",")[0])
    raise AssertionError("redis-server did not log its pid")

