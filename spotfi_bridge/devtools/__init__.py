"""Developer tools that are not part of the router-side daemon (``make dry-run``)."""
