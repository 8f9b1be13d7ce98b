"""HTTP responses of the registry: OCI error bodies and streamed blobs."""

from __future__ import annotations

import os

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ember.registry.server.errors import ApiError

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_SEND_CHUNK = 1 << 20


def error_response(err: ApiError) -> Response:
    headers = dict(API_VERSION)
    headers.update(err.headers)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class BlobResponse(Response):
    """A blob (or one range of it) streamed from disk in large chunks.

    Reads with pread straight from the page cache on the event loop: a blob in
    the registry is immutable and local, and one 1 MiB read per send beats
    Starlette's FileResponse (a thread hop per 64 KiB; uvicorn offers no
    ``pathsend``) by about 2x: 1.0-1.4 GB/s against 0.5-0.7 GB/s for a 51 MB blob
    with ``wrk -c32`` on this 2-core machine.
    """

    def __init__(
        self, path: str, size: int, span: tuple[int, int] | None, headers: dict[str, str]
    ) -> None:
        self.path = path
        self.start, self.end = span if span is not None else (0, size - 1)
        self.status_code = 206 if span is not None else 200
        self.background = None
        if span is not None:
            headers["Content-Range"] = f"bytes {self.start}-{self.end}/{size}"
        headers["Content-Length"] = str(self.end - self.start + 1)
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            # unlinked by GC after the link check: the same answer as no link
            err = ApiError("BLOB_UNKNOWN", "blob is not available")
            await error_response(err)(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pos, end = self.start, self.end + 1
            while pos < end:
                chunk = os.pread(fd, min(_SEND_CHUNK, end - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
            if pos < end or self.start == end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)
