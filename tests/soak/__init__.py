"""Soak runner (make soak); not collected by pytest."""
