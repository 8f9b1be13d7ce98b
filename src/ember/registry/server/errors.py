"""Errors of the registry server.

``ApiError`` is what a request handler raises to answer with an OCI error body
(``{"errors": [{"code", "message", "detail"}]}``); the codes are the ones the
distribution spec defines, each with its usual HTTP status.  ``RegistryError``
is for administration and start-up problems a user fixes (bad org name, no
such token, unreadable secret).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from ember.errors import EmberError, NotFound, UsageError

# code -> HTTP status (distribution-spec "Error Codes", plus Distribution's extras)
STATUS = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNAVAILABLE": 503,
    "RANGE_INVALID": 416,
    "PAGINATION_NUMBER_INVALID": 400,
    "TAG_INVALID": 400,
}


class RegistryError(EmberError):
    """A registry administration or configuration problem."""


class InvalidName(RegistryError, UsageError):
    pass


class OrgNotFound(RegistryError, NotFound):
    pass


class OrgExists(RegistryError, UsageError):
    pass


class TokenNotFound(RegistryError, NotFound):
    pass


class OrgLimitReached(RegistryError):
    """An organization has opened as many upload sessions in the last hour (or has as many
    repositories) as the server allows it; the request that wanted one more is refused
    and writes nothing."""

    def __init__(
        self, org: str, what: Literal["uploads", "repositories"], limit: int,
        *, retry_after: int | None = None,
    ) -> None:
        super().__init__(f"organization {org} has {limit} {what}, the most it may have")
        self.org = org
        self.what = what
        self.limit = limit
        #: seconds until the limit lets one more in at the latest, when time alone does
        self.retry_after = retry_after


class ApiError(Exception):
    """An HTTP answer in the OCI error format."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 400)
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return {"errors": [err]}


def method_not_allowed(method: str, allowed: Iterable[str]) -> ApiError:
    """405 for ``method`` on a resource that supports ``allowed``, which the response's
    Allow header must list (RFC 9110 15.5.6)."""
    methods = ", ".join(sorted(allowed))
    return ApiError(
        "UNSUPPORTED", f"{method} is not supported here (use {methods})", headers={"Allow": methods}
    )
