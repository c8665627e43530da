"""llmproxy: a Twisted reverse proxy for LLM provider APIs with withering tokens."""

__version__ = "0.1.0"
