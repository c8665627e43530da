"""llmproxy.events."""
