"""Locust load against the gateway's OpenAI endpoints, measured the way ``vllm bench serve``
measures a server.

Closed loop (each user sends its next request when the last one is done; completions and
chat, streaming and not)::

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:PORT -u 8 -r 4 --run-time 30s

Request-rate mode (open loop: requests arrive at a constant rate whether or not earlier ones
have finished, like ``vllm bench serve --request-rate``; all streaming)::

    MEGASCALE_REQUEST_RATE=4 locust -f loadtest/locustfile.py --headless -H URL -u 1 -r 1 \\
        --run-time 30s

Each user of the rate mode sends ``MEGASCALE_REQUEST_RATE`` requests per second (so ``-u 1``
for that total); ``MEGASCALE_MAX_CONCURRENCY`` (default 256) bounds the requests in flight.

What is measured, from the SSE stream itself (not from the response headers):

- TTFT: request sent to the first chunk that carries generated text (or a token);
- ITL: time between consecutive chunks that carry generated tokens;
- TPOT: per request, ``(E2E - TTFT) / (output tokens - 1)``;
- E2E: request sent to the stream's end (``[DONE]``) or the whole body;
- output tokens: the ``usage`` the stream ends with (``stream_options.include_usage``).

These are kept *out* of Locust's request statistics (which count each HTTP request once,
with its E2E time) and printed at the end as ``vllm bench serve`` prints them: mean, median
and P99 of TTFT, TPOT, ITL and E2E, request and output-token throughput. Set
``MEGASCALE_LOADTEST_JSON=PATH`` to also write them as JSON. (One process: the summary does not
merge the workers of a distributed run.)

Environment: ``MEGASCALE_MODEL`` (served model name; default: the first of GET /v1/models),
``MEGASCALE_API_KEY`` (sent as a bearer token), ``MEGASCALE_MAX_TOKENS`` (default 16).
``--run-time`` bounds a headless run; without it this file stops after 60 s.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import gevent
from gevent.pool import Pool
from locust import HttpUser, between, events, task

PROMPTS = ["The quick brown fox", "Once upon a time, in a small town by the sea",
           "Large language models generate text", "What is the capital of France?"]
MAX_TOKENS = int(os.environ.get("MEGASCALE_MAX_TOKENS", "16"))
REQUEST_RATE = float(os.environ.get("MEGASCALE_REQUEST_RATE", "0"))  # 0: closed loop
MAX_CONCURRENCY = int(os.environ.get("MEGASCALE_MAX_CONCURRENCY", "256"))
DEFAULT_RUN_TIME_S = 60


@dataclass
class Sample:
    """One finished request as the client saw it (seconds)."""

    e2e: float
    output_tokens: int
    input_tokens: int
    ttft: float | None = None          # streaming only
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class Results:
    """The run's samples and the ``vllm bench serve`` style summary."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.failed = 0
        self.started = time.perf_counter()
        self.stopped: float | None = None

    def summary(self) -> dict:
        s = self.samples
        duration = max(1e-9, (self.stopped or time.perf_counter()) - self.started)
        out_tokens = sum(x.output_tokens for x in s)
        in_tokens = sum(x.input_tokens for x in s)
        res = {"completed": len(s), "failed": self.failed, "duration_s": duration,
               "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
               "request_throughput": len(s) / duration,
               "output_throughput": out_tokens / duration,
               "total_token_throughput": (in_tokens + out_tokens) / duration}
        series = {"ttft": [x.ttft for x in s if x.ttft is not None],
                  "tpot": [x.tpot for x in s if x.tpot is not None],
                  "itl": [v for x in s for v in x.itl],
                  "e2el": [x.e2e for x in s]}
        for name, values in series.items():
            ms = sorted(1000 * v for v in values)
            res[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else None
            res[f"median_{name}_ms"] = statistics.median(ms) if ms else None
            res[f"p99_{name}_ms"] = _percentile(ms, 99) if ms else None
            res[f"{name}_count"] = len(ms)
        return res


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vllm bench uses)."""
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def format_summary(r: dict) -> str:
    def num(v: float | None, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             f"{'Successful requests:':<40}{r['completed']:<10}",
             f"{'Failed requests:':<40}{r['failed']:<10}",
             f"{'Benchmark duration (s):':<40}{r['duration_s']:<10.2f}",
             f"{'Total input tokens:':<40}{r['total_input_tokens']:<10}",
             f"{'Total generated tokens:':<40}{r['total_output_tokens']:<10}",
             f"{'Request throughput (req/s):':<40}{r['request_throughput']:<10.2f}",
             f"{'Output token throughput (tok/s):':<40}{r['output_throughput']:<10.2f}",
             f"{'Total Token throughput (tok/s):':<40}{r['total_token_throughput']:<10.2f}"]
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL"),
                             ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            label = f"{'P99' if stat == 'p99' else stat.capitalize()} {name} (ms):"
            lines.append(f"{label:<40}{num(r[f'{stat}_{key}_ms']):<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


RESULTS = Results()


@events.init.add_listener
def _bound_run_time(environment, **_kw) -> None:  # noqa: ANN001 - locust hook
    opts = environment.parsed_options
    if opts is not None and not getattr(opts, "run_time", None):
        opts.run_time = DEFAULT_RUN_TIME_S


@events.test_start.add_listener
def _start(**_kw) -> None:
    RESULTS.__init__()


@events.test_stop.add_listener
def _report(**_kw) -> None:
    RESULTS.stopped = time.perf_counter()
    summary = RESULTS.summary()
    print(format_summary(summary), flush=True)
    path = os.environ.get("MEGASCALE_LOADTEST_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)


class _OpenAIBase(HttpUser):
    abstract = True

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
        if stream:
            body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _plain(self, path: str, body: dict, name: str) -> None:
        start = time.perf_counter()
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                RESULTS.failed += 1
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            usage = resp.json().get("usage") or {}
            end = time.perf_counter()
            resp.success()
        # recorded once Locust has counted the request (a user stopped inside the block
        # would leave it out of both)
        RESULTS.samples.append(Sample(end - start, usage.get("completion_tokens", 0),
                                      usage.get("prompt_tokens", 0)))

    def _stream(self, path: str, body: dict, name: str) -> None:
        start = time.perf_counter()
        ttft = None
        last = start
        itl: list[float] = []
        usage: dict = {}
        with self.client.post(path, json=body, stream=True, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                RESULTS.failed += 1
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            # chunk_size=None: each chunk as it arrives (no read-ahead buffering)
            for line in resp.iter_lines(chunk_size=None, decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                now = time.perf_counter()
                data = json.loads(line[6:])
                if "error" in data:
                    RESULTS.failed += 1
                    resp.failure(line[:200])
                    return
                if data.get("usage"):
                    usage = data["usage"]
                if _carries_tokens(data):
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last = now
            if not done:
                RESULTS.failed += 1
                resp.failure("stream ended without [DONE]")
                return
            end = time.perf_counter()
            resp.success()
        RESULTS.samples.append(Sample(end - start,
                                      usage.get("completion_tokens", 0),
                                      usage.get("prompt_tokens", 0), ttft, itl))


def _carries_tokens(chunk: dict) -> bool:
    """Whether an SSE chunk carries generated output (text, a chat delta, or token ids)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or choice.get("token_ids"):
            return True
    return False


