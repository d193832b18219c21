"""Integrations with optional libraries, each behind an extra of worq-core.

A module here imports its library only when its feature is switched on, so an installed but
unused integration costs nothing.
"""
