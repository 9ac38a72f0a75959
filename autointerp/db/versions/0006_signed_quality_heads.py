"""signed dictionaries, reconstruction quality, attention heads

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

A signed dictionary (AbsTopK, ITDA, raw neurons) stores each latent's two poles as two units (`signed`: unit i < n
is latent i's positive pole, n + i its negative one). `quality` holds the reconstruction pass of an extraction (L0,
FVU, spliced-in loss and KL, loss recovered, dead and dense fractions). For attention-output dictionaries each
latent's decoder-norm share per head (`heads`) and the head holding the largest share (`top_head`, a search filter).
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dictionary") as b:
        b.add_column(sa.Column("signed", sa.Boolean(), nullable=False, server_default=sa.false()))
        b.add_column(sa.Column("quality", sa.JSON(), nullable=True))
    with op.batch_alter_table("latent") as b:
        b.add_column(sa.Column("heads", sa.JSON(), nullable=True))
        b.add_column(sa.Column("top_head", sa.Integer(), nullable=True))
        b.create_index("ix_latent_top_head", ["dictionary_pk", "top_head"])


def downgrade() -> None:
    with op.batch_alter_table("latent") as b:
        b.drop_index("ix_latent_top_head")
        b.drop_column("top_head")
        b.drop_column("heads")
    with op.batch_alter_table("dictionary") as b:
        b.drop_column("quality")
        b.drop_column("signed")
