"""Sharding of embedding collections across devices (not implemented yet)."""
