"""What the rendered objects mean: every pod's env is resolved as the kubelet would and parsed
by the real ``megascale serve ROLE`` parser, then checked against the rest of the release
(elastic or fixed experts, the expert-node list, the scheduler Service, probes, ports,
autoscalers)."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import pytest
from helm_render import (
    NAMESPACE,
    PodIdentity,
    Rendered,
    container_env,
    known_env_names,
    main_container,
    named_ports,
    parse_role,
    pod_identity,
    pod_spec,
    render,
    resolve_port,
)

from libm2n import parse_url
from services.expert.config import parse_shard, partition_experts
from services.expert.main import SENDER_ID_BASE

ROLES = ("scheduler", "expert", "attention", "gateway")
API_KEY = "sk-test-0123"
REDIS_PASSWORD = "Xp0redisPW"
EXTERNAL_REDIS_URL = "redis://:ext-pw@redis-master.infra.svc.cluster.local:6379/3"


def _secret_value(name: str, key: str) -> str:
    if "url" in key:
        return EXTERNAL_REDIS_URL
    return REDIS_PASSWORD if "redis" in name or "redis" in key else API_KEY


def _secrets(rendered: Rendered) -> dict[tuple[str, str], str]:
    """A value for every Secret key the pods read (the test plays the cluster's Secret)."""
    refs = {}
    for o in rendered.objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for item in main_container(o).get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs[(ref["name"], ref["key"])] = _secret_value(ref["name"], ref["key"])
    return refs


def _secrets_of(container: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(r["name"], r["key"]): _secret_value(r["name"], r["key"])
            for item in container.get("env", [])
            if (r := item.get("valueFrom", {}).get("secretKeyRef"))}


def _replicas(workload: dict[str, Any], autoscaled: int = 3) -> int:
    """The workload's pod count (``autoscaled`` when an autoscaler owns it)."""
    return workload["spec"].get("replicas", autoscaled)


def _pods(rendered: Rendered, role: str) -> list[tuple[PodIdentity, argparse.Namespace,
                                                       dict[str, str]]]:
    """(identity, parsed flags, env) of every pod the role's workload would start."""
    wl = rendered.workload(role)
    replicas = _replicas(wl)
    out = []
    for i in range(replicas):
        pod = pod_identity(wl, i)
        env = container_env(main_container(wl), pod, _secrets(rendered))
        ns, _ = parse_role(main_container(wl), env)
        out.append((pod, ns, env))
    return out


def _service_address(rendered: Rendered, name: str, port_name: str) -> tuple[str, int]:
    svc = rendered.get("Service", name)
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name)
    return f"{name}.{NAMESPACE}.svc.cluster.local", port