class OpenAIUser(_OpenAIBase):
    """Closed loop: the next request once the last one is done (the default mode)."""

    abstract = REQUEST_RATE > 0
    wait_time = between(0.05, 0.3)

    @task(3)
    def completion(self) -> None:
        self._plain("/v1/completions", self._body(False, False), "completions")

    @task(1)
    def chat(self) -> None:
        self._plain("/v1/chat/completions", self._body(True, False), "chat")

    @task(3)
    def completion_stream(self) -> None:
        self._stream("/v1/completions", self._body(False, True), "completions stream")

    @task(1)
    def chat_stream(self) -> None:
        self._stream("/v1/chat/completions", self._body(True, True), "chat stream")


class RateUser(_OpenAIBase):
    """Open loop at ``MEGASCALE_REQUEST_RATE`` requests/s, constant inter-arrival times;
    streaming completions and chat (3 : 1)."""

    abstract = REQUEST_RATE <= 0

    def wait_time(self) -> float:
        return 0.0

    @task
    def arrivals(self) -> None:
        pool = Pool(MAX_CONCURRENCY)
        period = 1.0 / REQUEST_RATE
        t0 = time.perf_counter()
        n = 0
        try:
            while True:  # until Locust stops the user (it kills this greenlet)
                delay = t0 + n * period - time.perf_counter()
                if delay > 0:
                    gevent.sleep(delay)
                chat = random.random() < 0.25
                path = "/v1/chat/completions" if chat else "/v1/completions"
                pool.spawn(self._stream, path, self._body(chat, True),
                           "chat stream" if chat else "completions stream")
                n += 1
        finally:
            pool.kill(block=False)
