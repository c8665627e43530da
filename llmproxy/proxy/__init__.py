"""The streaming reverse proxy on /v1."""
