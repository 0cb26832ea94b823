"""The load controller, driven by a fake clock and synthetic arrival and service rates.

No wall clock anywhere: time is a number the test advances, work is what the test says
a batch did, and the queue is a number the test sets.
"""

from __future__ import annotations

import math

import pytest

from app.engine.adapt import CostModel, Ladder, LoadController, OperatingPoint

# A ladder like the sentiment model's: accuracy falls as mean depth does.
POINTS = (
    OperatingPoint((0.87,) * 5 + (0.0,), 0.830, 3.0, 0.53),
    OperatingPoint((0.83,) * 5 + (0.0,), 0.824, 2.6, 0.47),
    OperatingPoint((0.79,) * 5 + (0.0,), 0.819, 2.3, 0.42),
    OperatingPoint((0.74,) * 5 + (0.0,), 0.808, 2.0, 0.37),
    OperatingPoint((0.0,) * 6, 0.757, 1.0, 0.21),
)
LADDER = Ladder(POINTS, fixed_cost=0.5)


# The fractions these tests were worked out with (the mechanics, not the defaults).
FRACTIONS = {"shallower_at": 0.7, "admit_at": 0.8, "deeper_at": 0.4}


def controller(max_drop: float = 0.02, target_s: float = 0.2, **kw: float) -> LoadController:
    kw = {**FRACTIONS, **kw}
    c = LoadController(LADDER, target_s=target_s, max_drop=max_drop, **kw)  # type: ignore[arg-type]
    # One measured batch: 10 inputs that ran 30 layers in all, 35 units, in 35 ms:
    # a worker does 1 ms per layer unit.
    c.observe(c.work(10, 30), 0.035)
    return c


def test_floor_is_the_last_point_within_the_drop() -> None:
    assert LADDER.shallowest(0.0) == 0
    assert LADDER.shallowest(0.006) == 1  # 0.830 - 0.824 = 0.006: exactly at the bound counts
    assert LADDER.shallowest(0.02) == 2  # 0.819 is within 0.02 of 0.830; 0.808 is not
    assert LADDER.shallowest(0.1) == 4


def test_floor_stops_at_the_first_point_past_the_drop() -> None:
    # A point further down that happens to measure better does not open the way past
    # the one that lost too much.
    bumpy = Ladder(
        (
            OperatingPoint((0.9, 0.0), 0.80, 2.0),
            OperatingPoint((0.8, 0.0), 0.75, 1.6),
            OperatingPoint((0.7, 0.0), 0.79, 1.3),
        )
    )
    assert bumpy.shallowest(0.02) == 0


def test_a_ladder_must_not_grow_deeper() -> None:
    with pytest.raises(ValueError, match="must not grow"):
        Ladder((POINTS[1], POINTS[0]))


def test_expected_latency_is_work_times_measured_rate_over_workers() -> None:
    c = controller()
    assert c.costs.fitted == pytest.approx((0.0, 0.001))
    # 100 inputs at point 0 cost 100 x (0.5 + 3.0) units x 1 ms = 350 ms on one worker.
    assert c.expected_latency(100) == pytest.approx(0.35)
    assert c.expected_latency(100, 4) == pytest.approx(0.15)  # first exit: 1.5 units each
    # Two workers share the 68 inputs ahead; the last input's batch of 32 runs on one.
    two = controller(workers=2)
    assert two.expected_latency(100) == pytest.approx(68 * 0.0035 / 2 + 32 * 0.0035)
    assert two.expected_latency(10) == pytest.approx(10 * 0.0035)


def test_the_cost_model_separates_per_batch_and_per_work_time() -> None:
    # Batches of 1 and of 32 inputs at 3.5 units each: 4 ms per batch + 0.5 ms per unit.
    c = controller(max_drop=0.1, batch_size=32)
    c.costs = CostModel()
    for n in (1, 32, 1, 1, 32, 8):
        c.observe(n * 3.5, 0.004 + 0.0005 * n * 3.5)
    a, b = c.costs.fitted  # type: ignore[misc]
    assert (a, b) == (pytest.approx(0.004), pytest.approx(0.0005))
    # 100 inputs at point 0: 4 batches of up to 32, 4 x 4 ms + 100 x 3.5 x 0.5 ms.
    assert c.expected_latency(100) == pytest.approx(0.016 + 0.175)


