"""job status at millions of items: a (stage, status) index and a partial spend index on job_item

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

`ix_job_item_stage` (job_id, stage, status): `Store.item_counts` counts each (stage, status) of a job in one
index-only range instead of grouping every item (and the extraction's few shard and merge items are found by seek).
`ix_job_item_spend`: the spend columns of the items that have spend (a partial index), so `Store.job_spend` sums
those from the index instead of reading every item's row. The predicate is `tables.JOB_ITEM_SPENT`, copied here.
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SPENT = "calls != 0 OR prompt_tokens != 0 OR completion_tokens != 0 OR cost_usd != 0"


def upgrade() -> None:
    op.create_index("ix_job_item_stage", "job_item", ["job_id", "stage", "status"])
    op.create_index("ix_job_item_spend", "job_item",
                    ["job_id", "prompt_tokens", "completion_tokens", "calls", "cost_usd"],
                    sqlite_where=sa.text(SPENT), postgresql_where=sa.text(SPENT))


def downgrade() -> None:
    op.drop_index("ix_job_item_spend", table_name="job_item")
    op.drop_index("ix_job_item_stage", table_name="job_item")
