"""Deprecated: moved to `bimedix.training.moe.experts`; this path goes in the next release."""

from ..core.moved import moved

__getattr__ = moved(__name__, "bimedix.training.moe.experts")
