"""Formulas of the performance model against hand-computed values."""

from __future__ import annotations

import pytest

from services.errors import ConfigError
from services.planner import perf_model as pm
from services.planner.hardware import HardwareSpec, get_gpu
from services.planner.models import PRESETS, MoEShape

MIXTRAL = PRESETS["Mixtral-8x22B"]
# Round numbers so the roofline can be checked by hand: 100 TFLOPS, 1000 GB/s, no overhead.
TOY_HW = HardwareSpec("toy", memory_gb=100, tflops=100, mem_bw_gbs=1000, price=2.0, nic_gbs=10,
                      intra_bw_gbs=100, compute_eff=1.0, mem_eff=1.0, overhead_us=0.0,
                      usable_mem_frac=1.0)
TOY = MoEShape("toy", layers=10, hidden=1000, heads=10, kv_heads=2, head_dim=100, experts=8,
               top_k=2, expert_intermediate=2000, vocab=1000)


def test_shape_counts_by_hand():
    # q 1000x1000 + kv 2x1000x200 + o 1000x1000 + router 1000x8
    assert TOY.attn_params_per_layer == 1_000_000 + 400_000 + 1_000_000 + 8_000
    assert TOY.kv_bytes_per_token_layer == 2 * 2 * 200  # the paper's 4·h/g with h/g = 200
    assert TOY.expert_params_per_layer == 3 * 1000 * 2000
    assert TOY.attn_params == 10 * 2_408_000 + 2 * 1000 * 1000
    # Mixtral 8x22B is ~141B parameters with ~39B active.
    assert 138e9 < MIXTRAL.total_params < 145e9
    assert 37e9 < MIXTRAL.active_params < 41e9


def test_expert_batch():
    assert pm.expert_batch(100, 8, 2, 8) == 200  # b_a·n_a·K/E
    assert pm.expert_batch(64, 3, 4, 16) == 48


def test_t_total_paper_formula():
    # (T_a + T_e + 2T_c) + T_f (mL - 1) = (1 + 2 + 2·0.5) + 2·(2·3 - 1) = 4 + 10
    assert pm.t_total(1.0, 2.0, 0.5, 2, 3) == pytest.approx(14.0)


def test_iteration_time_regimes():
    # pipelined (m·T_f = 6 >= R = 4): equals the paper's formula
    assert pm.iteration_time(1.0, 2.0, 0.5, 3, 4) == pytest.approx(pm.t_total(1.0, 2.0, 0.5, 3, 4))
    # m = 1: every layer is a full round trip, L·R
    assert pm.iteration_time(1.0, 1.0, 0.25, 1, 5) == pytest.approx(5 * 2.5)
    # m = 2 with T_c = 0.5·T_f: R = 3 > 2·T_f; L·R + (m-1)·T_f = 4·3 + 1
    assert pm.iteration_time(1.0, 1.0, 0.5, 2, 4) == pytest.approx(13.0)
    assert pm.t_total(1.0, 1.0, 0.5, 2, 4) == pytest.approx(10.0)  # the paper's would be lower


def test_pipeline_condition():
    assert pm.pipeline_condition(1.0, 1.0, 0.0, 2)
    assert not pm.pipeline_condition(1.0, 1.0, 0.5, 2)  # needs m >= 3
    assert pm.pipeline_condition(1.0, 1.0, 0.5, 3)


def test_latency_curve_interpolates_extrapolates_and_fits():
    c = pm.LatencyCurve(((1, 1.0), (3, 2.0), (5, 4.0)))
    assert c(2) == pytest.approx(1.5)
    assert c(4) == pytest.approx(3.0)
    assert c(7) == pytest.approx(6.0)  # last segment's slope
    lin = pm.LatencyCurve.linear(0.5, 2.0)
    assert lin(10) == pytest.approx(7.0)
    assert lin.fit() == pytest.approx((0.5, 2.0))
    with pytest.raises(ConfigError):
        pm.LatencyCurve(((2, 1.0), (1, 2.0)))


