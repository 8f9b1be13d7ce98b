"""The lifecycle of one machine: create, start (through a monitor), stop, kill, remove.

State lives on disk under ``$EMBER_HOME/machines/<id>/`` (docs/machines.md), so any
ember process can find, inspect and control a machine another one started.
"""
