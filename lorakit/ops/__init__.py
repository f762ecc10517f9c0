"""Operators on adapters."""
