"""The image format library: pure logic, no I/O."""
