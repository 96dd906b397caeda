from __future__ import annotations

from services.inference.stopping import StopMatcher


def _run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = ""
    for delta in deltas:
        result = matcher.feed(delta)
        out += result.text
        if result.stopped:
            return out, True
    return out + matcher.flush(), False


def test_stop_inside_one_delta_cuts_before_it() -> None:
    assert _run(["END"], ["abcENDxyz"]) == ("abc", True)


def test_stop_split_across_deltas_is_never_emitted() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("hello </").text == "hello "
    result = matcher.feed("s> more")
    assert result == type(result)("", True)


def test_partial_match_that_fails_is_released() -> None:
    assert _run(["STOP"], ["ab", "ST", "OX", "yz"]) == ("abSTOXyz", False)


def test_held_text_is_flushed_when_generation_ends() -> None:
    assert _run(["STOP"], ["abcST"]) == ("abcST", False)


def test_earliest_of_several_stops_wins() -> None:
    assert _run(["zz", "b"], ["aabzz"]) == ("aa", True)


def test_no_stops_passes_text_through() -> None:
    assert _run([], ["a", "b"]) == ("ab", False)
    assert _run([""], ["a"]) == ("a", False)
