"""Deprecated: moved to `bimedix.core.outputs`; this path goes in the next release."""

from ..core.moved import moved

__getattr__ = moved(__name__, "bimedix.core.outputs")
