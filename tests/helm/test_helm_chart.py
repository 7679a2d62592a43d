"""The chart as a chart: helm lint, strict Kubernetes schema validation of every rendered
manifest of every values combination (custom resources against crd_schemas.py), yamllint of
the values files, and one-line errors for values that cannot work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import COMBOS, render_combo
from crd_schemas import is_custom, validate_custom
from helm_render import CHART, EXAMPLES, PRODUCTION_VALUES, Rendered, render

# A recent release whose schemas kubernetes-validate ships (it works offline).
KUBE_VERSION = "1.35.0"


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_helm_lint_strict_passes(helm, name: str) -> None:  # noqa: ANN001
    for values in (COMBOS[name] or None,):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings, errors
        assert report["total_charts_linted"] == 1
        assert not report["errors"] and not problems, report


def test_lint_reports_a_broken_template(helm, tmp_path: Path) -> None:  # noqa: ANN001
    """The lint check itself can fail: a copy of the chart with a template error is caught."""
    broken = tmp_path / "chart"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: {{ .Values.nope.missing }}\n")
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


def _validate(rendered: Rendered, tmp_path: Path, name: str = "manifest"
              ) -> subprocess.CompletedProcess[str]:
    return _validate_many({name: rendered}, tmp_path)


def _validate_many(renders: dict[str, Rendered], tmp_path: Path
                   ) -> subprocess.CompletedProcess[str]:
    """kubernetes-validate --strict over the built-in kinds of every render (one process)."""
    files = []
    for name, rendered in renders.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(
            [o for o in rendered.objects if not is_custom(o)], sort_keys=False))
        files.append(str(manifest))
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, "--quiet",
         *files], capture_output=True, text=True, timeout=300)


def test_every_manifest_of_every_combination_passes_kubernetes_validate_strict(
        helm, tmp_path: Path) -> None:  # noqa: ANN001
    pytest.importorskip("kubernetes_validate",
                        reason="kubernetes-validate is not installed (pip install "
                               "kubernetes-validate)")
    result = _validate_many({name: render_combo(name) for name in COMBOS}, tmp_path)
    # WARN means a kind without a schema (not validated at all): fail on it too.
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


def test_custom_resources_match_their_documented_schemas(rendered: Rendered) -> None:
    errors = [e for o in rendered.objects if is_custom(o) for e in validate_custom(o)]
    assert not errors, "\n".join(errors)
    kinds = {o["kind"] for o in rendered.objects} - {
        "Service", "Deployment", "StatefulSet", "Secret", "NetworkPolicy", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "Ingress", "ScaledObject", "ServiceMonitor"}
    assert not kinds, f"kinds no test validates: {kinds}"


def test_custom_resource_schemas_catch_mistakes(helm) -> None:  # noqa: ANN001
    keda = render_combo("keda")
    so = next(o for o in keda.objects if o["kind"] == "ScaledObject")
    bad = yaml.safe_load(yaml.safe_dump(so))
    bad["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    assert any("maxReplicas" in e for e in validate_custom(bad))
    bad = yaml.safe_load(yaml.safe_dump(so))
    del bad["spec"]["triggers"][0]["metadata"]["threshold"]
    assert any("threshold" in e for e in validate_custom(bad))
    bad = yaml.safe_load(yaml.safe_dump(so))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # metadata values are strings
    assert validate_custom(bad)
    sm = next(o for o in keda.objects if o["kind"] == "ServiceMonitor")
    bad = yaml.safe_load(yaml.safe_dump(sm))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert any("interval" in e for e in validate_custom(bad))


def test_kubernetes_validate_catches_an_unknown_field(default_render: Rendered,
                                                      tmp_path: Path) -> None:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    bad = Rendered([dict(o) for o in default_render.objects])
    gateway = next(o for o in bad.objects if o["kind"] == "Deployment"
                   and o["metadata"]["name"].endswith("-gateway"))
    gateway["spec"] = {**gateway["spec"], "replica": 2}  # a typo of "replicas"
    result = _validate(bad, tmp_path)
    assert result.returncode != 0 and "replica" in result.stdout


def test_values_files_pass_yamllint() -> None:
    exe = shutil.which("yamllint")
    if exe is None:
        pytest.skip("yamllint is not installed (pip install yamllint)")
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *sorted(EXAMPLES.glob("*.yaml"))]
    assert PRODUCTION_VALUES in files
    result = subprocess.run([exe, "--strict", "-c", str(CHART / ".yamllint"), *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_production_example_really_is_production_shaped(production_values: dict) -> None:
    v = production_values
    assert v["redis"]["enabled"] is False and v["redis"]["external"]["urlSecret"]
    assert v["expert"]["replicas"] == 4 and v["attention"]["replicas"] == 3
    assert v["expert"]["elastic"] and v["scheduler"]["expertReplicas"] == 2
    assert v["security"]["tls"]["enabled"] and v["security"]["clusterToken"]["existingSecret"]
    assert v["gateway"]["apiKeySecret"]
    assert v["attention"]["autoscaling"]["enabled"] and v["gateway"]["autoscaling"]["enabled"]
    assert v["attention"]["nodeSelector"] != v["expert"]["nodeSelector"]


@pytest.mark.parametrize(("values", "message"), [
    # Caught by the template checks (cross-field rules):
    ({"redis": {"enabled": False}},
     "redis.external.urlSecret is required when redis.enabled is false"),
    ({"expert": {"replicas": 1}},
     "expert.replicas (1) must be >= scheduler.expertReplicas (2)"),
    ({"expert": {"keda": {"enabled": True, "minReplicas": 1}}},
     "expert.keda.minReplicas (1) must be >= scheduler.expertReplicas (2)"),
    ({"expert": {"elastic": False, "keda": {"enabled": True}}},
     "expert.keda needs expert.elastic"),
    ({"attention": {"keda": {"enabled": True}, "autoscaling": {"enabled": True}}},
     "attention.autoscaling and attention.keda are exclusive"),
    ({"gateway": {"preStopSeconds": 60, "terminationGracePeriodSeconds": 30}},
     "gateway.terminationGracePeriodSeconds (30) must exceed gateway.preStopSeconds (60)"),
    ({"attention": {"device": "cuda"}},
     "attention.device is cuda but its pods request no GPU: set attention.gpus"),
    ({"security": {"tls": {"enabled": True}}},
     "security.tls.secretName (or security.tls.perRole.ROLE) is required"),
    ({"expert": {"replicas": 9}}, "expert.replicas (9) must be <= model.demo.experts (8)"),
    ({"model": {"source": "pvc"}}, "model.pvc.claimName is required when model.source is pvc"),
    ({"model": {"source": "hostPath"}}, "model.hostPath.path is required"),
    ({"attention": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}},
     "attention.autoscaling is enabled but has no metric"),
    # Caught by values.schema.json (types, ranges, enums, misspelt keys):
    ({"expert": {"replicas": 0}}, "at '/expert/replicas': minimum: got 0, want 1"),
    ({"expert": {"replicas": "two"}}, "at '/expert/replicas': got string, want integer"),
    ({"attention": {"replicas": 0}}, "at '/attention/replicas': minimum: got 0, want 1"),
    ({"model": {"source": "s3"}}, "at '/model/source': value must be one of"),
    ({"attention": {"device": "tpu"}}, "at '/attention/device'"),
    ({"gateway": {"prot": 8000}}, "additional properties 'prot' not allowed"),
    # A Redis URL (password and all) is never a plain value:
    ({"redis": {"url": "redis://:pw@r:6379/0"}}, "additional properties 'url' not allowed"),
    ({"keda": {"serverAddress": "prometheus:9090"}}, "at '/keda/serverAddress'"),
    ({"expert": {"senderIdPrefix": "0"}}, "at '/expert/senderIdPrefix'"),
    ({"scheduler": {"quarantineHold": 0}}, "at '/scheduler/quarantineHold'"),
])
def test_bad_values_fail_with_a_clear_message(helm, values: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)
