"""ember: run OCI images as micro-VMs."""

__version__ = "0.1.0"
