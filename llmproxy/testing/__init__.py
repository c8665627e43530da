"""Fakes and helpers that ship with llmproxy, for its tests and for users' own."""
