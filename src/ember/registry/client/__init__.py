"""The registry pull client: auth flows, manifests, verified resumable blob downloads."""

from ember.registry.client.client import RegistryClient, uses_plain_http
from ember.registry.client.credentials import CredentialStore

__all__ = ["CredentialStore", "RegistryClient", "uses_plain_http"]
