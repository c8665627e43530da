"""llmproxy.web."""
