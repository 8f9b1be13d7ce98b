"""Which API tokens were revoked lately, as one server process knows it.

A registry token (JWT) is checked by its signature alone, so without this list one
issued before its API token was revoked would stay good until it expires (up to
``TOKEN_TTL``).  Every ``REFRESH_S`` the process asks the database (one query, run by
the caller) for the tokens revoked within the last ``TOKEN_TTL`` plus a margin for
clocks that differ between hosts: older revocations cannot matter, since every
registry token they could concern has expired.  Both registry tokens (their ``sub``)
and API tokens used directly are then refused within ``REFRESH_S`` of a revocation,
whichever server process they reach.  A token's expiry counts as its revocation
(``RegistryMetadata.revoked_since``), so what was made from it ends with it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ember.registry.server.tokens import TOKEN_TTL

#: how long a list is trusted before the database is asked again
REFRESH_S = 5.0
#: clocks of the hosts that revoke and that serve may differ by this much
CLOCK_MARGIN_S = 60.0


class Revocations:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock, self._wall = clock, wall
        self._ids: frozenset[str] = frozenset()
        self._fresh_until: float | None = None

    def due(self) -> bool:
        """Whether the list must be fetched again before it is used."""
        return self._fresh_until is None or self._clock() >= self._fresh_until

    def since(self) -> float:
        """The wall-clock time from which revocations are asked for."""
        return self._wall() - TOKEN_TTL - CLOCK_MARGIN_S

    def refresh(self, fetch: Callable[[float], Iterable[str]]) -> None:
        """Replace the list by ``fetch(since)``: the ids revoked since then."""
        started = self._clock()
        self._ids = frozenset(fetch(self.since()))
        self._fresh_until = started + REFRESH_S

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._ids
