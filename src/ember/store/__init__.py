"""Host-side storage: the content store (blobs by digest) and the database layer."""
