"""The chart as a chart: helm lint, strict Kubernetes schema validation of every rendered
manifest, yamllint of the values files, and one-line errors for values that cannot work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helm_render import CHART, PRODUCTION_VALUES, Rendered, render

# A recent release whose schemas kubernetes-validate ships (it works offline).
KUBE_VERSION = "1.35.0"


def test_helm_lint_strict_passes(helm, production_values: dict) -> None:  # noqa: ANN001
    for values in (None, production_values):
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


def _validate(rendered: Rendered, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered.objects, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, "--quiet",
         str(manifest)], capture_output=True, text=True, timeout=120)


def test_every_manifest_passes_kubernetes_validate_strict(rendered: Rendered,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("kubernetes_validate",
                        reason="kubernetes-validate is not installed (pip install "
                               "kubernetes-validate)")
    result = _validate(rendered, tmp_path)
    # WARN means a kind without a schema (not validated at all): fail on it too.
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


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
    files = [CHART / "values.yaml", PRODUCTION_VALUES, CHART / "Chart.yaml"]
    result = subprocess.run([exe, "--strict", "-c", str(CHART / ".yamllint"), *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_production_example_really_is_production_shaped(production_values: dict) -> None:
    v = production_values
    assert v["redis"]["enabled"] is False and v["redis"]["url"]
    assert v["expert"]["replicas"] == 4 and v["attention"]["replicas"] == 3
    assert v["gateway"]["apiKeySecret"]
    assert v["attention"]["autoscaling"]["enabled"] and v["gateway"]["autoscaling"]["enabled"]
    assert v["attention"]["nodeSelector"] != v["expert"]["nodeSelector"]


@pytest.mark.parametrize(("values", "message"), [
    # Caught by the template checks (cross-field rules):
    ({"redis": {"enabled": False}}, "redis.url is required when redis.enabled is false"),
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
    ({"scheduler": {"quarantineHold": 0}}, "at '/scheduler/quarantineHold'"),
])
def test_bad_values_fail_with_a_clear_message(helm, values: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)
