"""Machine networking: addresses (ipam), published ports, nftables rules, TAP devices.

Pure parts: ``ipam`` (allocation arithmetic), ``ports`` (``-p`` parsing),
``nftables`` (ruleset rendering).  I/O parts: ``tap`` (ip link), ``manager``
(persisted allocations under a lock, applying rules).  See docs/networking.md.
"""
