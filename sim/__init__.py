"""Simulated downstream systems (billing, ERP, supply) for development, demos and tests."""
