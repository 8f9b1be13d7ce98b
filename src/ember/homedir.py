"""Where ``$EMBER_HOME`` is, with nothing but ``os``.

Kept apart from ``ember.home`` (whose dataclasses cost ~30 ms to import) so that
the ``ember`` entry point can find the agent's socket before importing anything.
"""

from __future__ import annotations

import os


def default_home_dir() -> str:
    """``$EMBER_HOME``; else ``/var/lib/ember`` for root, ``~/.local/share/ember`` otherwise."""
    env = os.environ.get("EMBER_HOME")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    if os.geteuid() == 0:
        return "/var/lib/ember"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "ember")
