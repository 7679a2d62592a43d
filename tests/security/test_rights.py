"""Who may call what on the scheduler: role credentials from the cluster token, and mTLS
client certificates (services/common/auth.py, services/common/rights.py). A real scheduler
on a real redis-server; every refused call is a real gRPC call."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import as_role, status_of

from megascale.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common import auth, rights
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import Scheduler

pytestmark = pytest.mark.usefixtures("restore_auth")


def _config(redis_url: str) -> SchedulerConfig:
    return SchedulerConfig(redis_url=redis_url, num_experts=4,
                           key_prefix=f"t{uuid.uuid4().hex[:10]}:", node_ttl_s=5.0,
                           stats_interval_s=0.5, rpc_timeout_s=1.0)


def _attention(node_id: str) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(node_id=node_id, role=common_pb2.NODE_ROLE_ATTENTION,
                               grpc_address="127.0.0.1:1", m2n_url="tcp://127.0.0.1:2",
                               model="demo", kv_blocks=64, kv_block_size=16,
                               max_running_requests=8)


def test_every_internal_rpc_has_rights() -> None:
    from megascale.v1 import attention_pb2, expert_pb2
    methods = {f"/{s.full_name}/{m.name}"
               for mod, name in ((scheduler_pb2, "Scheduler"), (attention_pb2, "Attention"),
                                 (expert_pb2, "Expert"))
               for s in [mod.DESCRIPTOR.services_by_name[name]] for m in s.methods}
    assert methods == set(rights.RIGHTS), methods ^ set(rights.RIGHTS)


def test_token_roles_on_the_scheduler(redis_url: str, token: bytes) -> None:
    async def body() -> None:
        auth.configure(token, "scheduler")
        sched = Scheduler(_config(redis_url))
        await sched.start()
        try:
            async with grpc.aio.insecure_channel(sched.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                # no credential, a wrong one, a forged role: UNAUTHENTICATED
                assert await status_of(stub.Register(_attention("a-0"))) == \
                    grpc.StatusCode.UNAUTHENTICATED
                wrong = as_role(b"another cluster's token!", "attention")
                assert await status_of(stub.Register(_attention("a-0"), metadata=wrong)) == \
                    grpc.StatusCode.UNAUTHENTICATED
                assert await status_of(stub.PickReplica(scheduler_pb2.PickReplicaRequest())) == \
                    grpc.StatusCode.UNAUTHENTICATED
                # probes stay open
                health = health_pb2_grpc.HealthStub(ch)
                resp = await health.Check(health_pb2.HealthCheckRequest())
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                # a gateway may not join, an expert may not join as attention
                for role in ("gateway", "expert", "admin"):
                    assert await status_of(stub.Register(_attention("a-0"),
                                                     metadata=as_role(token, role))) == \
                        grpc.StatusCode.PERMISSION_DENIED, role
                # the attention credential may
                await stub.Register(_attention("a-0"), metadata=as_role(token, "attention"))
                # Deregister: not by a gateway or an expert; by the scheduler or the owner role
                for role in ("gateway", "expert"):
                    assert await status_of(stub.Deregister(
                        scheduler_pb2.DeregisterRequest(node_id="a-0"),
                        metadata=as_role(token, role))) == grpc.StatusCode.PERMISSION_DENIED, role
                # Heartbeat for an attention node: not with an expert's credential
                beat = scheduler_pb2.HeartbeatRequest(node_id="a-0")
                assert await status_of(stub.Heartbeat(beat, metadata=as_role(token, "expert"))) == \
                    grpc.StatusCode.PERMISSION_DENIED
                await stub.Heartbeat(beat, metadata=as_role(token, "attention"))
                picked = await stub.PickReplica(scheduler_pb2.PickReplicaRequest(),
                                                metadata=as_role(token, "gateway"))
                assert picked.node_id == "a-0"
                assert await status_of(stub.PickReplica(scheduler_pb2.PickReplicaRequest(),
                                                    metadata=as_role(token, "expert"))) == \
                    grpc.StatusCode.PERMISSION_DENIED
                await stub.Deregister(scheduler_pb2.DeregisterRequest(node_id="a-0"),
                                      metadata=as_role(token, "attention"))
            # auth.channel presents this process's role (the scheduler: no Register right)
            async with auth.channel(sched.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                assert await status_of(stub.Register(_attention("a-1"))) == \
                    grpc.StatusCode.PERMISSION_DENIED
                assert (await stub.GetPlacement(scheduler_pb2.GetPlacementRequest())).epoch == 0
        finally:
            await sched.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_role_credential_file_proves_only_its_role(tmp_path, token: bytes) -> None:
    path = auth.write_role_credential(tmp_path / "gateway.credential", token, "gateway")
    assert path.stat().st_mode & 0o077 == 0
    cred = auth.load_credential(path)
    assert cred.token is None and cred.role == "gateway"
    assert cred.role_credential == auth.role_credential(token, "gateway")
    with pytest.raises(Exception, match="holds the gateway role"):
        auth.configure(cred, "attention")
    auth.configure(cred, "gateway")
    assert auth.m2n_token() is None  # it cannot open libm2n links either
    with pytest.raises(Exception, match="cannot verify callers"):
        auth.server_interceptors()


def _tls_channel(address: str, files: tuple[str, str, str] | None, ca_file: str
                 ) -> grpc.aio.Channel:
    ca = open(ca_file, "rb").read()
    if files is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        cert, key, _ = files
        creds = grpc.ssl_channel_credentials(ca, open(key, "rb").read(), open(cert, "rb").read())
    return grpc.aio.secure_channel(address, creds,
                                   [("grpc.ssl_target_name_override", auth.TLS_SERVER_NAME)])


def test_mtls_roles_on_the_scheduler(redis_url: str, ca, make_ca, tmp_path) -> None:  # noqa: ANN001
    async def body() -> None:
        auth.configure(None, "scheduler", auth.TlsFiles.load(*ca.issue("scheduler")))
        sched = Scheduler(_config(redis_url))
        await sched.start()
        try:
            # plaintext, no client certificate, a certificate of another CA: no call gets in
            async with grpc.aio.insecure_channel(sched.address) as ch:
                assert await status_of(scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest(), timeout=3)) == \
                    grpc.StatusCode.UNAVAILABLE
            async with _tls_channel(sched.address, None, ca.ca_file) as ch:
                assert await status_of(scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest(), timeout=3)) == \
                    grpc.StatusCode.UNAVAILABLE
            (tmp_path / "other").mkdir()
            other = make_ca(tmp_path / "other", "other CA")
            async with _tls_channel(sched.address, other.issue("attention"), ca.ca_file) as ch:
                assert await status_of(scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest(), timeout=3)) == \
                    grpc.StatusCode.UNAVAILABLE
            # a gateway certificate cannot join; an attention one can, for its own node only
            async with _tls_channel(sched.address, ca.issue("gateway"), ca.ca_file) as ch:
                assert await status_of(scheduler_pb2_grpc.SchedulerStub(ch).Register(
                    _attention("a-0"))) == grpc.StatusCode.PERMISSION_DENIED
            async with _tls_channel(sched.address, ca.issue("attention/a-0"), ca.ca_file) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                assert await status_of(stub.Register(_attention("a-9"))) == \
                    grpc.StatusCode.PERMISSION_DENIED
                await stub.Register(_attention("a-0"))
            # a certificate naming no role
            async with _tls_channel(sched.address, ca.issue("mallory"), ca.ca_file) as ch:
                assert await status_of(scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest())) == grpc.StatusCode.UNAUTHENTICATED
            # auth.channel: this process's certificate (the scheduler's) over mTLS
            async with auth.channel(sched.address) as ch:
                await scheduler_pb2_grpc.SchedulerStub(ch).Deregister(
                    scheduler_pb2.DeregisterRequest(node_id="a-0"))
        finally:
            await sched.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_tls_files_config_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(Exception, match="missing --tls-key-file"):
        auth.TlsFiles.load(str(tmp_path / "a"), None, str(tmp_path / "c"))
    (tmp_path / "a").write_text("not pem")
    with pytest.raises(Exception, match="--tls-cert-file .* not a PEM"):
        auth.TlsFiles.load(str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "a"))


def test_credential_command_prints_a_role_credential_file(tmp_path, token: bytes) -> None:
    import subprocess
    import sys
    (tmp_path / "token").write_bytes(token)
    out = subprocess.run([sys.executable, "-m", "services.cli", "credential", "gateway",
                          "--token-file", str(tmp_path / "token")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / "credential").write_text(out.stdout)
    cred = auth.load_credential(tmp_path / "credential")
    assert cred.role == "gateway" and cred.token is None
    assert cred.role_credential == auth.role_credential(token, "gateway")
    again = subprocess.run([sys.executable, "-m", "services.cli", "credential", "admin",
                            "--token-file", str(tmp_path / "credential")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "holds a role credential" in again.stderr
