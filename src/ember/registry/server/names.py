"""Organization, repository and tag names, and the tenancy rewrite (pure).

Every repository is stored under its organization: the name a client sends
(``web``, ``team/web``) becomes ``<org>/web``, ``<org>/team/web`` before any
lookup or authorization.  The rewrite always prefixes, even when the client's
first component happens to equal the org name, so a client can never address
another organization's namespace: there is no name it could send that maps
outside its own prefix.
"""

from __future__ import annotations

import re

from ember.registry.server.errors import InvalidName

# distribution-spec: path components of lowercase alphanumerics joined by separators
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_ORG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

#: the longest repository name a client may send (the org prefix comes on top)
MAX_REPO_NAME = 200
MAX_ORG_NAME = 63


def valid_repo_name(name: str) -> bool:
    return len(name) <= MAX_REPO_NAME and _REPO.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def check_org_name(name: str) -> str:
    if len(name) > MAX_ORG_NAME or not _ORG.fullmatch(name):
        raise InvalidName(
            f"invalid organization name {name[:80]!r}: use lowercase letters, digits and single dashes"
            f" (at most {MAX_ORG_NAME} characters)"
        )
    return name


#: characters of a token's label (the column's size: PostgreSQL refuses longer ones)
MAX_TOKEN_LABEL = 200


def check_token_label(label: str) -> str:
    """A token's label as given, if it is printable UTF-8 text of at most
    ``MAX_TOKEN_LABEL`` characters (``token ls`` prints it to terminals)."""
    try:
        label.encode()
    except UnicodeEncodeError:
        raise InvalidName(f"token label {label!r:.80} is not valid UTF-8") from None
    if len(label) > MAX_TOKEN_LABEL or not label.isprintable():
        raise InvalidName(
            f"invalid token label {label[:80]!r}: printable text of at most {MAX_TOKEN_LABEL} characters"
        )
    return label


def qualify(org: str, name: str) -> str:
    """The stored name of the client's repository ``name`` inside ``org``."""
    return f"{org}/{name}"


def unqualify(org: str, full: str) -> str:
    """The name the client sees for a stored repository of ``org``."""
    prefix = f"{org}/"
    if not full.startswith(prefix):
        raise ValueError(f"repository {full!r} is not in organization {org!r}")
    return full[len(prefix) :]
