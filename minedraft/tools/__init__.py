"""Offline tools: checkpoint import and model fetching; nothing here is imported by the services."""
