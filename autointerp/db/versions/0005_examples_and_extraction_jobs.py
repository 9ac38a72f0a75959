"""examples in the store and extraction as a job

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Workers on machines that never saw an extraction's cache folder read the display examples from the store:
`example_window` (each window's token ids, stored once per dictionary) and `latent_example` (one compact blob per
latent: its top and sample windows' rows, maxima and per-token activations). `blob` holds what a job's units hand
to each other (a shard's collector state, chunked). The dictionary row records the extraction's manifest and the
key of the extraction settings (a job on the same settings reuses it); a job item carries its progress (shards).
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dictionary") as b:
        b.add_column(sa.Column("manifest", sa.JSON(), nullable=True))
        b.add_column(sa.Column("extraction_key", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("examples_in_store", sa.Boolean(), nullable=False, server_default=sa.false()))
        b.create_index("ix_dictionary_extraction_key", ["extraction_key"])
    with op.batch_alter_table("job_item") as b:
        b.add_column(sa.Column("progress", sa.JSON(), nullable=True))
    op.create_table(
        "example_window",
        sa.Column("dictionary_pk", sa.Integer(), sa.ForeignKey("dictionary.id"), primary_key=True),
        sa.Column("row", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("tokens", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "latent_example",
        sa.Column("dictionary_pk", sa.Integer(), sa.ForeignKey("dictionary.id"), primary_key=True),
        sa.Column("latent", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "blob",
        sa.Column("key", sa.String(length=300), primary_key=True),
        sa.Column("part", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("blob")
    op.drop_table("latent_example")
    op.drop_table("example_window")
    with op.batch_alter_table("job_item") as b:
        b.drop_column("progress")
    with op.batch_alter_table("dictionary") as b:
        b.drop_index("ix_dictionary_extraction_key")
        b.drop_column("examples_in_store")
        b.drop_column("extraction_key")
        b.drop_column("manifest")
