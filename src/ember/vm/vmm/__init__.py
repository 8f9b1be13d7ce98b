"""VMM backends: the interface (``base``) and QEMU's microvm machine (``qemu``).

The rest of ember talks to ``VMM``/``VM`` only; which hypervisor runs is a detail of
this package (Firecracker will be a second implementation of the same interface).
"""

from ember.vm.vmm.base import VM, VMM, Channels, Disk, Nic, VMExit, VMSpec

__all__ = ["VM", "VMM", "Channels", "Disk", "Nic", "VMExit", "VMSpec", "get_vmm"]


def get_vmm(name: str = "qemu") -> VMM:
    """The backend called ``name`` (only ``qemu`` exists today)."""
    from ember.vm.vmm.errors import VMMError

    if name == "qemu":
        from ember.vm.vmm.qemu import QemuMicrovm

        return QemuMicrovm()
    raise VMMError(f"unknown VMM backend {name!r} (known: qemu)")
