"""VM assembly: run configs, the guest kernel, the initramfs (and vmm/ backends)."""
