"""corpus-level analyses and per-latent statistics

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

`analysis`: one corpus-level result on a dictionary (a dataset diff, a separability run): its parameters, a short
summary and the full result (ranked latents with example documents). `latent_stat`: a number per latent that is not
a score of an explanation (concept separability, the firing rate on random tokens), keyed like scores by the hash
of the settings that made it, so a rerun with other settings sits beside the first; indexed for sorting and filters.
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analysis",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("dictionary_pk", sa.Integer(), sa.ForeignKey("dictionary.id"), nullable=False),
        sa.Column("title", sa.String(length=500), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_analysis_dictionary_pk", "analysis", ["dictionary_pk"])
    op.create_table(
        "latent_stat",
        sa.Column("dictionary_pk", sa.Integer(), sa.ForeignKey("dictionary.id"), primary_key=True),
        sa.Column("latent", sa.Integer(), primary_key=True),
        sa.Column("stat", sa.String(length=50), primary_key=True),
        sa.Column("stat_key", sa.String(length=64), primary_key=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("analysis_id", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_latent_stat_value", "latent_stat", ["dictionary_pk", "stat", "value"])


def downgrade() -> None:
    op.drop_index("ix_latent_stat_value", table_name="latent_stat")
    op.drop_table("latent_stat")
    op.drop_index("ix_analysis_dictionary_pk", table_name="analysis")
    op.drop_table("analysis")
