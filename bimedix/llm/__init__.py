"""LLM data engines over any OpenAI-compatible endpoint (paper §3.1): translation with review, dialogue
generation.

``client`` (the only code that talks to an endpoint) · ``cache`` (request cache, cost ledger, finished
results) · ``batch`` (Batch API mode) · ``runner`` (the resumable loop over a file of records) ·
``engine`` (what the engines share: request settings, prompts, re-asks, the run over a file) ·
``translation`` + ``invariants`` (English→Arabic with judge and refinement) · ``review`` (human review
queue and audit trail) · ``dialogue`` (MCQA-grounded chats) · ``prompts`` (versioned templates) ·
``fake_server`` (a scripted local OpenAI-compatible server for tests and dry runs). See docs/llm-engines.md.
"""
