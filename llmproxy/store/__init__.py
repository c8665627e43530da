"""Projects, tokens and audit events at rest (SQLite, PostgreSQL, MySQL, memory)."""
