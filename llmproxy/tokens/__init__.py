"""llmproxy.tokens."""
