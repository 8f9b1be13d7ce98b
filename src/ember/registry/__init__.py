"""OCI distribution: the registry client (``client/``) and the multi-tenant server (``server/``)."""
