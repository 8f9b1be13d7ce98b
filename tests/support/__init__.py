"""Shared test infrastructure: real registries, test images, tree comparison.

Owned by the "fixtures" helper; see README.md in this directory.
"""
