"""The base layer every bimedix package may import; it imports no other bimedix package.

- `bimedix.core.io`: reading and atomically writing JSON, JSON Lines and CSV/TSV files, `RecordError`.
- `bimedix.core.outputs`: output safety (`check_outputs`, `OutputFolder`).
- `bimedix.core.conventions`: languages, option letters, answer cues, on-error policies.
- `bimedix.core.command`: `run_command`, which turns a command's errors into one line and an exit status.
- `bimedix.core.moved`: forwarding old module paths to their new place for one release.

Shipped files (recipes, card templates, bundled data) are found by `bimedix.resources`, a module of the same
layer.
"""
