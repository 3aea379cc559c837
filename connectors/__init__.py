"""Connectors: how effects reach the downstream systems (NATS request/reply or HTTP)."""
