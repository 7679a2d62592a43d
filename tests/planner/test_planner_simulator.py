"""The discrete-event simulator against the closed form (hypothesis property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.errors import ConfigError
from services.planner.perf_model import iteration_time, pipeline_condition, t_total
from services.planner.simulator import simulate

times = st.floats(min_value=0.01, max_value=2.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(t_a=times, t_e=times, frac=st.floats(0.0, 0.99), m=st.integers(1, 5),
       layers=st.integers(1, 8), n_a=st.integers(1, 3), n_e=st.integers(1, 3))
def test_simulator_equals_paper_formula_when_pipeline_holds(t_a, t_e, frac, m, layers, n_a, n_e):
    t_c = frac * max(t_a, t_e)  # the paper's T_c < T_f
    sim = simulate(layers, m, t_a, t_e, t_c, n_attention=n_a, n_expert=n_e)
    if pipeline_condition(t_a, t_e, t_c, m):
        assert sim.iteration_time == pytest.approx(t_total(t_a, t_e, t_c, m, layers), rel=1e-9)
    # every regime: the extended closed form is exact
    assert sim.iteration_time == pytest.approx(iteration_time(t_a, t_e, t_c, m, layers), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(t=times, frac=st.floats(0.01, 3.0), m=st.integers(1, 5), layers=st.integers(2, 8))
def test_simulator_exceeds_paper_formula_when_m_too_small(t, frac, m, layers):
    t_c = frac * t  # balanced T_a = T_e = T_f = t
    sim = simulate(layers, m, t, t, t_c)
    paper = t_total(t, t, t_c, m, layers)
    if m < 2 * (1 + t_c / t) - 1e-9:
        assert sim.iteration_time > paper * (1 + 1e-9)
    else:
        assert sim.iteration_time >= paper * (1 - 1e-9)


def test_m1_vs_m2_same_batch_shows_the_pingpong_gain():
    # Balanced, T_c small: halving each micro-batch keeps both sides busy.
    layers = 40
    one = simulate(layers, 1, 1.0, 1.0, 0.05, batch=100)
    two = simulate(layers, 2, 0.55, 0.55, 0.03, batch=100)  # each half-batch costs 55 %
    assert 1.7 < two.tokens_per_s / one.tokens_per_s < 2.0
    assert one.util_attention == pytest.approx(40 / one.makespan)


def test_stragglers_and_skew_slow_the_iteration():
    base = simulate(10, 3, 1.0, 1.0, 0.1, n_attention=4, n_expert=4)
    slow_replica = simulate(10, 3, [1.0, 1.0, 1.0, 1.5], 1.0, 0.1, n_attention=4, n_expert=4)
    hot_expert = simulate(10, 3, 1.0, [1.0, 1.0, 1.0, 2.0], 0.1, n_attention=4, n_expert=4)
    assert slow_replica.iteration_time > base.iteration_time
    assert hot_expert.iteration_time > slow_replica.iteration_time
    assert hot_expert.util_expert < 1.0


def test_several_iterations_and_scale():
    one = simulate(4, 2, 1.0, 1.0, 0.1)
    three = simulate(4, 2, 1.0, 1.0, 0.1, iterations=3)
    assert three.makespan > 2.9 * one.makespan * 0.9
    big = simulate(61, 4, 0.5, 0.5, 0.2, n_attention=64, n_expert=256, batch=64 * 4 * 100)
    assert big.iteration_time == pytest.approx(iteration_time(0.5, 0.5, 0.2, 4, 61))
    assert big.jobs == 61 * 4 * (64 + 1)


def test_bad_simulator_input():
    with pytest.raises(ConfigError):
        simulate(0, 2, 1.0, 1.0, 0.1)
    with pytest.raises(ConfigError, match="t_a has 2 entries"):
        simulate(2, 2, [1.0, 1.0], 1.0, 0.1, n_attention=3)
