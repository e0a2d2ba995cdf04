"""Agent credentials: issued at registration, stored only as hashes, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from orchestrator_server.errors import Unauthenticated

#: Marks the stored hash of a credential issued to a caller without a credential (authentication
#: off), so that it stops working once keys are configured (`verify(authenticated_only=True)`).
OPEN_TOKEN_PREFIX = "open:"


class OpenCredential(Unauthenticated):
    """The credential is right, but was issued while authentication was off."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(agent_id: str, *, authenticated: bool) -> tuple[str, str]:
    """A fresh credential for `agent_id` and the hash to store for it.

    `<agent_id>.<secret>`: the interceptor finds the agent from the credential alone (auth.py)."""
    token = f"{agent_id}.{secrets.token_urlsafe(32)}"
    return token, ("" if authenticated else OPEN_TOKEN_PREFIX) + hash_token(token)


def verify(agent_id: str, stored_hash: str, token: str, *, authenticated_only: bool = False) -> None:
    """Raises Unauthenticated unless `token` is the credential stored as `stored_hash` (and
    OpenCredential for one issued without authentication when `authenticated_only`)."""
    stored = stored_hash.removeprefix(OPEN_TOKEN_PREFIX)
    if not token or not hmac.compare_digest(stored, hash_token(token)):
        raise Unauthenticated(f"invalid credential for agent {agent_id}")
    if authenticated_only and stored != stored_hash:
        raise OpenCredential(
            f"the credential of agent {agent_id} was issued while authentication was off; "
            "register again with an agent key"
        )
