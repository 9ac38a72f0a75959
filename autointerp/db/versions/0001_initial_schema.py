"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-12-03

The tables of autointerp/store/tables.py as first released.
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_key',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('subject_model',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('dictionary',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('dictionary_id', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
    sa.Column('subject_model_id', sa.Integer(), nullable=False),
    sa.Column('hookpoint', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
    sa.Column('n_latents', sa.Integer(), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('ctx_len', sa.Integer(), nullable=False),
    sa.Column('cache_path', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.Column('n_alive', sa.Integer(), nullable=False),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['subject_model_id'], ['subject_model.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('dictionary', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dictionary_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_dictionary_subject_model_id'), ['subject_model_id'], unique=False)

    op.create_table('comparison',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dictionary_a', sa.Integer(), nullable=False),
    sa.Column('dictionary_b', sa.Integer(), nullable=False),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('summary', sa.JSON(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dictionary_a'], ['dictionary.id'], ),
    sa.ForeignKeyConstraint(['dictionary_b'], ['dictionary.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparison_dictionary_a'), ['dictionary_a'], unique=False)
        batch_op.create_index(batch_op.f('ix_comparison_dictionary_b'), ['dictionary_b'], unique=False)

    op.create_table('explanation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dictionary_pk', sa.Integer(), nullable=False),
    sa.Column('latent', sa.Integer(), nullable=False),
    sa.Column('explain_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('explainer', sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('prompt_version', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('text', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('skipped', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('parsed', sa.Boolean(), nullable=False),
    sa.Column('examples_used', sa.JSON(), nullable=True),
    sa.Column('usage', sa.JSON(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dictionary_pk'], ['dictionary.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dictionary_pk', 'latent', 'explain_key', name='uq_explanation_identity')
    )
    with op.batch_alter_table('explanation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_explanation_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_explanation_latent', ['dictionary_pk', 'latent'], unique=False)

    op.create_table('job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('dictionary_pk', sa.Integer(), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=30), nullable=False),
    sa.Column('budget_usd', sa.Float(), nullable=True),
    sa.Column('n_items', sa.Integer(), nullable=False),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('started', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('finished', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('updated', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dictionary_pk'], ['dictionary.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_dictionary_pk'), ['dictionary_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_key'), ['key'], unique=False)

    op.create_table('latent',
    sa.Column('dictionary_pk', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('n_active', sa.Integer(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('mean_act', sa.Float(), nullable=False),
    sa.Column('hist', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['dictionary_pk'], ['dictionary.id'], ),
    sa.PrimaryKeyConstraint('dictionary_pk', 'index')
    )
    with op.batch_alter_table('latent', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_latent_frequency'), ['frequency'], unique=False)

    op.create_table('explanation_embedding',
    sa.Column('explanation_id', sa.Integer(), nullable=False),
    sa.Column('embedder', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['explanation_id'], ['explanation.id'], ),
    sa.PrimaryKeyConstraint('explanation_id', 'embedder')
    )
    op.create_table('job_item',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('latent', sa.Integer(), nullable=False),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('calls', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('updated', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ),
    sa.PrimaryKeyConstraint('job_id', 'latent', 'stage')
    )
    with op.batch_alter_table('job_item', schema=None) as batch_op:
        batch_op.create_index('ix_job_item_status', ['job_id', 'status', 'latent'], unique=False)

    op.create_table('score',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('explanation_id', sa.Integer(), nullable=False),
    sa.Column('score_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('scorer', sqlmodel.sql.sqltypes.AutoString(length=50), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('prompt_version', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('skipped', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('usage', sa.JSON(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['explanation_id'], ['explanation.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('explanation_id', 'score_key', name='uq_score_identity')
    )
    with op.batch_alter_table('score', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_score_explanation_id'), ['explanation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_score_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_score_scorer_value', ['scorer', 'value'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('score', schema=None) as batch_op:
        batch_op.drop_index('ix_score_scorer_value')
        batch_op.drop_index(batch_op.f('ix_score_job_id'))
        batch_op.drop_index(batch_op.f('ix_score_explanation_id'))

    op.drop_table('score')
    with op.batch_alter_table('job_item', schema=None) as batch_op:
        batch_op.drop_index('ix_job_item_status')

    op.drop_table('job_item')
    op.drop_table('explanation_embedding')
    with op.batch_alter_table('latent', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_latent_frequency'))

    op.drop_table('latent')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_key'))
        batch_op.drop_index(batch_op.f('ix_job_dictionary_pk'))

    op.drop_table('job')
    with op.batch_alter_table('explanation', schema=None) as batch_op:
        batch_op.drop_index('ix_explanation_latent')
        batch_op.drop_index(batch_op.f('ix_explanation_job_id'))

    op.drop_table('explanation')
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparison_dictionary_b'))
        batch_op.drop_index(batch_op.f('ix_comparison_dictionary_a'))

    op.drop_table('comparison')
    with op.batch_alter_table('dictionary', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dictionary_subject_model_id'))
        batch_op.drop_index(batch_op.f('ix_dictionary_name'))

    op.drop_table('dictionary')
    op.drop_table('subject_model')
    op.drop_table('api_key')
