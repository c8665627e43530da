"""Files shipped with llmproxy (the example providers file)."""
