"""The host agent: a resident ember process that runs CLI commands without an interpreter start each.

``protocol`` is the wire format (pure), ``client`` the ``ember`` entry point,
``server`` the fork server behind ``ember agent``, ``peer`` its checks of who is
calling, ``freshness`` its check that the code it runs is still the code on disk.
Nothing here may import more than the standard library's built-ins at module
level: the client imports this package before every command.
"""
