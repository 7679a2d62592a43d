"""``megascale up --tls``: every internal gRPC link of a real mesh runs over mTLS with the
launch's throwaway CA, requests are served end to end through them, and a plaintext or
certificate-less client gets nothing from any internal port."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import openai
import pytest
from up_launch import start_up, stop_up

from megascale.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common import auth
from services.core.demo import write_random_checkpoint

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def up_tls(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("up-tls")
    model_dir = write_random_checkpoint(root / "mixtral-tls", "mixtral", layers=2, hidden=64,
                                        intermediate=96, experts=8, top_k=2, heads=4,
                                        kv_heads=2, vocab=512, max_position=256, seed=31)
    workdir = root / "work"
    proc, url, _ = start_up(["--model", str(model_dir), "--port", "0", "--attention", "1",
                             "--experts", "1", "--workdir", str(workdir), "--quiet",
                             "--device", "cpu", "--tls"])
    yield url, workdir, model_dir
    stop_up(proc)


def _ready(workdir: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".ready.json"): json.loads(p.read_text())
            for p in workdir.glob("*.ready.json")}


def test_requests_are_served_over_mtls_links(up_tls) -> None:  # noqa: ANN001
    url, workdir, model_dir = up_tls
    assert (workdir / "tls" / "scheduler.key").stat().st_mode & 0o077 == 0
    client = openai.OpenAI(base_url=url, api_key="unused")
    got = client.completions.create(model=model_dir.name, prompt=[5, 6, 7], max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 6 and got.choices[0].finish_reason == "length"


def test_internal_ports_refuse_plaintext_and_certificate_less_clients(up_tls) -> None:  # noqa: ANN001
    _, workdir, _ = up_tls
    ca = (workdir / "tls" / "ca.crt").read_bytes()
    for name, info in _ready(workdir).items():
        if name.startswith("gateway"):
            continue  # the public front: API key, not mTLS
        with grpc.insecure_channel(info["grpc"]) as ch:
            with pytest.raises(grpc.RpcError) as plain:
                scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest(), timeout=5)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE, name
        with grpc.secure_channel(info["grpc"], grpc.ssl_channel_credentials(ca), [
                ("grpc.ssl_target_name_override", auth.TLS_SERVER_NAME)]) as ch:
            with pytest.raises(grpc.RpcError) as nocert:
                scheduler_pb2_grpc.SchedulerStub(ch).GetSettings(
                    scheduler_pb2.GetSettingsRequest(), timeout=5)
            assert nocert.value.code() == grpc.StatusCode.UNAVAILABLE, name
