"""Errors of the registry client: one line each, saying what to do."""

from __future__ import annotations

from ember.errors import EmberError, NotFound


class RegistryError(EmberError):
    pass


class RegistryUnreachable(RegistryError):
    pass


class ProxyConfigError(RegistryError):
    """A proxy setting (``HTTPS_PROXY`` and the like) ember cannot use: the user's to
    fix, so never retried nor reported as an unreachable registry."""


class RateLimited(RegistryError):
    """The registry kept answering 429 (too many requests), or asked for a longer wait
    than ember makes: a matter of time, not of reachability."""


class AuthenticationFailed(RegistryError):
    pass


class ManifestUnknown(NotFound, RegistryError):
    pass


class BlobUnknown(NotFound, RegistryError):
    pass


class BlobCorrupt(RegistryError):
    """The registry served bytes that do not match the descriptor."""


class RegistryProtocolError(RegistryError):
    """The registry answered something the distribution spec does not allow."""


class CredentialsError(RegistryError):
    pass


class DamagedCredentials(CredentialsError):
    """A credentials file whose content cannot be used (not JSON, too large, not a
    regular file): what a login may move aside, unlike a file it could not open."""
