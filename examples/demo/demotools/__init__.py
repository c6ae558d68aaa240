"""Tooling around the demo: run the server, check its endpoints, drive load (stdlib only)."""
