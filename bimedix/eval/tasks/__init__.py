"""The packaged lm-eval task YAMLs and their shared `utils` (a package so that the wheel ships them)."""
