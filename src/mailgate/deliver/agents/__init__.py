"""Delivery agents: the plugin contract (api), discovery and settings (registry)."""