def test_lone_requests_alone_do_not_make_a_burst_look_slow() -> None:
    # Only lone inputs seen since start-up: the fit keeps the start-up anchors' per-batch
    # time instead of charging it to every input of a burst.
    truth = (0.004, 0.0005)

    def seconds(n: int) -> float:
        return truth[0] + truth[1] * n * 3.5

    c = controller(max_drop=0.1, batch_size=32)
    c.costs = CostModel()
    c.costs.anchor([(3.5, seconds(1)), (32 * 3.5, seconds(32))])
    for _ in range(500):
        c.observe(3.5, seconds(1))
    assert c.costs.fitted == pytest.approx(truth)
    naive = 200 * seconds(1)  # every input a batch of its own: 0.35 s
    assert c.expected_latency(200) == pytest.approx(7 * 0.004 + 200 * 3.5 * 0.0005)
    assert c.expected_latency(200) < naive / 1.5


def test_nothing_measured_means_no_wait_and_no_refusal() -> None:
    c = LoadController(LADDER, target_s=0.2, max_drop=0.02)
    assert c.expected_latency(10_000) == 0.0
    assert c.refusal(10_000, 1, None) is None
    assert c.update(10_000, now=0.0) == 0


def test_moves_down_as_far_as_needed_but_never_past_the_floor() -> None:
    c = controller(max_drop=0.02)  # floor 2
    assert c.shallowest == 2
    # Each load held for seconds, far longer than the smoothing.
    # 38 inputs: 133 ms at point 0, under 70% of the 200 ms target: stay.
    assert c.update(38, now=0.0) == 0
    # 41 inputs: 143.5 ms at point 0 (> 140 ms), 127 ms at point 1: one step is enough.
    assert c.update(41, now=10.0) == 1
    # 60 inputs: 186 ms at point 1, 168 at point 2: still too long, but 2 is the floor.
    assert c.update(60, now=20.0) == 2


def test_a_moment_of_queue_does_not_move_it_a_sustained_one_does() -> None:
    c = controller(max_drop=0.1)  # smoothing over 0.25 s
    assert c.update(10, now=0.0) == 0
    # 100 inputs (350 ms at point 0) for 20 ms, then back to 10: no move.
    assert c.update(100, now=0.01) == 0
    assert c.update(100, now=0.02) == 0
    assert c.update(10, now=0.03) == 0
    # 100 inputs held: the smoothed load passes 140 ms worth within a few tenths.
    t = 0.03
    while c.point == 0:
        t += 0.01
        c.update(100, now=t)
        assert t < 0.5, "a sustained overload was not followed"
    assert c.point > 0


def test_comes_back_up_one_point_per_hold_after_the_queue_clears() -> None:
    c = controller(max_drop=0.1, hold_s=0.5)
    assert c.update(1000, now=0.0) == 4  # deep overload: straight to the floor
    # The queue empties. Each step up waits for a full hold with the point above clear.
    assert c.update(0, now=1.0) == 4  # clear from now
    assert c.update(0, now=1.4) == 4
    assert c.update(0, now=1.5) == 3
    assert c.update(0, now=1.9) == 3
    assert c.update(0, now=2.0) == 2
    assert c.update(0, now=2.5) == 1
    assert c.update(0, now=3.0) == 0
    assert c.next_check(3.0) is None  # at point 0 nothing is timed


def test_hysteresis_holds_the_point_between_the_two_fractions() -> None:
    c = controller(max_drop=0.1, hold_s=0.5)
    assert c.update(41, now=0.0) == 1  # 143.5 ms at point 0 > 140: down
    # 25 inputs: 87.5 ms at point 0, between deeper_at (80 ms) and shallower_at (140 ms): no
    # move, however long it lasts.
    for t in (1.0, 2.0, 5.0, 10.0):
        assert c.update(25, now=t) == 1
    # A dip under 80 ms that does not last a hold does not count either.
    assert c.update(10, now=10.1) == 1
    assert c.update(25, now=10.4) == 1
    assert c.update(10, now=10.5) == 1
    assert c.update(10, now=11.0) == 0


def test_a_drop_of_zero_or_no_target_never_moves() -> None:
    for c in (controller(max_drop=0.0), controller(target_s=0.0)):
        assert c.update(10_000, now=0.0) == 0
        assert c.next_check(0.0) is None


