"""keyword search over explanations

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

SQLite: an FTS5 index of explanation texts (external content, kept in sync by triggers).
PostgreSQL: a GIN index on the English tsvector of the text, and the pgvector extension when the server has it
(semantic search; without it search falls back to the embedded index).
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("CREATE VIRTUAL TABLE explanation_fts USING fts5(text, content='explanation', content_rowid='id', "
                   "tokenize='porter unicode61')")
        op.execute("INSERT INTO explanation_fts(rowid, text) SELECT id, text FROM explanation WHERE text IS NOT NULL")
        op.execute("CREATE TRIGGER explanation_fts_ai AFTER INSERT ON explanation WHEN new.text IS NOT NULL BEGIN "
                   "INSERT INTO explanation_fts(rowid, text) VALUES (new.id, new.text); END")
        op.execute("CREATE TRIGGER explanation_fts_ad AFTER DELETE ON explanation WHEN old.text IS NOT NULL BEGIN "
                   "INSERT INTO explanation_fts(explanation_fts, rowid, text) VALUES ('delete', old.id, old.text); END")
        op.execute("CREATE TRIGGER explanation_fts_au AFTER UPDATE OF text ON explanation BEGIN "
                   "INSERT INTO explanation_fts(explanation_fts, rowid, text) SELECT 'delete', old.id, old.text "
                   "WHERE old.text IS NOT NULL; "
                   "INSERT INTO explanation_fts(rowid, text) SELECT new.id, new.text WHERE new.text IS NOT NULL; END")
    elif bind.dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_explanation_text_fts ON explanation "
                   "USING gin (to_tsvector('english', coalesce(text, '')))")
        has_vector = bind.exec_driver_sql("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").first()
        if has_vector:
            op.execute("CREATE EXTENSION IF NOT EXISTS vector")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for t in ("explanation_fts_ai", "explanation_fts_ad", "explanation_fts_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {t}")
        op.execute("DROP TABLE IF EXISTS explanation_fts")
    elif bind.dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_explanation_text_fts")
