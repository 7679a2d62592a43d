"""The chart's internal-plane security: credentials from Secrets mounted as files (never on a
command line), mTLS files per role, and NetworkPolicies that close the internal pods to
anything but the release (services/common/auth.py; README "Security")."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from helm_render import container_env, main_container, parse_role, pod_identity, pod_spec, render

ROLES = ("scheduler", "attention", "expert", "gateway")
TLS = {r: f"ms-tls-{r}" for r in ROLES}


@pytest.fixture(scope="module")
def secured(helm):  # noqa: ANN001, ANN201
    return render({"security": {"clusterTokenSecret": "ms-token", "tlsSecrets": TLS}})


def _mounted_from(workload: dict, path: str) -> str:
    """The Secret whose volume is mounted at the directory holding ``path``."""
    container = main_container(workload)
    mount = next(m for m in container["volumeMounts"]
                 if PurePosixPath(path).parent == PurePosixPath(m["mountPath"]))
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["defaultMode"] == 0o400
    return volume["secret"]["secretName"]


@pytest.mark.parametrize("role", ROLES)
def test_every_role_reads_the_token_and_its_certificate_from_secrets(secured, role: str
                                                                     ) -> None:
    wl = secured.workload(role)
    container = main_container(wl)
    env = container_env(container, pod_identity(wl), {})
    ns, _ = parse_role(container, env)
    assert _mounted_from(wl, ns.cluster_token_file) == "ms-token"
    assert PurePosixPath(ns.cluster_token_file).name == "token"
    for flag, key in (("tls_cert_file", "tls.crt"), ("tls_key_file", "tls.key"),
                      ("tls_ca_file", "ca.crt")):
        path = getattr(ns, flag)
        assert PurePosixPath(path).name == key and _mounted_from(wl, path) == TLS[role]
    assert not any("token" in a or "tls" in a for a in container.get("args", []))


def test_the_gateway_can_get_only_its_role_credential(helm) -> None:  # noqa: ANN001
    r = render({"security": {"clusterTokenSecret": "ms-token",
                             "gatewayCredentialSecret": "ms-gateway-credential"}})
    for role in ROLES:
        wl = r.workload(role)
        container = main_container(wl)
        ns, _ = parse_role(container, container_env(container, pod_identity(wl), {}))
        want = ("ms-gateway-credential", "credential") if role == "gateway" else \
            ("ms-token", "token")
        assert (_mounted_from(wl, ns.cluster_token_file),
                PurePosixPath(ns.cluster_token_file).name) == want, role


def test_no_credentials_by_default(default_render) -> None:  # noqa: ANN001
    for role in ROLES:
        wl = default_render.workload(role)
        container = main_container(wl)
        ns, _ = parse_role(container, container_env(container, pod_identity(wl), {}))
        assert ns.cluster_token_file is None and ns.tls_cert_file is None


def test_a_partial_set_of_tls_secrets_is_refused(helm) -> None:  # noqa: ANN001
    with pytest.raises(Exception, match="tlsSecrets must name a Secret for all four roles"):
        render({"security": {"tlsSecrets": {"scheduler": "only-one"}}})


def test_network_policies_close_the_internal_pods(default_render) -> None:  # noqa: ANN001
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p
                for p in default_render.of_kind("NetworkPolicy")}
    assert set(policies) == {"scheduler", "attention", "expert", "redis"}  # not the gateway
    for role, policy in policies.items():
        wl = default_render.workload(role)
        pod_labels = wl["spec"]["template"]["metadata"]["labels"]
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert all(pod_labels[k] == v for k, v in spec["podSelector"]["matchLabels"].items())
        (peers, *rest) = spec["ingress"]
        (selector,) = peers["from"]
        allowed = selector["podSelector"]["matchLabels"]
        # every pod of the release matches; a pod of another release does not
        for other in ROLES:
            labels = default_render.workload(other)["spec"]["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in allowed.items()), other
        assert allowed["app.kubernetes.io/instance"] == "ms"
        if role != "redis":
            (metrics,) = rest
            ports = {p["name"]: p["containerPort"] for p in main_container(wl)["ports"]}
            assert metrics == {"ports": [{"port": ports["metrics"], "protocol": "TCP"}]}
    off = render({"security": {"networkPolicy": {"enabled": False}}})
    assert not off.of_kind("NetworkPolicy")
