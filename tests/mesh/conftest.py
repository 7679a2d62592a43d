"""The whole mesh as ``megascale up`` starts it (real redis-server, scheduler, 2 expert nodes,
2 attention replicas with m = 2, gateway), shared by the tests of this folder."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver
from up_launch import start_up, stop_up

from services.core.demo import write_random_checkpoint

MODEL_SHAPE = dict(layers=2, hidden=64, intermediate=96, experts=8, top_k=2, heads=4,
                   kv_heads=2, vocab=512, max_position=256, seed=21)
SERVED_NAME = "mixtral-served"
MAX_MODEL_LEN = 128  # below the checkpoint's 256: the launcher must pass it on
API_KEY = "sk-mesh-test-key"  # given as a file, so it shows in no process's argv


@dataclass
class Up:
    proc: subprocess.Popen
    base_url: str          # http://127.0.0.1:PORT/v1
    api_key: str
    model: str             # --served-model-name
    max_model_len: int     # --max-model-len
    model_dir: Path
    workdir: Path
    otlp: OtlpReceiver
    banner: str            # what the launcher printed up to "Ctrl-C stops everything"

    def ready(self) -> dict[str, dict]:
        return {p.name.removesuffix(".ready.json"): json.loads(p.read_text())
                for p in self.workdir.glob("*.ready.json")}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("up")
    model_dir = write_random_checkpoint(root / "mixtral-up", "mixtral", **MODEL_SHAPE)
    otlp = OtlpReceiver()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    workdir = root / "work"
    key_file = root / "api.key"
    key_file.write_text(API_KEY + "\n")
    try:
        proc, url, banner = start_up(
            ["--model", str(model_dir), "--port", "0", "--attention", "2", "--experts", "2",
             "--micro-batches", "2", "--workdir", str(workdir), "--quiet", "--device", "auto",
             "--dtype", "auto", "--served-model-name", SERVED_NAME, "--max-model-len",
             str(MAX_MODEL_LEN), "--max-batch-tokens", "256", "--api-key-file", str(key_file)],
            env=env)
    except BaseException:
        otlp.stop()
        raise
    yield Up(proc, url, API_KEY, SERVED_NAME, MAX_MODEL_LEN, model_dir, workdir, otlp, banner)
    stop_up(proc)
    otlp.stop()
