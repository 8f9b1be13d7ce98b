"""Images from a registry: resolve tag -> (index ->) manifest, then fetch blobs."""

from __future__ import annotations

from collections.abc import Callable

from ember.images.cancel import Cancellation
from ember.images.sources import Resolved
from ember.oci.manifest import Descriptor, ImageIndex, parse_manifest
from ember.oci.platform import Platform, select_manifest
from ember.oci.reference import Reference
from ember.registry.client.client import RegistryClient
from ember.registry.client.credentials import Credentials
from ember.registry.client.errors import BlobCorrupt
from ember.store.content import ContentStore, WriteObserver

_MAX_NESTING = 4


class RegistrySource:
    def __init__(
        self, ref: Reference, *, plain_http: bool, credentials: Credentials | None
    ) -> None:
        self.ref = ref
        self.name = str(ref)
        self.client = RegistryClient(
            ref.registry, api_host=ref.api_host, plain_http=plain_http, credentials=credentials
        )

    def close(self) -> None:
        self.client.close()

    def resolve(self, platform: Platform | None) -> Resolved:
        repo = self.ref.repository
        fetched = self.client.get_manifest(repo, self.ref.target, display=self.name)
        index_digest = None
        for _ in range(_MAX_NESTING):
            parsed = parse_manifest(fetched.data, fetched.media_type)
            if not isinstance(parsed, ImageIndex):
                return Resolved(fetched.data, parsed.media_type, fetched.digest, index_digest)
            index_digest = fetched.digest
            desc = select_manifest(parsed, platform)
            fetched = self.client.get_manifest(
                repo, str(desc.digest), display=f"{self.name} ({desc.digest.short})"
            )
            if len(fetched.data) != desc.size:
                raise BlobCorrupt(
                    f"registry {self.ref.registry} served {len(fetched.data)} bytes for manifest "
                    f"{desc.digest.short}, the index declares {desc.size}"
                )
        raise BlobCorrupt(f"{self.name}: indexes nested too deeply")

    def fetch(
        self,
        desc: Descriptor,
        store: ContentStore,
        progress: Callable[[int], None] | None,
        cancel: Cancellation | None = None,
        *,
        observer: WriteObserver | None = None,
    ) -> None:
        self.client.fetch_blob(
            self.ref.repository, desc, store, progress, cancel=cancel, observer=observer
        )
