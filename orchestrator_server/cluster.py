"""Replicas: this process's membership in the cluster and its turn as leader.

Every `orchestrator serve` process sharing a store holds the lease `replica/<process_id>`, renewed
every `REPLICA_TTL`/3. The lease says the replica is alive and reaches the database: a replica that
cannot renew before its lease runs out stops serving sessions (it cannot tell whether what it holds
is still true) and serves again once a renewal succeeds. The replicas whose leases are live are the
cluster; an agent whose session owner is not among them is an orphan (see agents/projection.py).

One lease, `leader`, names the replica that acts on what must happen once for the cluster (etcd's
"only the primary lessor expires leases"): timeouts of tasks, failover after the grace, the expiry
of orphaned agents. Every replica keeps its timers armed from its projections; only the leader acts
when they fire, and `leader` is false the moment this process can no longer be sure it holds the
lease (measured on the loop's clock from before the renewal was asked for), so a demoted leader
stops at once. Conditional commits make a double action harmless; the lease makes it rare. A new
leader is told (`on_change`) so it can act on what fell due while nobody led.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import Gauge

from orchestrator_server.config import Config
from orchestrator_server.store import Store

log = logging.getLogger(__name__)

REPLICA_PREFIX = "replica/"
LEADER_LEASE = "leader"

REPLICAS = Gauge("orchestrator_replicas", "Replicas whose membership lease is live, as this one last saw.")
LEADER = Gauge("orchestrator_replica_leader", "1 while this replica holds the leader lease.")
SERVING = Gauge(
    "orchestrator_replica_serving", "1 while this replica's membership lease is live (it serves sessions)."
)


class Cluster:
    """This replica's view of the cluster: whether it may serve, whether it leads, who is alive."""

    def __init__(self, config: Config, store: Store) -> None:
        self.process_id = config.process_id
        self._ttl = config.replica_ttl
        self._store = store
        # Loop times until which this replica surely holds its membership and the leader lease.
        self._member_until = 0.0
        self._leader_until = 0.0
        #: The leader lease's term while this replica holds it (fences work of older terms).
        self.term = 0
        #: Process ids of the replicas with a live membership lease (this one included while it has one).
        self.replicas: frozenset[str] = frozenset({self.process_id})
        self._serving = True
        self._task: asyncio.Task[None] | None = None
        self._lapse_timer: asyncio.TimerHandle | None = None
        #: Called after serving, leading or the set of replicas changed (read the properties).
        self.on_change: Callable[[], None] = lambda: None

    @property
    def serving(self) -> bool:
        """This replica's membership lease is live: it may serve sessions and act on its state."""
        return self._serving

    @property
    def leader(self) -> bool:
        """This replica holds the leader lease now (false as soon as that is not certain)."""
        return self._leader_until > asyncio.get_running_loop().time()

    def alive(self, process_id: str) -> bool:
        return process_id in self.replicas

    async def start(self) -> None:
        """Takes the membership lease (and the leader lease if it is free) before serving."""
        await self._renew()
        self._task = asyncio.get_running_loop().create_task(self._run_later())

    async def stop(self) -> None:
        """Hands both leases back, so the others need not wait for them to expire."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
        self._leader_until = 0.0
        with contextlib.suppress(Exception):  # the store may be gone; the leases then expire
            await asyncio.wait_for(self._store.release_lease(LEADER_LEASE, self.process_id), self._ttl)
            await asyncio.wait_for(
                self._store.release_lease(REPLICA_PREFIX + self.process_id, self.process_id), self._ttl
            )

    async def _run_later(self) -> None:
        await asyncio.sleep(self._ttl / 3)
        await self._run()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Renewals start every third of the TTL however long the last one took, so a slow
            # database shortens what is left of the lease, never the number of tries.
            started = loop.time()
            try:
                # A renewal that hangs (a frozen database, a dropped network) is given up after a
                # TTL: the lease has lapsed by then anyway (`_lapsed`).
                await asyncio.wait_for(self._renew(), self._ttl)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the lease lapses by itself; say why
                log.warning("replica %s could not renew its leases: %r", self.process_id, error)
            await asyncio.sleep(max(0.0, started + self._ttl / 3 - loop.time()))

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        asked = loop.time()  # the store's expiry counts from a moment after this
        member = await self._store.acquire_lease(REPLICA_PREFIX + self.process_id, self.process_id, self._ttl)
        if member is None:
            raise RuntimeError(f"another process holds the membership lease of {self.process_id}")
        self._member_until = asked + self._ttl
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
        self._lapse_timer = loop.call_at(self._member_until, self._lapsed)
        changed = not self._serving
        if changed:
            log.warning("replica %s renewed its membership: serving again", self.process_id)
        self._serving = True
        # Leadership and the list of replicas are asked for together (one round trip less).
        leader, live = await asyncio.gather(
            self._store.acquire_lease(LEADER_LEASE, self.process_id, self._ttl),
            self._store.live_leases(REPLICA_PREFIX),
        )
        if leader is not None:
            if self._leader_until <= asked:
                # Not surely leading until now (promoted, or a renewal came late): what fell due
                # meanwhile is looked at again.
                log.info("replica %s leads the cluster (term %d)", self.process_id, leader.term)
                changed = True
            self._leader_until = asked + self._ttl
            self.term = leader.term
        else:
            changed = changed or self._leader_until > asked
            self._leader_until = 0.0
        replicas = frozenset(lease.holder for lease in live)
        if replicas != self.replicas:
            joined, left = sorted(replicas - self.replicas), sorted(self.replicas - replicas)
            log.info("replicas now %s (joined %s, gone %s)", sorted(replicas), joined, left)
            self.replicas = replicas
            changed = True
        self._publish()
        if changed:
            self.on_change()

    def _lapsed(self) -> None:
        """The membership lease ran out before a renewal came back: stop acting on stale state.

        Only when another replica is alive (as last seen) to take the agents over: a replica that
        is alone (one process on SQLite, or the last one standing) would only send its agents back
        to itself, so it keeps serving; leadership lapses by itself either way (`leader`)."""
        self._lapse_timer = None
        if asyncio.get_running_loop().time() < self._member_until or not self._serving:
            return
        if self.replicas <= {self.process_id}:
            log.warning(
                "replica %s has not renewed its membership within REPLICA_TTL %g s; no other replica "
                "is alive to take its sessions, so it keeps serving them",
                self.process_id,
                self._ttl,
            )
            return
        log.error(
            "replica %s lost its membership lease (no renewal within REPLICA_TTL %g s): "
            "not serving sessions until the database answers again",
            self.process_id,
            self._ttl,
        )
        self._serving = False
        self._leader_until = 0.0
        self._publish()
        self.on_change()

    def _publish(self) -> None:
        REPLICAS.set(len(self.replicas))
        LEADER.set(1 if self.leader else 0)
        SERVING.set(1 if self._serving else 0)
