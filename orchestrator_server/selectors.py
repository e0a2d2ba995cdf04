"""Label selectors, in the Kubernetes syntax operators already know.

    region=eu, tier!=free, zone in (a, b), env notin (dev), gpu, !spot

Requirements are ANDed. Parse once, match many times.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator_server.errors import InvalidArgument

_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?"
_VALUE = r"[A-Za-z0-9._-]{0,128}"
_REQUIREMENT = re.compile(
    rf"""\s*(?:
        (?P<not_exists>!\s*(?P<nkey>{_KEY}))
      | (?P<set_key>{_KEY})\s+(?P<set_op>in|notin)\s*\((?P<values>[^)]*)\)
      | (?P<eq_key>{_KEY})\s*(?P<eq_op>==|=|!=)\s*(?P<eq_value>{_VALUE})
      | (?P<exists>{_KEY})
    )\s*(?:,|$)""",
    re.VERBOSE,
)
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


EVERYTHING = Selector()


def parse_selector(text: str, field: str = "label_selector") -> Selector:
    """Parses `text`; raises InvalidArgument naming `field` when it is not a valid selector."""
    text = text.strip()
    if not text:
        return EVERYTHING
    if len(text) > 4096:
        raise InvalidArgument.field(field, "selector longer than 4096 characters")
    requirements: list[Requirement] = []
    position = 0
    while position < len(text):
        match = _REQUIREMENT.match(text, position)
        if match is None or match.end() == position:
            raise InvalidArgument.field(field, f"cannot parse selector at {text[position:]!r}")
        requirements.append(_requirement(match, field))
        position = match.end()
    return Selector(tuple(requirements))


def _requirement(match: re.Match[str], field: str) -> Requirement:
    if match["not_exists"]:
        return Requirement(match["nkey"], "!exists")
    if match["set_key"]:
        values = [value.strip() for value in match["values"].split(",")]
        if not values or any(not _VALUE_ONLY.match(value) or not value for value in values):
            raise InvalidArgument.field(field, f"bad value list for {match['set_key']!r}")
        return Requirement(match["set_key"], match["set_op"], frozenset(values))
    if match["eq_key"]:
        operator = "notin" if match["eq_op"] == "!=" else "in"
        return Requirement(match["eq_key"], operator, frozenset([match["eq_value"]]))
    return Requirement(match["exists"], "exists")
