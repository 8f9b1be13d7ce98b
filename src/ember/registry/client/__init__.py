"""The registry pull client: auth flows, manifests, verified resumable blob downloads.

Import the submodules (``client``, ``credentials``, ``auth``, ``transport``) directly:
this package stays empty so that reading credentials imports no HTTP code.
"""
