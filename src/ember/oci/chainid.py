"""ChainIDs (image-spec config.md): the identity of a stack of layers.

ChainID(L0) = DiffID(L0); ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln)).
"""

from __future__ import annotations

import hashlib

from ember.oci.digest import Digest


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append(Digest("sha256", hashlib.sha256(text).hexdigest()))
    return out