def test_roofline_expert_by_hand():
    curve = pm.roofline_expert(TOY, TOY_HW, tp=1)
    weights = 2 * 6_000_000  # bytes of one expert-layer
    mem_t = weights / 1e12  # 12 µs at 1000 GB/s
    flop_per_token = 2 * 6_000_000 / 1e14  # 0.12 µs per token at 100 TFLOPS
    assert curve(1) == pytest.approx(mem_t)  # memory-bound
    assert curve(100) == pytest.approx(mem_t)  # knee at exactly 100 tokens
    assert curve(400) == pytest.approx(400 * flop_per_token)  # compute-bound
    k3, k4 = pm.LatencyCurve(((200, curve(200)), (400, curve(400)))).fit()
    assert k3 == pytest.approx(flop_per_token)
    # tp = 2 halves both, and adds the all-reduce: 2(tp-1)/tp · b · h · 2 bytes / 100 GB/s
    tp2 = pm.roofline_expert(TOY, TOY_HW, tp=2)
    assert tp2(1) == pytest.approx(mem_t / 2 + 1 * 1000 * 2 / 100e9)


def test_roofline_attention_by_hand():
    seq = 500
    curve = pm.roofline_attention(TOY, TOY_HW, tp=1, seq_len=seq)
    w_bytes = 2 * TOY.attn_params_per_layer
    kv = seq * TOY.kv_bytes_per_token_layer  # 400 KB per sequence per layer
    b = 10
    mem = (w_bytes + b * kv) / 1e12
    flops = b * (2 * TOY.attn_params_per_layer + seq * 4 * 10 * 100) / 1e14
    assert curve(b) == pytest.approx(max(mem, flops))


def test_kv_memory_constraint_by_hand():
    # 4·m·b_a·s·h·L/g + 2·P_a < tp·C: free = 100 GB - 2·P_a; per sequence s·L·kv bytes
    seq = 1000
    per_seq = seq * 10 * 800
    free = 100e9 - 2 * TOY.attn_params
    assert pm.max_seqs_per_replica(TOY, TOY_HW, 1, seq) == int(free // per_seq)
    assert pm.max_seqs_per_replica(TOY, TOY_HW, 2, seq) == int((2 * 100e9 - 2 * TOY.attn_params)
                                                               // per_seq)
    # Mixtral on a single L40S: 2·P_a ≈ 10.6 GB fits in 43 GB usable; the KV of 730 tokens x 56
    # layers x 4 KB = 167 MB per sequence.
    l40s = get_gpu("L40S")
    n = pm.max_seqs_per_replica(MIXTRAL, l40s, 1, 730)
    assert n == int((l40s.usable_bytes - 2 * MIXTRAL.attn_params) // (730 * 56 * 4096))
    assert pm.experts_fit(MIXTRAL, l40s, 1)  # 33.8 GB per expert
    assert not pm.experts_fit(MIXTRAL, l40s, 1, experts_per_node=2)


def test_bw_utilization_curve():
    assert pm.bw_utilization(100) == pm.BW_UTIL_CURVE[0][1]
    assert pm.bw_utilization(1e9) == pm.BW_UTIL_CURVE[-1][1]
    assert pm.bw_utilization(256e3) == pytest.approx(0.70)
    mid = pm.bw_utilization(128e3)  # halfway in log space between 64 KB and 256 KB
    assert mid == pytest.approx(0.55)


def test_comm_time_by_hand():
    # replica sends b_a·K·h·2 bytes = 10·2·1000·2 = 40 KB; per expert node 5 KB messages.
    b_a, n_a = 10, 4
    util = pm.bw_utilization(5000)
    send = 40_000 / (10e9 * util)
    recv = 5000 * n_a / (10e9 * util)
    assert pm.comm_time(TOY, TOY_HW, TOY_HW, 1, 1, b_a, n_a) == pytest.approx(max(send, recv))
    # twice the NICs (tp_a = 2) halve the sending side
    assert pm.transfer_time(40_000, 5000, 10, 2) == pytest.approx(send / 2)


def test_estimate_consistency():
    curves = pm.RoleCurves(pm.LatencyCurve.linear(1e-5, 1e-4),
                           pm.LatencyCurve.linear(2e-6, 3e-4))
    est = pm.estimate(TOY, curves, TOY_HW, TOY_HW, 1, 1, n_a=4, m=2, b_a=50, comm=5e-5)
    assert est.b_e == pytest.approx(50.0)  # 50·4·2/8
    assert est.t_a == pytest.approx(6e-4)
    assert est.t_e == pytest.approx(4e-4)
    assert est.t_total == pytest.approx(pm.iteration_time(6e-4, 4e-4, 5e-5, 2, 10))
    assert est.batch == 400
    assert est.tokens_per_s == pytest.approx(400 / est.t_total)
    assert est.util_attention == pytest.approx(20 * 6e-4 / est.t_total)
