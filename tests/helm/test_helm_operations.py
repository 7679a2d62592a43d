"""The chart's production features, checked for what they mean rather than how they look:
who may talk to whom (NetworkPolicies evaluated like a CNI would), what a disruption budget
guarantees, which Prometheus series the autoscalers read (against the series the roles really
export), where secrets come from, pod hardening, GPUs and graceful drain."""

from __future__ import annotations

import base64
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import COMBOS, render_combo
from helm_render import (
    CHART,
    EXAMPLES,
    NAMESPACE,
    Rendered,
    container_env,
    load_values,
    main_container,
    named_ports,
    parse_role,
    pod_identity,
    pod_spec,
    render,
)

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("scheduler", "expert", "attention", "gateway")


def _labels(rendered: Rendered, role: str) -> dict[str, str]:
    return rendered.workload(role)["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _parsed(rendered: Rendered, role: str):  # noqa: ANN202 - argparse.Namespace
    wl = rendered.workload(role)
    container = main_container(wl)
    secrets = {(r["name"], r["key"]): "redis://:pw@redis.infra:6379/0" if "url" in r["key"]
               else "s3cret" for item in container.get("env", [])
               if (r := item.get("valueFrom", {}).get("secretKeyRef"))}
    ns, _ = parse_role(container, container_env(container, pod_identity(wl), secrets))
    return ns


# -- NetworkPolicies -----------------------------------------------------------------------

OUTSIDER = {"app": "some-other-app"}  # a pod of another app, in the release's namespace


def _peer_matches(peer: dict[str, Any], labels: dict[str, str], same_namespace: bool) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not addressed by IP blocks here
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None and not same_namespace:
        return False
    if ns_sel not in (None, {}):
        return False  # a selected other namespace, not the pods of this test
    return _selects(peer.get("podSelector", {}), labels)


def _rules_allow(rules: list[dict[str, Any]], side: str, labels: dict[str, str], port: int,
                 same_namespace: bool) -> bool:
    for rule in rules:
        peers = rule.get(side)
        if peers is not None and not any(_peer_matches(p, labels, same_namespace)
                                         for p in peers):
            continue
        if "ports" in rule and not any(p.get("port") == port for p in rule["ports"]):
            continue
        return True
    return False


def connects(rendered: Rendered, src: dict[str, str], dst: dict[str, str], port: int,
             same_namespace: bool = True) -> bool:
    """Whether the NetworkPolicies let a pod labelled ``src`` open TCP ``port`` on a pod
    labelled ``dst`` (both in the release namespace unless ``same_namespace`` is False)."""
    policies = rendered.of_kind("NetworkPolicy")
    egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
              and _selects(p["spec"]["podSelector"], src)]
    ingress = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
               and _selects(p["spec"]["podSelector"], dst)]
    if egress and not any(_rules_allow(p["spec"].get("egress", []), "to", dst, port, True)
                          for p in egress):
        return False
    return not ingress or any(_rules_allow(p["spec"].get("ingress", []), "from", src, port,
                                           same_namespace) for p in ingress)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("name", ["default", "fixed-shards", "production", "keda"])
def test_network_policies_allow_exactly_the_peer_connections(helm, name: str) -> None:  # noqa: ANN001
    rendered = render_combo(name)
    labels = {r: _labels(rendered, r) for r in ROLES}
    ns = {r: _parsed(rendered, r) for r in ROLES}
    redis = rendered.workload("redis") if COMBOS[name].get("redis", {}).get(
        "enabled", True) else None
    if redis:
        labels["redis"] = _labels(rendered, "redis")
    # What each role dials, from the flags its pods really run with.
    m2n = {r: int(ns[r].m2n_url.rsplit(":", 1)[1]) for r in ("expert", "attention")}
    expected = {
        ("gateway", "scheduler", _port(ns["gateway"].scheduler)),
        ("gateway", "attention", ns["attention"].grpc_port),
        ("attention", "scheduler", _port(ns["attention"].scheduler)),
        ("attention", "expert", ns["expert"].grpc_port),
        ("attention", "expert", m2n["expert"]),
        ("expert", "scheduler", _port(ns["expert"].scheduler)),
        ("expert", "attention", m2n["attention"]),
        ("scheduler", "attention", ns["attention"].grpc_port),
        ("scheduler", "expert", ns["expert"].grpc_port),
    }
    if redis:
        expected.add(("scheduler", "redis", _port(ns["scheduler"].redis_url.rsplit("/", 1)[0])))
    ports = {r: set(named_ports(main_container(rendered.workload(r))).values()) for r in labels}
    for src, dst in itertools.product(labels, labels):
        for port in ports[dst]:
            want = (src, dst, port) in expected
            assert connects(rendered, labels[src], labels[dst], port) == want, (src, dst, port)
    # Prometheus, wherever it runs, scrapes the metrics ports unless metricsFrom restricts it;
    # other apps reach the gateway (the front door) and nothing else.
    restricted = bool(COMBOS[name].get("networkPolicy", {}).get("metricsFrom"))
    for role in ("scheduler", "expert", "attention"):
        assert connects(rendered, OUTSIDER, labels[role], ns[role].metrics_port,
                        same_namespace=False) is not restricted
        assert not connects(rendered, OUTSIDER, labels[role], ns[role].grpc_port)
    gateway_open = not COMBOS[name].get("networkPolicy", {}).get("gatewayFrom")
    assert connects(rendered, OUTSIDER, labels["gateway"], ns["gateway"].port) is gateway_open
    if redis:
        assert not connects(rendered, OUTSIDER, labels["redis"], 6379)


