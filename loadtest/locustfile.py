"""Locust load against the gateway's OpenAI endpoints (completions and chat, streaming and not).

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:PORT \\
        -u 8 -r 4 --run-time 30s

Environment: ``MEGASCALE_MODEL`` (served model name; default: the first of GET /v1/models),
``MEGASCALE_API_KEY`` (sent as a bearer token), ``MEGASCALE_MAX_TOKENS`` (default 16).
Streaming requests report time-to-first-token as the ``ttft`` entries next to the full
requests. ``--run-time`` bounds a headless run; without it this file stops after 60 s.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

PROMPTS = ["The quick brown fox", "Once upon a time, in a small town by the sea",
           "Large language models generate text", "What is the capital of France?"]
MAX_TOKENS = int(os.environ.get("MEGASCALE_MAX_TOKENS", "16"))
DEFAULT_RUN_TIME_S = 60


@events.init.add_listener
def _bound_run_time(environment, **_kw) -> None:  # noqa: ANN001 - locust hook
    opts = environment.parsed_options
    if opts is not None and not getattr(opts, "run_time", None):
        opts.run_time = DEFAULT_RUN_TIME_S


class OpenAIUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        key = os.environ.get("MEGASCALE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = os.environ.get("MEGASCALE_MODEL")
        if not self.model:
            self.model = self.client.get("/v1/models").json()["data"][0]["id"]

    def _body(self, chat: bool, stream: bool) -> dict:
        prompt = random.choice(PROMPTS)
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.8,
                "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    @task(3)
    def completion(self) -> None:
        self.client.post("/v1/completions", json=self._body(False, False), name="completions")

    @task(1)
    def chat(self) -> None:
        self.client.post("/v1/chat/completions", json=self._body(True, False), name="chat")

    @task(3)
    def completion_stream(self) -> None:
        self._stream("/v1/completions", self._body(False, True), "completions stream")

    @task(1)
    def chat_stream(self) -> None:
        self._stream("/v1/chat/completions", self._body(True, True), "chat stream")

    def _stream(self, path: str, body: dict, name: str) -> None:
        start = time.perf_counter()
        first = None
        with self.client.post(path, json=body, stream=True, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter()
                if line == "data: [DONE]":
                    done = True
                    break
                if "error" in json.loads(line[6:]):
                    resp.failure(line[:200])
                    return
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            resp.success()
        if first is not None:
            events.request.fire(request_type="SSE", name=f"{name} ttft",
                                response_time=(first - start) * 1000, response_length=0,
                                exception=None, context={})