def test_refusal_uses_the_floor_and_the_budget() -> None:
    c = controller(max_drop=0.1)  # floor 4: 1.5 units, 1.5 ms per input
    # Admitted while the expected latency at the floor is within 80% of the budget: the
    # estimate is a typical latency, and the tail of the real ones runs above it.
    # 100 inputs at the floor: 150 ms, within 160 ms.
    assert c.refusal(99, 1, None) is None
    # 200 inputs: 300 ms at the floor, 140 ms past 160: refused, retry in 0.14 s.
    assert c.refusal(199, 1, None) == pytest.approx(0.14)
    # The request's own deadline counts instead of the target, both ways.
    assert c.refusal(199, 1, 0.5) is None
    assert c.refusal(99, 1, 0.1) == pytest.approx(0.07)
    # Less than a full batch ahead: admitted however long the request itself is
    # expected to take.
    assert c.refusal(0, 200, None) is None
    assert c.refusal(31, 200, None) is None
    assert c.refusal(32, 200, None) is not None
    # Without a target the controller refuses nothing.
    assert controller(target_s=0.0).refusal(10_000, 1, 0.001) is None


def test_service_rate_follows_the_recent_batches() -> None:
    c = controller(memory_s=1.0)
    for _ in range(200):  # the machine slows down: 2 ms per unit from now on
        c.observe(35.0, 0.070)
    assert c.costs.fitted == pytest.approx((0.0, 0.002), rel=1e-3)


def test_degraded_time_is_counted_below_point_0() -> None:
    c = controller(max_drop=0.1, hold_s=0.5)
    c.update(1000, now=10.0)
    c.update(1000, now=12.0)
    c.update(0, now=13.0)
    assert c.state(0)["degraded_s"] == pytest.approx(3.0)
    s = c.state(100)
    assert s["point"] == 4 and s["expected_accuracy"] == 0.757
    assert s["expected_wait_s"] == pytest.approx(0.15)


def test_next_check_times_the_way_back_up() -> None:
    c = controller(max_drop=0.1, hold_s=0.5)
    c.update(1000, now=0.0)
    assert c.next_check(0.0) == 0.5  # not clear yet: look again after a hold
    c.update(0, now=1.0)
    assert c.next_check(1.2) == pytest.approx(0.301)


def test_simulated_overload_serves_at_the_floor_and_refuses_the_rest() -> None:
    """Arrivals at three times the calibrated point's service rate, one worker.

    The controller must settle at the floor, which serves 2.3x point 0, refuse what it
    cannot serve in time, keep the expected latency within the target, and return to
    point 0 once the arrivals stop.
    """
    spw = 0.001  # seconds per layer unit
    c = LoadController(LADDER, target_s=0.2, max_drop=0.1, hold_s=0.5)
    rate = [1 / (LADDER.cost(k) * spw) for k in range(len(LADDER))]  # inputs/s per point
    per_step, dt = round(3 * rate[0] * 0.01), 0.01  # 9 requests every 10 ms
    queue, now = 0.0, 0.0
    admitted = refused = 0
    points = []
    while now < 10.0:
        for _ in range(per_step):
            if c.refusal(math.ceil(queue), 1, None) is None:
                queue += 1
                admitted += 1
            else:
                refused += 1
        c.update(math.ceil(queue), now)
        done = min(queue, dt * rate[c.point])
        c.observe(done * LADDER.cost(c.point), dt)
        queue -= done
        points.append(c.point)
        now += dt
    assert refused > 0
    assert set(points[100:]) == {4}  # from the first second on, at the floor
    assert c.expected_latency(math.ceil(queue)) <= 0.2
    assert admitted >= 0.95 * 10 * rate[4]  # served all the floor could serve
    # Arrivals stop: the queue drains, and the controller climbs back a point per hold.
    while now < 13.0:
        c.update(math.ceil(queue), now)
        queue -= min(queue, dt * rate[c.point])
        now += dt
    assert queue == 0 and c.point == 0


def test_with_no_queue_it_climbs_back_whatever_one_input_costs() -> None:
    # A per-batch time fitted under a burst's contention can exceed the climbing
    # threshold on its own: with nothing queued, that must not hold the point down.
    c = controller(max_drop=0.1, hold_s=0.5)
    c.costs = CostModel()
    c.observe(3.5, 0.100)  # one input took 100 ms: more than 0.4 x 200 ms by itself
    assert c.update(1000, now=0.0) == 4
    t = 0.0
    while c.point > 0:
        t += 0.1
        c.update(0, now=t)
        assert t < 10, "the point never came back with nothing queued"
    # And an idle service never moves down for one input's own cost.
    for k in range(20):
        assert c.update(0, now=t + k) == 0
