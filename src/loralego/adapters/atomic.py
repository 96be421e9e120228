"""Atomic output folders; the implementation is :mod:`loralego.safeio`, the one guarded way to write."""

from __future__ import annotations

from ..safeio import atomic_file, atomic_folder

__all__ = ["atomic_file", "atomic_folder"]
