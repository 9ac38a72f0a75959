"""pgvector copy of 384-d explanation embeddings with an HNSW index (PostgreSQL with pgvector only)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

`explanation_embedding` (bytes, any embedder and width) stays the source of truth on every backend. On PostgreSQL
with the vector extension, embeddings of the default width (384, all-MiniLM-L6-v2) are mirrored into
`explanation_vec` with an HNSW cosine index, which semantic search queries directly. Elsewhere (SQLite, PostgreSQL
without pgvector, other widths) search uses the embedded index file beside the store.
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if not bind.exec_driver_sql("SELECT 1 FROM pg_extension WHERE extname = 'vector'").first():
        return
    op.execute("CREATE TABLE explanation_vec (explanation_id integer NOT NULL REFERENCES explanation(id), "
               "embedder varchar(300) NOT NULL, vec vector(384) NOT NULL, PRIMARY KEY (explanation_id, embedder))")
    op.execute("CREATE INDEX ix_explanation_vec_hnsw ON explanation_vec USING hnsw (vec vector_cosine_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE IF EXISTS explanation_vec")
