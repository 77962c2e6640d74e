"""``runner.round_robin``: interleaved timing where every call takes every place in a round equally often."""

import collections

from ptqd.engines.runner import round_robin


def test_every_call_takes_every_place_in_the_round_equally_often():
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = round_robin(calls, runs=6, warmup=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 9 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    timed = rounds[3:]  # after warm-up: each name first, second and third twice
    places = collections.Counter((k, r.index(k)) for r in timed for k in r)
    assert set(places.values()) == {2} and len(places) == 9, places
    # and who runs before whom changes: "a" follows "c" in some rounds and leads in others
    assert {r[0] for r in timed} == {"a", "b", "c"}
