"""``megascale up``'s layout rule (services/launch/layout.py): what auto picks, what forcing
allows, and the one-line errors for combinations it cannot honour."""

from __future__ import annotations

import pytest

from services.errors import UserError
from services.launch.layout import choose_layout


def test_one_cpu_host_is_colocated_with_every_core():
    lay = choose_layout("auto", 1, None, None, ["cpu"], ["cpu"], 8, cpus=2)
    assert (lay.kind, lay.experts, lay.micro_batches, lay.attention_threads) == \
        ("colocated", 0, 1, 2)
    assert "same 2 CPU cores" in lay.describe()


def test_cores_are_split_over_colocated_replicas():
    lay = choose_layout("auto", 2, None, None, ["cpu"], ["cpu"], 8, cpus=8)
    assert lay.attention_threads == 4


def test_asking_for_expert_nodes_disaggregates():
    lay = choose_layout("auto", 1, 1, None, ["cpu"], ["cpu"], 8, cpus=2)
    assert (lay.kind, lay.experts, lay.micro_batches) == ("disaggregated", 1, 2)
    assert lay.attention_threads == lay.expert_threads == 1  # 2 cores over 2 processes


def test_experts_on_gpus_of_their_own_disaggregate():
    lay = choose_layout("auto", 1, None, None, ["cuda:0"], ["cuda:1", "cuda:2"], 8)
    assert lay.kind == "disaggregated" and "cuda:1,cuda:2" in lay.reason
    assert lay.attention_threads == 1  # GPU roles: threads only drive kernels


def test_every_role_on_one_gpu_is_colocated():
    lay = choose_layout("auto", 1, None, None, ["cuda:0"], ["cuda:0"], 8)
    assert lay.kind == "colocated" and "cuda:0" in lay.reason


def test_forcing_and_its_errors():
    lay = choose_layout("disaggregated", 1, None, 3, ["cpu"], ["cpu"], 8, threads=1, cpus=2)
    assert (lay.kind, lay.experts, lay.micro_batches, lay.reason) == \
        ("disaggregated", 2, 3, "forced by --layout")
    with pytest.raises(UserError, match="drop --experts"):
        choose_layout("colocated", 1, 2, None, ["cpu"], ["cpu"], 8)
    with pytest.raises(UserError, match="drop --micro-batches"):
        choose_layout("colocated", 1, None, 2, ["cpu"], ["cpu"], 8)
    with pytest.raises(UserError, match=r"--experts must be in 1\.\.8"):
        choose_layout("auto", 1, 9, None, ["cpu"], ["cpu"], 8)
    with pytest.raises(UserError, match="--threads must be >= 1"):
        choose_layout("auto", 1, None, None, ["cpu"], ["cpu"], 8, threads=0)
