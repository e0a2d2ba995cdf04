"""Label selectors: the Kubernetes syntax, parsed once and matched many times."""

from __future__ import annotations

import pytest

from orchestrator_server.errors import InvalidArgument
from orchestrator_server.selectors import EVERYTHING, Requirement, parse_selector

LABELS = {"region": "eu", "tier": "gold", "example.com/zone": "a", "empty": ""}

MATCHES: list[tuple[str, bool]] = [
    ("", True),
    ("   ", True),
    ("region=eu", True),
    ("region==eu", True),
    ("region = eu", True),
    ("region=us", False),
    ("region!=us", True),
    ("region!=eu", False),
    ("missing!=x", True),  # an absent key is "not equal"
    ("missing=x", False),
    ("region in (eu,us)", True),
    ("region in ( us , eu )", True),
    ("region in (us)", False),
    ("region notin (us, ap)", True),
    ("region notin (eu)", False),
    ("missing notin (x)", True),
    ("missing in (x)", False),
    ("tier", True),
    ("missing", False),
    ("!missing", True),
    ("! missing", True),
    ("!tier", False),
    ("example.com/zone=a", True),
    ("empty=", True),
    ("empty", True),
    ("region=eu,tier=gold", True),
    ("region=eu, tier=silver", False),
    ("region in (eu), tier notin (silver), !spot, example.com/zone", True),
]


@pytest.mark.parametrize(("text", "expected"), MATCHES)
def test_matches(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


def test_parse_structure() -> None:
    selector = parse_selector("a=1, b!=2, c in (x, y), d notin (z), e, !f")
    assert selector.requirements == (
        Requirement("a", "in", frozenset({"1"})),
        Requirement("b", "notin", frozenset({"2"})),
        Requirement("c", "in", frozenset({"x", "y"})),
        Requirement("d", "notin", frozenset({"z"})),
        Requirement("e", "exists"),
        Requirement("f", "!exists"),
    )
    assert parse_selector("") is EVERYTHING
    assert EVERYTHING.matches({})


BAD = [
    "=eu",
    "region in eu",
    "region=eu=x",
    "region in ()",
    "region in (a,,b)",
    "region in (a b)",
    "region=e u",
    "!",
    "a,,b",
    ",a",
    "-lead=x",
    "trail-=x",
    "a=" + "v" * 129,
    "k" * 129,
    "region in (eu",
    "region =~ eu",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_selectors_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_selector(text, "spec.label_selector")
    assert [field for field, _ in raised.value.violations] == ["spec.label_selector"]


def test_too_long_selector() -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_selector(",".join(f"key{n}" for n in range(1000)))
    assert raised.value.violations[0] == ("label_selector", "selector longer than 4096 characters")
