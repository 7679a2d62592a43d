"""Fixtures of the Helm chart tests: the chart rendered with every values combination
(helm_render.combo_values: defaults, each example file, inline GPU/HPA/Redis/TLS cases).

Rendering needs ``helm-python-sdk`` (the Helm SDK as a shared library; no helm binary, no
cluster); the tests skip with that reason when it is not installed.
"""

from __future__ import annotations

import functools

import pytest
from helm_render import PRODUCTION_VALUES, Rendered, combo_values, load_values, render

COMBOS = combo_values()


@functools.cache
def render_combo(name: str) -> Rendered:
    return render(COMBOS[name])


@pytest.fixture(scope="session")
def helm():  # noqa: ANN201 - the helm_python module
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")


@pytest.fixture(scope="session")
def default_render(helm) -> Rendered:  # noqa: ANN001
    return render_combo("default")


@pytest.fixture(scope="session")
def production_values() -> dict:
    return load_values(PRODUCTION_VALUES)


@pytest.fixture(scope="session")
def production_render(helm) -> Rendered:  # noqa: ANN001
    return render_combo("production")


@pytest.fixture(scope="session")
def fixed_render(helm) -> Rendered:  # noqa: ANN001
    """Fixed expert shards (expert.elastic false)."""
    return render_combo("fixed-shards")


@pytest.fixture(scope="session", params=sorted(COMBOS))
def rendered(request: pytest.FixtureRequest, helm) -> Rendered:  # noqa: ANN001
    """Each values combination in turn."""
    return render_combo(request.param)


@pytest.fixture(scope="session", params=sorted(COMBOS))
def combo(request: pytest.FixtureRequest, helm) -> tuple[str, dict, Rendered]:  # noqa: ANN001
    """(name, values, render) of each values combination in turn."""
    return request.param, COMBOS[request.param], render_combo(request.param)