def _selects(service: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


@pytest.mark.parametrize("role", ROLES)
def test_each_role_runs_megascale_serve_with_only_known_flags(rendered: Rendered,
                                                              role: str) -> None:
    wl = rendered.workload(role)
    container = main_container(wl)
    assert container["args"][:2] == ["serve", role]
    env = container_env(container, pod_identity(wl), _secrets(rendered))
    unresolved = {k: v for k, v in env.items() if "$(" in v}
    assert not unresolved, f"references the kubelet cannot expand: {unresolved}"
    ns, parser = parse_role(container, env)
    assert ns.role == role
    unknown = {k for k in env if k.startswith("MEGASCALE_")} - known_env_names(parser)
    assert not unknown, f"{role}: env vars that no flag reads: {sorted(unknown)}"


def test_fixed_expert_pods_cover_all_shards_exactly_once(fixed_render: Rendered) -> None:
    pods = _pods(fixed_render, "expert")
    n = len(pods)
    shards = [parse_shard(ns.experts) for _, ns, _ in pods]
    assert sorted(shards) == [(i, n) for i in range(n)]
    for pod, ns, _ in pods:  # pod I hosts shard I
        assert parse_shard(ns.experts)[0] == int(pod.labels["apps.kubernetes.io/pod-index"])
    num_experts = 8 * n  # any expert count >= N: the shards partition it
    hosted = [e for i, _ in shards for e in partition_experts(num_experts, n)[i]]
    assert sorted(hosted) == list(range(num_experts))


def test_elastic_expert_pods_wait_for_the_scheduler_and_attention_learns_them(
        combo: tuple[str, dict, Rendered]) -> None:
    name, values, rendered = combo
    elastic = values.get("expert", {}).get("elastic", True)
    (_, sched, _), = _pods(rendered, "scheduler")
    expert_pods = _pods(rendered, "expert")
    if not elastic:
        assert {ns.experts.split(":")[0] for _, ns, _ in expert_pods} == {"shard"}
        assert sched.expert_replicas == 1  # the scheduler's default: one copy per shard
        return
    assert {ns.experts for _, ns, _ in expert_pods} == {"auto"}
    expected_r = values.get("scheduler", {}).get("expertReplicas", 2)
    assert int(sched.expert_replicas) == expected_r
    assert len(expert_pods) >= expected_r  # copies of an expert live on distinct nodes
    for _, ns, _ in _pods(rendered, "attention"):
        assert ns.expert_nodes is None and ns.scheduler  # learnt from the scheduler


def test_scaling_elastic_experts_leaves_attention_pods_untouched(helm) -> None:  # noqa: ANN001
    """Elastic: N is in no attention pod's spec (N -> N+k rolls nothing but new expert pods);
    fixed: N is baked into both."""
    def templates(values: dict) -> tuple[dict, dict]:
        out = render(values)
        return (out.workload("attention")["spec"]["template"],
                out.workload("expert")["spec"]["template"])
    att2, exp2 = templates({"expert": {"replicas": 2}})
    att5, exp5 = templates({"expert": {"replicas": 5}})
    assert att2 == att5 and exp2 == exp5
    fatt2, _ = templates({"expert": {"replicas": 2, "elastic": False}})
    fatt5, _ = templates({"expert": {"replicas": 5, "elastic": False}})
    assert fatt2 != fatt5


def test_production_has_four_expert_nodes_and_three_attention_replicas(
        production_render: Rendered) -> None:
    assert len(_pods(production_render, "expert")) == 4
    assert production_render.workload("attention")["spec"].get("replicas") is None  # the HPA's
    hpa = production_render.get("HorizontalPodAutoscaler",
                                production_render.workload("attention")["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == 3


def test_libm2n_sender_ids_are_unique_across_all_pods(rendered: Rendered) -> None:
    att = rendered.workload("attention")
    replicas = att["spec"].get("replicas") or 12  # with an autoscaler: up to 12
    # fixed shards leave --m2n-sender-id unset: the CLI derives 65536 + I from shard:I/N;
    # elastic expert pods get PREFIX + I (pods 0..11, as an autoscaler may make them)
    exp = rendered.workload("expert")
    (_, first, _), *_ = _pods(rendered, "expert")
    ids = []
    for i in range(12 if first.experts == "auto" else _replicas(exp)):
        pod = pod_identity(exp, i)
        env = container_env(main_container(exp), pod, _secrets(rendered))
        ns, _ = parse_role(main_container(exp), env)
        ids.append(ns.m2n_sender_id if ns.m2n_sender_id is not None
                   else SENDER_ID_BASE + parse_shard(ns.experts)[0])
    for i in range(replicas):
        pod = pod_identity(att, i)
        ns, _ = parse_role(main_container(att), container_env(main_container(att), pod))
        assert ns.m2n_sender_id == i
        ids.append(ns.m2n_sender_id)
    assert len(ids) == len(set(ids)), ids


def test_fixed_mode_attention_dials_exactly_the_expert_pods(fixed_render: Rendered) -> None:
    rendered = fixed_render
    experts = rendered.workload("expert")
    headless = rendered.get("Service", experts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and _selects(headless, experts)
    expert_pods = _pods(rendered, "expert")
    (grpc_port,) = {ns.grpc_port for _, ns, _ in expert_pods}
    expected = [f"{pod.name}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:"
                f"{grpc_port}" for pod, _, _ in expert_pods]
    for _, ns, _ in _pods(rendered, "attention"):
        assert ns.expert_nodes.split(",") == expected
    # The headless Service's grpc port is the port the expert pods serve gRPC on.
    svc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert resolve_port(main_container(experts), svc_port["targetPort"]) == grpc_port


def test_every_role_points_at_the_scheduler_service(rendered: Rendered) -> None:
    sched = rendered.workload("scheduler")
    svc = rendered.get("Service", sched["metadata"]["name"])
    assert _selects(svc, sched)
    host, port = _service_address(rendered, svc["metadata"]["name"], "grpc")
    (_, sched_ns, _), = _pods(rendered, "scheduler")
    target = next(p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert resolve_port(main_container(sched), target) == sched_ns.grpc_port
    for role in ("expert", "attention", "gateway"):
        for _, ns, _ in _pods(rendered, role):
            assert ns.scheduler == f"{host}:{port}", role


def test_scheduler_uses_the_chart_redis_or_the_external_one(default_render: Rendered,
                                                            production_render: Rendered,
                                                            production_values: dict) -> None:
    (_, ns, _), = _pods(default_render, "scheduler")
    redis = default_render.workload("redis")
    host, port = _service_address(default_render, redis["metadata"]["name"], "redis")
    assert ns.redis_url == f"redis://:{REDIS_PASSWORD}@{host}:{port}/0"
    container = main_container(redis)
    assert container["image"] == "redis:7"
    # redis-server gets the same password (the kubelet expands it from the same Secret)
    env = container_env(container, pod_identity(redis), _secrets_of(container))
    args = [a.replace("$(REDIS_PASSWORD)", env["REDIS_PASSWORD"]) for a in container["args"]]
    assert args[args.index("--requirepass") + 1] == REDIS_PASSWORD
    secret = default_render.get("Secret", f"{redis['metadata']['name']}-auth")
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 32
    (_, ns, _), = _pods(production_render, "scheduler")
    assert ns.redis_url == EXTERNAL_REDIS_URL  # from the Secret the values name
    item = next(e for e in main_container(production_render.workload("scheduler"))["env"]
                if e["name"] == "MEGASCALE_REDIS_URL")
    assert item["valueFrom"]["secretKeyRef"]["name"] == \
        production_values["redis"]["external"]["urlSecret"]
    assert not [o for o in production_render.objects
                if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]


@pytest.mark.parametrize("role", ("expert", "attention"))
def test_data_plane_roles_bind_and_advertise_the_pod_ip(rendered: Rendered,
                                                        role: str) -> None:
    """Internal ports (gRPC and libm2n) listen on the pod IP only, never on every address."""
    container = main_container(rendered.workload(role))
    for pod, ns, _ in _pods(rendered, role)[:2]:
        assert ns.host == pod.ip and ns.advertise_host == pod.ip
        assert ns.node_id == pod.name
        ep = parse_url(ns.m2n_url)
        assert (ep.scheme, ep.host) == ("tcp", pod.ip)
        assert named_ports(container)["m2n"] == ep.port
        assert ns.model == "/model"


@pytest.mark.parametrize("role", ("scheduler", "expert", "attention"))
def test_grpc_probes_and_ports_match_the_flags(rendered: Rendered, role: str) -> None:
    wl = rendered.workload(role)
    container = main_container(wl)
    (_, ns, _), *_ = _pods(rendered, role)
    ports = named_ports(container)
    assert ports["grpc"] == ns.grpc_port != 0
    assert ports["metrics"] == ns.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ns.grpc_port, probe
    annotations = wl["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ns.metrics_port


def test_gateway_probes_ports_and_service(rendered: Rendered) -> None:
    wl = rendered.workload("gateway")
    container = main_container(wl)
    (_, ns, _), *_ = _pods(rendered, "gateway")
    assert ns.host == "0.0.0.0" and ns.port == 8000 and ns.model == "/model"
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and resolve_port(container, get["port"]) == ns.port
    annotations = wl["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ns.port  # /metrics on the HTTP port
    svc = rendered.get("Service", wl["metadata"]["name"])
    assert _selects(svc, wl)
    http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    assert resolve_port(container, http["targetPort"]) == ns.port


def test_api_key_comes_from_the_secret_only_when_set(default_render: Rendered,
                                                     production_render: Rendered,
                                                     production_values: dict) -> None:
    (_, ns, _), = _pods(default_render, "gateway")[:1]
    assert ns.api_key is None
    (_, ns, env), *_ = _pods(production_render, "gateway")
    assert ns.api_key == API_KEY
    item = next(e for e in main_container(production_render.workload("gateway"))["env"]
                if e["name"] == "MEGASCALE_API_KEY")
    assert item["valueFrom"]["secretKeyRef"] == {
        "name": production_values["gateway"]["apiKeySecret"],
        "key": production_values["gateway"]["apiKeySecretKey"]}


def test_model_volume_demo_init_container_and_pvc(default_render: Rendered,
                                                  production_render: Rendered,
                                                  production_values: dict) -> None:
    from services.cli import build_parser

    for role in ROLES:
        spec = pod_spec(default_render.workload(role))
        (init,) = spec["initContainers"]
        argv = init["args"]
        ns = build_parser(argv).parse_args(argv)  # the real `megascale demo-model` parser
        assert (ns.command, ns.out, ns.experts) == ("demo-model", "/model", 8)
        assert {"name": "model", "emptyDir": {}} in spec["volumes"]
        mount = next(m for m in main_container(default_render.workload(role))["volumeMounts"]
                     if m["name"] == "model")
        assert mount["mountPath"] == "/model" and mount["readOnly"] is True

        spec = pod_spec(production_render.workload(role))
        assert "initContainers" not in spec
        vol = next(v for v in spec["volumes"] if v["name"] == "model")
        assert vol["persistentVolumeClaim"]["claimName"] == \
            production_values["model"]["pvc"]["claimName"]


def test_node_selectors_and_gpus_per_pool(production_render: Rendered,
                                          production_values: dict) -> None:
    for role in ROLES:
        spec = pod_spec(production_render.workload(role))
        assert spec["nodeSelector"] == production_values[role]["nodeSelector"], role
    for role in ("expert", "attention"):
        (_, ns, env), *_ = _pods(production_render, role)
        assert ns.device == "cuda" and ns.dtype == "bfloat16"
        assert env["MEGASCALE_TORCH_THREADS"] == "4"
        assert main_container(production_render.workload(role))["resources"]["limits"][
            "nvidia.com/gpu"] == 1


def test_autoscalers_off_by_default_and_target_real_workloads(default_render: Rendered,
                                                              production_render: Rendered
                                                              ) -> None:
    assert default_render.of_kind("HorizontalPodAutoscaler") == []
    hpas = {h["metadata"]["labels"]["app.kubernetes.io/component"]: h
            for h in production_render.of_kind("HorizontalPodAutoscaler")}
    assert set(hpas) == {"attention", "gateway"}  # experts: scaled by hand or by KEDA
    for role, hpa in hpas.items():
        wl = production_render.workload(role)
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == (wl["kind"], wl["metadata"]["name"])
        assert "replicas" not in wl["spec"]  # the HPA owns it
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpas["attention"]["spec"]["metrics"]
                    if m["type"] == "Pods"]
    assert "megascale_num_requests_waiting" in pods_metrics
    kinds = {m["type"] for m in hpas["gateway"]["spec"]["metrics"]}
    assert kinds == {"Resource", "Pods"}


def test_fixed_expert_autoscaler_keeps_the_shard_count_in_the_statefulset(helm) -> None:  # noqa: ANN001
    out = render({"expert": {"replicas": 3, "elastic": False, "autoscaling": {"enabled": True}}})
    experts = out.workload("expert")
    assert experts["spec"]["replicas"] == 3  # N stays pinned: it is part of every shard
    assert out.get("HorizontalPodAutoscaler", experts["metadata"]["name"])
    assert [ns.experts for _, ns, _ in _pods(out, "expert")] == [
        "shard:0/3", "shard:1/3", "shard:2/3"]


def test_names_fit_dns_limits_with_a_long_release_name(helm) -> None:  # noqa: ANN001
    out = render(name="a-very-long-release-name-for-megascale-infer-tests")
    for o in out.objects:
        # pods and their Services: + "-NNN" pod suffix; the rest: a DNS label
        limit = 52 if o["kind"] in ("Deployment", "StatefulSet", "Service") else 63
        assert len(o["metadata"]["name"]) <= limit, o["metadata"]["name"]
    fixed = render({"expert": {"elastic": False}},
                   name="a-very-long-release-name-for-megascale-infer-tests")
    for _, ns, _ in _pods(fixed, "attention"):
        assert all(len(host.split(".")[0]) <= 63 for host in ns.expert_nodes.split(","))


def test_notes_tell_how_to_reach_the_gateway(default_render: Rendered,
                                             production_render: Rendered) -> None:
    gw = default_render.workload("gateway")["metadata"]["name"]
    assert f"port-forward svc/{gw} 8000:8000" in default_render.notes
    assert "/v1/completions" in default_render.notes
    assert "https://llm.example.com" in production_render.notes
    assert "Authorization: Bearer" in production_render.notes
