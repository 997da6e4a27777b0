"""Transports: thin adapters that convert messages and call the session engine."""
