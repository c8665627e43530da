"""llmproxy.audit."""
