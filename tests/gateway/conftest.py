"""Fixtures for the gateway tests: a tiny demo checkpoint, a real LocalMesh (2 expert nodes,
2 attention replicas, m=2) and the gateway as a real process, shared by the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.core.demo import write_random_checkpoint
from services.launch.procs import LocalMesh, RoleProcess, spawn_role

torch.set_num_threads(1)

MODEL_NAME = "mixtral-gw"
MAX_POSITION = 256  # small context so "prompt too long" is cheap to provoke
MAX_BODY = 64 << 10


@dataclass
class Stack:
    model_dir: Path
    mesh: LocalMesh
    gateway: RoleProcess
    workdir: Path

    @property
    def http(self) -> str:
        return self.gateway.info["http"]

    @property
    def grpc(self) -> str:
        return self.gateway.info["grpc"]


@pytest.fixture(scope="session")
def gw_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gw") / MODEL_NAME
    return write_random_checkpoint(out, "mixtral", layers=2, hidden=64, intermediate=96,
                                   experts=8, top_k=2, heads=4, kv_heads=2, vocab=512,
                                   max_position=MAX_POSITION, seed=7)


def start_gateway(model_dir: Path, replicas: list[str], workdir: Path, name: str,
                  *extra: str) -> RoleProcess:
    return spawn_role("gateway", ["--model", str(model_dir), "--attention", ",".join(replicas),
                                  "--max-body-bytes", str(MAX_BODY), *extra],
                      name, workdir, log=workdir / f"{name}.log")


@pytest.fixture(scope="session")
def gateway_factory():
    """``start_gateway`` as a fixture (test modules cannot import a conftest reliably)."""
    return start_gateway


@pytest.fixture(scope="session")
def stack(gw_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("gw-mesh")
    mesh = LocalMesh.start(gw_model_dir, expert_ids=[[0, 1, 2, 3], [4, 5, 6, 7]],
                           attention_replicas=2, micro_batches=2, workdir=workdir,
                           attention_args=["--metrics-port", "0"])
    try:
        gw = start_gateway(gw_model_dir, [a.grpc for a in mesh.attention], workdir, "gateway")
    except BaseException:
        mesh.stop()
        raise
    try:
        yield Stack(gw_model_dir, mesh, gw, workdir)
    finally:
        gw.stop()
        mesh.stop()
