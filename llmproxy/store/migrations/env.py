"""
Alembic environment for llmproxy. Migrations always run programmatically
(L{llmproxy.store.migrate}) on a connection handed over in
C{config.attributes["connection"]}; no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
