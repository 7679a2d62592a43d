"""Render the chart offline and read the rendered pods the way a kubelet would.

* :func:`render` runs the real Helm template engine (``helm-python-sdk`` bundles Helm's Go SDK
  as a shared library, so no ``helm`` binary and no cluster are needed) and returns the
  manifests as parsed objects.
* :func:`container_env` resolves a container's env the way the kubelet does: downward-API
  ``fieldRef`` values for a given pod, ``secretKeyRef`` from given secrets, and ``$(VAR)``
  references to variables defined earlier in the list.
* :func:`parse_role` feeds that env and the container's args to the project's real
  ``megascale`` argument parser (flags default from ``MEGASCALE_<FLAG>``), so a misspelt variable,
  a missing required flag or a bad value fails exactly as it would in the pod.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm"
EXAMPLES = CHART / "examples"
PRODUCTION_VALUES = EXAMPLES / "values-production.yaml"
NAMESPACE = "serving"
RELEASE = "ms"

# Every values combination the offline tests render: the chart's defaults, each example file
# (examples/values-*.yaml), and inline ones for the paths no example takes on its own.
INLINE_COMBOS: dict[str, dict[str, Any]] = {
    "hpa": {
        "expert": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                                   "podsMetrics": [{"name": "megascale_expert_busy_fraction",
                                                    "averageValue": "700m"}]}},
        "attention": {"autoscaling": {"enabled": True, "podsMetrics": [
            {"name": "megascale_num_requests_waiting", "averageValue": "4"}]}},
        "gateway": {"autoscaling": {"enabled": True}},
    },
    "external-redis": {"redis": {"enabled": False,
                                 "external": {"urlSecret": "my-redis", "urlSecretKey": "url"}}},
    "tls-rdma": {"security": {"tls": {"enabled": True, "secretName": "ms-tls",
                                      "perRole": {"gateway": "ms-gateway-tls"}},
                              "rdma": {"enabled": True},
                              "clusterToken": {"existingSecret": "ms-token"}},
                 "networkPolicy": {"enabled": False}},
}


def combo_values() -> dict[str, dict[str, Any]]:
    """name -> values of every combination (default: the chart's own values)."""
    combos: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted(EXAMPLES.glob("values-*.yaml")):
        combos[path.stem.removeprefix("values-")] = load_values(path)
    combos.update(INLINE_COMBOS)
    return combos


@dataclass
class Rendered:
    """The objects of one render, plus NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def workload(self, component: str) -> dict[str, Any]:
        """The Deployment or StatefulSet of a role (by its component label)."""
        found = [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")
                 and o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"expected one workload for {component}, found {len(found)}"
        return found[0]


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> Rendered:
    """``helm template`` of the chart with ``values`` merged over its defaults."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        files = chart.render(values=values or {}, name=name, namespace=namespace,
                             is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(objects, notes, files)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(workload)["containers"]
    return container


@dataclass(frozen=True)
class PodIdentity:
    """What the downward API would report for one pod."""

    name: str
    ip: str
    labels: dict[str, str]


def pod_identity(workload: dict[str, Any], index: int = 0) -> PodIdentity:
    """The identity of pod ``index`` of a workload (StatefulSet pods get NAME-I and the
    pod-index label, as the StatefulSet controller sets them)."""
    labels = dict(workload["spec"]["template"]["metadata"]["labels"])
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        labels["apps.kubernetes.io/pod-index"] = str(index)
        labels["statefulset.kubernetes.io/pod-name"] = f"{name}-{index}"
        name = f"{name}-{index}"
    else:
        name = f"{name}-5d8f9c7b6d-x{index}qz"
    return PodIdentity(name, f"10.1.{index // 250}.{index % 250 + 2}", labels)


_FIELD_LABEL = re.compile(r"^metadata\.labels\['([^']+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _field_value(path: str, pod: PodIdentity) -> str:
    if path == "metadata.name":
        return pod.name
    if path == "status.podIP":
        return pod.ip
    m = _FIELD_LABEL.match(path)
    if m:
        if m.group(1) not in pod.labels:
            raise AssertionError(f"fieldRef {path}: the pod has no such label")
        return pod.labels[m.group(1)]
    raise AssertionError(f"fieldRef {path} is not emulated by this test")


def container_env(container: dict[str, Any], pod: PodIdentity,
                  secrets: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it (in order, $(VAR) expanded)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "valueFrom" in item:
            src = item["valueFrom"]
            if "fieldRef" in src:
                env[name] = _field_value(src["fieldRef"]["fieldPath"], pod)
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                key = (ref["name"], ref["key"])
                if secrets is None or key not in secrets:
                    raise AssertionError(f"env {name} reads secret {key} the test did not give")
                env[name] = secrets[key]
            else:
                raise AssertionError(f"env {name}: valueFrom {src} is not emulated")
            continue

        def expand(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            # The kubelet leaves references to unknown (or later) variables as they are.
            return env.get(m.group(1), m.group(0))

        env[name] = _VAR_REF.sub(expand, str(item.get("value", "")))
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` holding only the caller's MEGASCALE_* variables (others kept)."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("MEGASCALE_")]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def flag_env_name(flag: str) -> str:
    """The variable a flag reads (services.common.flags.env_value's naming)."""
    return "MEGASCALE_" + flag.lstrip("-").upper().replace("-", "_")


def parse_role(container: dict[str, Any], env: dict[str, str]
               ) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse the container's command line with the real ``megascale`` CLI parser under ``env``.

    Returns the namespace and the role's sub-parser (for the set of flags it knows).
    """
    from services.cli import build_parser

    assert container["command"] == ["megascale"], container["command"]
    argv = list(container.get("args", []))
    with environment(env):
        parser = build_parser(argv)
        try:
            ns = parser.parse_args(argv)
        except SystemExit as exc:  # argparse already printed the reason to stderr
            raise AssertionError(f"`megascale {' '.join(argv)}` does not parse with env "
                                 f"{sorted(k for k in env if k.startswith('MEGASCALE_'))}"
                                 ) from exc
    sub = _subparser(parser, argv)
    return ns, sub


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def known_env_names(parser: argparse.ArgumentParser) -> set[str]:
    names = {flag_env_name(opt) for action in parser._actions for opt in action.option_strings
             if opt.startswith("--")}
    names.add("MEGASCALE_TORCH_THREADS")  # read by services.common.flags.threads_from
    return names


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's target port (a number, or a container port name)."""
    return named_ports(container)[port] if isinstance(port, str) else port
