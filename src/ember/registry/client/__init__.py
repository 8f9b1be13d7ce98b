"""The registry pull client: auth flows, manifests, verified resumable blob downloads.

Import the submodules (``client``, ``credentials``, ``auth``) directly: this
package stays empty so that reading credentials does not import httpx.
"""

import sys

# httpx imports its optional command-line client (rich, pygments, click) whenever
# those happen to be installed, as they are with ember; ember never uses it, and
# that import is ~60 ms of every pulling command's start-up.  A None entry in
# sys.modules makes it fail the way httpx expects when that extra is missing.
# (Here, in the package, so that it precedes every ``import httpx`` of the client.)
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
