"""Deprecated: moved to `bimedix.core.io` (`read_records` to `bimedix.data.schema`); this path goes in the
next release."""

from ..core.moved import moved

__getattr__ = moved(__name__, "bimedix.core.io",
                    {"read_records": "bimedix.data.schema", "read_records_lines": "bimedix.data.schema"})
