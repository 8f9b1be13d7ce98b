"""Volumes: ext4 block devices that outlive machines (docs/volumes.md)."""