def test_the_policy_evaluator_sees_a_hole(default_render: Rendered) -> None:
    """The evaluator above can fail: an extra ingress rule letting the gateway reach the
    expert pods (or dropping the attention egress to experts) changes its answer."""
    rendered = Rendered(yaml.safe_load(yaml.safe_dump(default_render.objects)))
    labels = {r: _labels(rendered, r) for r in ROLES}
    grpc = _parsed(rendered, "expert").grpc_port
    assert not connects(rendered, labels["gateway"], labels["expert"], grpc)
    assert connects(rendered, labels["attention"], labels["expert"], grpc)
    expert_np = next(p for p in rendered.of_kind("NetworkPolicy")
                     if _selects(p["spec"]["podSelector"], labels["expert"]))
    gateway_np = next(p for p in rendered.of_kind("NetworkPolicy")
                      if _selects(p["spec"]["podSelector"], labels["gateway"]))
    attention_np = next(p for p in rendered.of_kind("NetworkPolicy")
                        if _selects(p["spec"]["podSelector"], labels["attention"]))
    expert_np["spec"]["ingress"].append({"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "gateway"}}}], "ports": [{"port": grpc}]})
    gateway_np["spec"]["egress"].append({"ports": [{"port": grpc}]})
    assert connects(rendered, labels["gateway"], labels["expert"], grpc)
    attention_np["spec"]["egress"] = [r for r in attention_np["spec"]["egress"]
                                      if {"port": grpc, "protocol": "TCP"} not in r["ports"]]
    assert not connects(rendered, labels["attention"], labels["expert"], grpc)


def test_network_policies_can_be_turned_off(helm) -> None:  # noqa: ANN001
    assert render({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_every_role_may_resolve_names_and_reach_extra_egress(production_render: Rendered,
                                                            production_values: dict) -> None:
    for policy in production_render.of_kind("NetworkPolicy"):
        egress = policy["spec"]["egress"]
        if policy["metadata"]["labels"]["app.kubernetes.io/component"] == "redis":
            assert egress == []  # Redis dials nobody
            continue
        assert any({"protocol": "UDP", "port": 53} in r.get("ports", []) for r in egress)
        for extra in production_values["networkPolicy"]["extraEgress"]:
            assert extra in egress


# -- PodDisruptionBudgets ------------------------------------------------------------------

def _expert_max_unavailable(rendered: Rendered) -> int:
    pdb = rendered.get("PodDisruptionBudget", rendered.workload("expert")["metadata"]["name"])
    assert _selects(pdb["spec"]["selector"], _labels(rendered, "expert"))
    return pdb["spec"]["maxUnavailable"]


@pytest.mark.parametrize(("copies", "nodes"), [(1, 2), (2, 2), (2, 4), (3, 4), (3, 6)])
def test_expert_pdb_keeps_a_copy_of_every_expert(helm, copies: int, nodes: int) -> None:  # noqa: ANN001
    """With R copies of each expert on R distinct nodes: any allowed disruption leaves every
    expert a copy, and the budget is tight (one more pod down can lose an expert)."""
    rendered = render({"scheduler": {"expertReplicas": copies}, "expert": {"replicas": nodes}})
    budget = _expert_max_unavailable(rendered)
    placements = list(itertools.combinations(range(nodes), copies))  # an expert's nodes
    for down in itertools.combinations(range(nodes), budget):
        assert all(set(p) - set(down) for p in placements), (budget, down)
    if budget + 1 <= nodes:
        assert any(not set(p) - set(down) for p in placements
                   for down in itertools.combinations(range(nodes), budget + 1))


def test_fixed_shards_allow_no_voluntary_expert_disruption(fixed_render: Rendered) -> None:
    assert _expert_max_unavailable(fixed_render) == 0  # each shard is the only copy


def test_pdbs_cover_the_interchangeable_roles(rendered: Rendered) -> None:
    pdbs = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p
            for p in rendered.of_kind("PodDisruptionBudget")}
    assert set(pdbs) == {"expert", "attention", "gateway"}
    for role, pdb in pdbs.items():
        assert _selects(pdb["spec"]["selector"], _labels(rendered, role))
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdbs["attention"]["spec"]["maxUnavailable"] == 1


# -- Autoscaling: the series exist ---------------------------------------------------------

_METRIC_CALL = re.compile(r"\b(Counter|CounterMetricFamily|Histogram|Gauge|GaugeMetricFamily|"
                          r"g|c)\(\s*\"(megascale:[a-z_]+)\"")
_SUFFIXES = {"Counter": ("_total",), "CounterMetricFamily": ("_total",), "c": ("_total",),
             "Histogram": ("_sum", "_count", "_bucket"), "Gauge": ("",),
             "GaugeMetricFamily": ("",), "g": ("",)}


def exported_series() -> set[str]:
    """Every series name the roles' metrics modules export (counters with _total, histograms
    with _sum/_count/_bucket, as prometheus_client exposes them)."""
    series = set()
    for path in (ROOT / "services").glob("*/metrics.py"):
        for kind, name in _METRIC_CALL.findall(path.read_text()):
            series.update(name + s for s in _SUFFIXES[kind])
    return series


def _series_in(query: str) -> set[str]:
    return set(re.findall(r"megascale:[a-z_]+", query))


def test_the_series_scan_sees_the_real_metrics() -> None:
    series = exported_series()
    for name in ("megascale:num_requests_waiting", "megascale:gateway_requests_total",
                 "megascale:expert_compute_seconds_sum", "megascale:scheduler_ta_te_ratio"):
        assert name in series
    assert "megascale:gateway_requests" not in series  # a counter is exposed as _total


def test_keda_scaled_objects_read_real_series_and_target_real_workloads(
        combo: tuple[str, dict, Rendered]) -> None:
    name, values, rendered = combo
    series = exported_series()
    objs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
            for o in rendered.of_kind("ScaledObject")}
    assert set(objs) == {r for r in ("expert", "attention", "gateway")
                         if values.get(r, {}).get("keda", {}).get("enabled")}
    for role, so in objs.items():
        wl = rendered.workload(role)
        ref = so["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == (wl["kind"], wl["metadata"]["name"])
        assert "replicas" not in wl["spec"]  # KEDA's HPA owns it
        for trigger in so["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            used = _series_in(query)
            assert used and used <= series, (role, used - series)
            assert f'namespace="{NAMESPACE}"' in query
            pod_re = re.search(r'pod=~"([^"]+)"', query).group(1)
            # the selector matches this role's pods (or the scheduler's, for its aggregates)
            owner = rendered.workload("scheduler" if "scheduler_" in query else role)
            assert re.fullmatch(pod_re, pod_identity(owner, 3).name)
            assert not re.fullmatch(pod_re, pod_identity(rendered.workload(
                "gateway" if role != "gateway" else "attention"), 3).name)


def test_keda_example_scales_each_role_on_its_documented_signal(helm) -> None:  # noqa: ANN001
    rendered = render_combo("keda")
    queries = {o["metadata"]["labels"]["app.kubernetes.io/component"]:
               {t["name"]: (t["metricType"], t["metadata"]["query"])
                for t in o["spec"]["triggers"]} for o in rendered.of_kind("ScaledObject")}
    assert "num_requests_waiting" in queries["attention"]["requests-waiting"][1]
    assert queries["attention"]["kv-cache-usage"][0] == "Value"  # a mean, not a total
    assert "rate(megascale:expert_compute_seconds_sum" in queries["expert"]["expert-busy"][1]
    assert "scheduler_expert_wait_ms" in queries["expert"]["expert-wait-ratio"][1]
    assert "rate(megascale:gateway_requests_total" in queries["gateway"]["request-rate"][1]


def test_prometheus_adapter_rules_serve_the_hpa_metrics(helm) -> None:  # noqa: ANN001
    """The HPA path: every Pods metric of the HPA combinations is named by a rule of
    examples/prometheus-adapter-values.yaml whose series the roles export."""
    adapter = load_values(EXAMPLES / "prometheus-adapter-values.yaml")
    series = exported_series()
    served = set()
    for rule in adapter["rules"]["custom"]:
        (name,) = _series_in(rule["seriesQuery"])
        assert name in series, name
        matches = re.fullmatch(rule["name"]["matches"], name)
        assert matches, rule
        as_ = rule["name"]["as"].replace("${1}", matches.group(1) if matches.groups() else "")
        served.add(as_)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    wanted = set()
    for combo in ("production", "hpa"):
        for hpa in render_combo(combo).of_kind("HorizontalPodAutoscaler"):
            wanted |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]
                       if m["type"] == "Pods"}
    assert wanted and wanted <= served, wanted - served


def test_service_monitors_scrape_every_role_where_it_serves_metrics(helm) -> None:  # noqa: ANN001
    rendered = render_combo("keda")
    monitors = rendered.of_kind("ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == set(
        ROLES)
    for sm in monitors:
        role = sm["metadata"]["labels"]["app.kubernetes.io/component"]
        (svc,) = [s for s in rendered.of_kind("Service")
                  if _selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        (endpoint,) = sm["spec"]["endpoints"]
        port = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
        container = main_container(rendered.workload(role))
        target = named_ports(container)[port["targetPort"]]
        ns = _parsed(rendered, role)
        assert target == (ns.port if role == "gateway" else ns.metrics_port)
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert render_combo("default").of_kind("ServiceMonitor") == []


# -- Secrets and hardening -----------------------------------------------------------------

_SECRETISH = re.compile(r"(password|token|url|apikey)$", re.IGNORECASE)


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _walk(v, f"{path}[{i}]")]
    return [(path, node)]


@pytest.mark.parametrize("path", [CHART / "values.yaml", *sorted(EXAMPLES.glob("values-*.yaml"))],
                         ids=lambda p: p.name)
def test_no_secret_is_a_plain_value(path: Path) -> None:
    for key, value in _walk(yaml.safe_load(path.read_text())):
        leaf = key.rsplit(".", 1)[-1]
        if _SECRETISH.search(leaf) and leaf != "serverAddress":
            assert value in ("", None), f"{path.name}: {key} holds a secret in plain values"
        if isinstance(value, str):
            assert not re.search(r"://[^/@\s]*:[^/@\s]+@", value), f"{key}: credentials in a URL"


@pytest.mark.parametrize("role", ROLES)
def test_secret_env_comes_from_secrets(rendered: Rendered, role: str) -> None:
    for item in main_container(rendered.workload(role)).get("env", []):
        if re.search(r"(PASSWORD|TOKEN|API_KEY)$", item["name"]):
            assert "valueFrom" in item, item
        if item["name"] == "MEGASCALE_REDIS_URL" and "value" in item:
            assert "$(REDIS_PASSWORD)" in item["value"]


def _volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


def _mount_path(container: dict[str, Any], name: str) -> str:
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == name)


@pytest.mark.parametrize("role", ROLES)
def test_cluster_token_and_tls_are_mounted_from_secrets(rendered: Rendered, role: str) -> None:
    wl = rendered.workload(role)
    spec, container = pod_spec(wl), main_container(wl)
    ns = _parsed(rendered, role)
    # The token: the file the flag names is the Secret's key, mounted read-only.
    token = _volume(spec, "cluster-token")["secret"]
    assert ns.cluster_token_file == _mount_path(container, "cluster-token") + "/" + \
        token["items"][0]["path"]
    secret_names = {s["metadata"]["name"] for s in rendered.of_kind("Secret")}
    existing = [v.get("security", {}).get("clusterToken", {}).get("existingSecret")
                for v in COMBOS.values() if v.get("security", {}).get("clusterToken", {}).get(
                    "existingSecret") == token["secretName"]]
    assert token["secretName"] in secret_names or existing
    if token["secretName"] in secret_names:
        secret = rendered.get("Secret", token["secretName"])
        assert len(base64.b64decode(secret["data"][token["items"][0]["key"]])) == 48
    tls = next((v for v in spec["volumes"] if v["name"] == "tls"), None)
    if tls is None:
        assert getattr(ns, "tls_cert_file", None) is None
        return
    base = _mount_path(container, "tls")
    assert {i["key"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    assert (ns.tls_cert_file, ns.tls_key_file, ns.tls_ca_file) == (
        f"{base}/tls.crt", f"{base}/tls.key", f"{base}/ca.crt")


def test_tls_secret_per_role_overrides_the_shared_one(helm) -> None:  # noqa: ANN001
    rendered = render_combo("tls-rdma")
    names = {r: _volume(pod_spec(rendered.workload(r)), "tls")["secret"]["secretName"]
             for r in ROLES}
    assert names == {"scheduler": "ms-tls", "expert": "ms-tls", "attention": "ms-tls",
                     "gateway": "ms-gateway-tls"}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("role", (*ROLES, "redis"))
def test_pods_run_hardened(combo: tuple[str, dict, Rendered], role: str) -> None:
    name, values, rendered = combo
    if role == "redis" and not values.get("redis", {}).get("enabled", True):
        pytest.skip("external Redis")
    wl = rendered.workload(role)
    spec = pod_spec(wl)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False  # no role calls the API server
    rdma = values.get("security", {}).get("rdma", {}).get("enabled", False)
    for container in _containers(spec):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        wants = ["IPC_LOCK"] if rdma and role in ("expert", "attention") and \
            container is main_container(wl) else None
        assert sc["capabilities"].get("add") == wants, (role, container["name"])
        writable = [m for m in container.get("volumeMounts", []) if not m.get("readOnly")]
        for mount in writable:  # every writable path is a scratch emptyDir
            assert "emptyDir" in _volume(spec, mount["name"]), mount
    if role != "redis":
        assert _mount_path(main_container(wl), "tmp") == "/tmp"
        home = container_env(main_container(wl), pod_identity(wl), _any_secret(wl))["HOME"]
        assert home == "/tmp"  # caches land on the writable emptyDir


def _any_secret(workload: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(r["name"], r["key"]): "x" for item in main_container(workload).get("env", [])
            if (r := item.get("valueFrom", {}).get("secretKeyRef"))}


# -- GPUs, images, drain -------------------------------------------------------------------

def test_gpu_example_requests_gpus_per_pool_with_numa_friendly_experts(helm) -> None:  # noqa: ANN001
    values = COMBOS["gpu"]
    rendered = render_combo("gpu")
    for role in ("expert", "attention"):
        wl = rendered.workload(role)
        res = main_container(wl)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == values[role]["gpus"]
        assert pod_spec(wl)["nodeSelector"] == values[role]["nodeSelector"]
        assert main_container(wl)["image"].endswith("-cuda")
        # Guaranteed QoS with whole CPUs: the static CPU manager and the topology manager
        # align the pod's CPUs with its GPUs.
        for r in ("cpu", "memory"):
            assert res["requests"][r] == res["limits"][r]
        assert float(res["requests"]["cpu"]).is_integer()
    assert pod_spec(rendered.workload("attention"))["nodeSelector"] != \
        pod_spec(rendered.workload("expert"))["nodeSelector"]  # heterogeneous pools
    spread = pod_spec(rendered.workload("expert"))["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    for c in spread:
        assert _selects(c["labelSelector"], _labels(rendered, "expert"))


def test_images_follow_each_roles_device(production_render: Rendered,
                                         default_render: Rendered) -> None:
    repo = "registry.example.com/megascale-infer"
    images = {r: main_container(production_render.workload(r))["image"] for r in ROLES}
    assert images == {"scheduler": f"{repo}:0.1.0-cpu", "gateway": f"{repo}:0.1.0-cpu",
                      "expert": f"{repo}:0.1.0-cuda", "attention": f"{repo}:0.1.0-cuda"}
    for role in ROLES:
        assert main_container(default_render.workload(role))["image"] == \
            "ghcr.io/megascale-infer/megascale-infer:0.1.0-cpu"
    pinned = render({"image": {"tag": "abc"}})
    assert main_container(pinned.workload("expert"))["image"].endswith(":abc")


@pytest.mark.parametrize("role", ROLES)
def test_graceful_drain_fits_the_grace_period(combo: tuple[str, dict, Rendered],
                                              role: str) -> None:
    name, values, rendered = combo
    spec = pod_spec(rendered.workload(role))
    grace = spec["terminationGracePeriodSeconds"]
    pre = main_container(rendered.workload(role)).get("lifecycle", {}).get("preStop")
    sleep = int(pre["exec"]["command"][1]) if pre else 0
    if pre:
        assert pre["exec"]["command"][0] == "sleep"
    assert grace > sleep
    if role == "gateway":  # its open streams go on while it leaves the Service
        assert sleep > 0
        ns = _parsed(rendered, role)
        assert sleep <= ns.request_timeout
