"""The pass-cost line the batch planner uses to weigh padding against an extra pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bge_trio.memory.cost import CostModel
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.pace import PassPace


def test_fits_the_line_through_observed_passes() -> None:
    pace = PassPace()
    for tokens in [16, 64, 256, 1024, 32, 512, 128, 8, 700, 48]:
        pace.observe(tokens, 0.004 + 0.0002 * tokens)
    line = pace.line()
    assert line is not None
    assert line[0] == pytest.approx(0.004, rel=1e-6)
    assert line[1] == pytest.approx(0.0002, rel=1e-6)
    assert pace.overhead_tokens == pytest.approx(20.0, rel=1e-6)


def test_answers_the_prior_until_it_can_fit() -> None:
    pace = PassPace(prior_tokens=32.0)
    for tokens in [16, 512, 64]:
        pace.observe(tokens, 0.004 + 0.0002 * tokens)
    assert pace.line() is None  # too few passes
    assert pace.overhead_tokens == 32.0
    same = PassPace(prior_tokens=32.0)
    for _ in range(20):
        same.observe(256, 0.05)  # no spread of sizes: no slope to see
    assert same.line() is None
    assert same.overhead_tokens == 32.0


def test_ignores_nonsense_and_follows_recent_passes() -> None:
    pace = PassPace()
    pace.observe(0, 1.0)
    pace.observe(100, float("nan"))
    pace.observe(100, -1.0)
    assert pace.passes == 0
    for _ in range(30):
        for tokens in (16, 256, 1024):
            pace.observe(tokens, 0.010 + 0.0001 * tokens)  # old machine: 100 tokens
    for _ in range(300):
        for tokens in (16, 256, 1024):
            pace.observe(tokens, 0.002 + 0.0001 * tokens)  # now: 20 tokens
    assert pace.overhead_tokens == pytest.approx(20.0, rel=0.01)


def test_a_slope_that_is_not_positive_is_not_a_line() -> None:
    pace = PassPace(prior_tokens=32.0)
    for tokens in [16, 64, 256, 1024, 32, 512, 128, 8]:
        pace.observe(tokens, 0.5 - 0.0001 * tokens)
    assert pace.line() is None
    assert pace.overhead_tokens == 32.0


ROOMY = BatchPolicy(CostModel(1.0, 0.0), 1e9)


def test_a_long_text_does_not_carry_short_ones_padded() -> None:
    lengths = [300, 12, 14, 290, 11]  # oldest first
    assert sorted(plan_batch(lengths, ROOMY, overhead_tokens=20)) == [0, 3]
    # the next plan, without those two, groups the short queries together
    assert sorted(plan_batch([12, 14, 11], ROOMY, overhead_tokens=20)) == [0, 1, 2]
    # when passes are expensive (or unknown), everything that fits rides along
    assert sorted(plan_batch(lengths, ROOMY)) == [0, 1, 2, 3, 4]


def test_a_short_anchor_does_not_pad_itself_to_a_passage() -> None:
    assert plan_batch([12, 150], ROOMY, overhead_tokens=40) == [0]
    assert sorted(plan_batch([12, 40], ROOMY, overhead_tokens=40)) == [0, 1]


@given(
    lengths=st.lists(st.integers(1, 512), min_size=1, max_size=60),
    overhead=st.floats(0, 600),
)
def test_each_join_adds_at_most_the_overhead_in_padding(
    lengths: list[int], overhead: float
) -> None:
    chosen = plan_batch(lengths, ROOMY, overhead_tokens=overhead)
    assert 0 in chosen
    # each join adds at most `overhead` padding, so the batch holds at most one
    # overhead of padding per text that joined the oldest
    width = max(lengths[i] for i in chosen)
    padding = sum(width - lengths[i] for i in chosen)
    assert padding <= overhead * (len(chosen) - 1) + 1e-9


def test_attention_makes_long_texts_cost_more_per_token_and_the_curve_sees_it() -> None:
    pace = PassPace()
    shapes = [(32, 16), (8, 128), (4, 256), (1, 1024), (2, 2048), (1, 8000), (16, 64), (1, 4000)]
    for batch, seq in shapes:
        pace.observe(batch * seq, 0.005 + batch * seq * (2e-4 + 3e-8 * seq), seq=seq)
    curve = pace.curve()
    assert curve is not None
    assert curve[0] == pytest.approx(0.005, rel=1e-4)
    assert curve[1] == pytest.approx(2e-4, rel=1e-4)
    assert curve[2] == pytest.approx(3e-8, rel=1e-4)
    # an 8,000-token text costs 2.2x per token what a 256-token one does
    assert pace.predict(1, 8000) == pytest.approx(0.005 + 8000 * (2e-4 + 2.4e-4), rel=1e-4)
    linear = PassPace()
    for batch, seq in shapes:  # the same passes without their lengths: a line only
        linear.observe(batch * seq, 0.005 + batch * seq * (2e-4 + 3e-8 * seq))
    fitted = linear.curve()
    assert fitted is not None
    assert fitted[2] == 0.0


def test_a_seed_of_timed_passes_gives_an_estimate_before_any_pass_runs() -> None:
    pace = PassPace()
    assert pace.predict(1, 1000) is None
    shapes = [(2, 8192), (4, 2048), (16, 512), (2, 1024)]
    pace.seed((b, s, 0.01 + b * s * (1e-3 + 1e-6 * s)) for b, s in shapes)
    assert pace.predict(1, 1000) == pytest.approx(0.01 + 1000 * 2e-3, rel=1e-4)
    # a later seed starts afresh: twice as slow now, and nothing of the first remains
    pace.seed((b, s, 2 * (0.01 + b * s * (1e-3 + 1e-6 * s))) for b, s in shapes)
    assert pace.predict(1, 1000) == pytest.approx(2 * (0.01 + 1000 * 2e-3), rel=1e-4)
    pace.seed((b, s, 0.01 + b * s * (1e-3 + 1e-6 * s)) for b, s in shapes[:2])
    assert pace.predict(1, 1000) is None  # too few shapes to trust


def test_a_seed_of_three_shapes_is_enough_to_fit() -> None:
    """The probe's few timed passes (four shapes for a small model) give a curve at once."""

    def timed(shapes: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
        return [(b, s, 0.01 + b * s * (1e-3 + 1e-6 * s)) for b, s in shapes]

    two = PassPace()
    two.seed(timed([(2, 256), (64, 64)]))
    assert two.curve() is None  # two shapes cannot separate three terms
    three = PassPace()
    three.seed(timed([(2, 256), (64, 64), (256, 16)]))
    assert three.predict(1, 1000) == pytest.approx(0.01 + 1000 * 2e-3, rel=1e-4)


def test_a_fit_without_a_fixed_cost_falls_back_to_the_prior() -> None:
    pace = PassPace(prior_tokens=32.0)
    for tokens in [16, 64, 256, 1024, 32, 512, 128, 8]:
        pace.observe(tokens, 0.0002 * tokens - 0.001 if tokens > 8 else 0.0006)
    line = pace.line()
    assert line is not None
    assert line[0] == 0.0  # clamped: the passes show no fixed part
    assert pace.overhead_tokens == 32.0
