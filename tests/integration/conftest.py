"""The machine VM tests' fixtures (``ember`` on the module's ``vm_home``, ``busybox``)."""

from tests.machines.conftest import busybox, ember

__all__ = ["busybox", "ember"]
