"""The ember CLI: one module per command group; thin: parse, call, print."""
