"""Several orchestrator replicas as one target: which address a client uses now, and the next one.

A target is what the SDK's callers already pass: `"host:port"`. Several replicas are given as a list
(`["10.0.0.1:50051", "10.0.0.2:50051"]`) or the same comma-separated (`"a:50051,b:50051"`, which is
also what `ORCHESTRATOR_TARGET` / `--target` take). A target grpc resolves to several addresses by
itself (`dns:///orchestrator.ns.svc:50051`, a Kubernetes headless Service; `ipv4:1.2.3.4:50051,
1.2.3.5:50051`) stays one entry: its channel connects to one of the addresses, chosen at random,
and tries the others when that connection fails (pick_first with a shuffled address list, see
`ConnectionOptions`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

# grpc's own multi-address syntax (`ipv4:a:1,b:2`) also uses commas: such a target is not split.
_ADDRESS_LIST_SCHEMES = ("ipv4:", "ipv6:")


def parse_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """The targets in `target`: a comma-separated string or a sequence of them, blanks dropped."""
    items = [target] if isinstance(target, str) else list(target)
    parsed: list[str] = []
    for item in items:
        if item.strip().startswith(_ADDRESS_LIST_SCHEMES):
            parsed.append(item.strip())
            continue
        parsed.extend(part.strip() for part in item.split(",") if part.strip())
    if not parsed:
        raise ValueError("no orchestrator target given (expected 'host:port' or a comma-separated list)")
    return tuple(dict.fromkeys(parsed))  # a repeated address would only be tried twice in a row


def resolves_to_several(target: str) -> bool:
    """Whether grpc may resolve `target` to several addresses (of as many replicas)."""
    return target.startswith(("dns:", *_ADDRESS_LIST_SCHEMES))


class Targets:
    """The replicas a client may use and the one it uses now.

    A client starts at a randomly chosen entry, so a fleet configured with the same list spreads
    over the replicas instead of all landing on the first, and `advance()` moves on in list order,
    so the replica that just failed is the last one tried again.
    """

    def __init__(self, target: str | Sequence[str], *, random: Callable[[], float] = random.random) -> None:
        self.all = parse_targets(target)
        self._index = int(random() * len(self.all)) % len(self.all)
        self._override: str | None = None

    @property
    def current(self) -> str:
        return self._override or self.all[self._index]

    @property
    def several(self) -> bool:
        return len(self.all) > 1

    def advance(self) -> str:
        """Move on to the next replica (the same one when there is only one); returns it."""
        if self._override is not None:
            self._override = None  # the address a server pointed to was tried; back to the list
        else:
            self._index = (self._index + 1) % len(self.all)
        return self.current

    def redirect(self, address: str) -> None:
        """Use `address` (a server's reconnect request named it) for the next attempt."""
        if address in self.all:
            self._index = self.all.index(address)
            self._override = None
        else:
            self._override = address

    def __str__(self) -> str:
        return ",".join(self.all)


__all__ = ["Targets", "parse_targets", "resolves_to_several"]
