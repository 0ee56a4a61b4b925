"""Parley: a self-hostable real-time chat backend."""

__version__ = "0.1.0"
