"""Fixtures of the Helm chart tests: the chart rendered with default and production values.

Rendering needs ``helm-python-sdk`` (the Helm SDK as a shared library; no helm binary, no
cluster); the tests skip with that reason when it is not installed.
"""

from __future__ import annotations

import pytest
from helm_render import PRODUCTION_VALUES, Rendered, load_values, render


@pytest.fixture(scope="session")
def helm():  # noqa: ANN201 - the helm_python module
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")


@pytest.fixture(scope="session")
def default_render(helm) -> Rendered:  # noqa: ANN001
    return render()


@pytest.fixture(scope="session")
def production_values() -> dict:
    return load_values(PRODUCTION_VALUES)


@pytest.fixture(scope="session")
def production_render(helm, production_values: dict) -> Rendered:  # noqa: ANN001
    return render(production_values)


@pytest.fixture(scope="session", params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Each of the two renders in turn."""
    return request.getfixturevalue(f"{request.param}_render")
