"""The migrations create exactly the schema `autointerp/store/tables.py` declares, on SQLite and on PostgreSQL:
after `alembic upgrade head` the database's tables, columns (name, nullability, type family, string length),
primary keys, foreign keys, unique constraints and indexes equal SQLModel's metadata. A column a migration forgets
(or one tables.py gains without a migration) fails here, not in a user's store."""

from __future__ import annotations

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

import autointerp.store.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from autointerp.store.engine import head_revision, make_engine, resolve_url, upgrade

# What migrations add beyond tables.py on purpose, by backend (search machinery the ORM never maps)
EXTRA_TABLES = {"sqlite": ("explanation_fts",),  # FTS5 virtual table + its shadow tables (0002)
                "postgresql": ("explanation_vec",)}  # pgvector mirror of the embeddings (0003, with pgvector)
EXTRA_INDEXES = {"postgresql": {"ix_explanation_text_fts", "ix_explanation_vec_hnsw"}}  # GIN tsvector, HNSW


def _family(t) -> str:
    """A type's family across dialects: VARCHAR(300) / AutoString / TEXT -> String, BIGINT -> Integer, BYTEA -> _Binary."""
    return t._type_affinity.__name__


def _length(t):
    return getattr(t, "length", None)


def _declared(table) -> dict:
    cols = {c.name: (c.nullable, _family(c.type), _length(c.type)) for c in table.columns}
    pk = sorted(c.name for c in table.primary_key.columns)
    fks = sorted((fk.parent.name, fk.column.table.name, fk.column.name) for fk in table.foreign_keys)
    idx = sorted((i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes)
    uniq = {tuple(sorted(c.name for c in u.columns)) for u in table.constraints
            if u.__class__.__name__ == "UniqueConstraint"}
    uniq |= {tuple(sorted(c.name for c in col_set)) for col_set in ([c] for c in table.columns if c.unique)}
    return {"columns": cols, "pk": pk, "fks": fks, "indexes": idx, "unique": sorted(uniq)}


def _reflected(insp, name: str, dialect: str) -> dict:
    cols = {c["name"]: (c["nullable"], _family(c["type"]), _length(c["type"])) for c in insp.get_columns(name)}
    pk = sorted(insp.get_pk_constraint(name)["constrained_columns"])
    fks = sorted((col, fk["referred_table"], ref) for fk in insp.get_foreign_keys(name)
                 for col, ref in zip(fk["constrained_columns"], fk["referred_columns"]))
    all_idx = insp.get_indexes(name)
    idx = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in all_idx
                 if i["name"] not in EXTRA_INDEXES.get(dialect, set())
                 and not i.get("duplicates_constraint"))  # PostgreSQL lists a unique constraint's index too
    uniq = {tuple(sorted(u["column_names"])) for u in insp.get_unique_constraints(name)}
    idx_unique = {tuple(sorted(i[1])) for i in idx if i[2]}
    # a unique index is how some backends keep a declared unique constraint: count it as one, not as an extra index
    return {"columns": cols, "pk": pk, "fks": fks, "indexes": idx, "unique": sorted(uniq | idx_unique)}


def test_migrations_create_exactly_the_declared_schema(store_url):
    url = resolve_url(store_url)
    _, after = upgrade(url)  # alembic upgrade head, as the store and `autointerp db upgrade` run it
    assert after == head_revision(url)
    dialect = make_url(url).get_backend_name()
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        extras = EXTRA_TABLES.get(dialect, ())
        in_db = {t for t in insp.get_table_names() if t != "alembic_version" and not t.startswith(extras)}
        declared = SQLModel.metadata.tables
        assert in_db == set(declared), (f"migrations create {sorted(in_db - set(declared))} beyond tables.py and "
                                        f"miss {sorted(set(declared) - in_db)}")
        for name, table in declared.items():
            want, got = _declared(table), _reflected(insp, name, dialect)
            # unique indexes declared in tables.py are unique constraints too (both sides count them the same way)
            want["unique"] = sorted(set(want["unique"]) | {tuple(sorted(i[1])) for i in want["indexes"] if i[2]})
            diff = {c: (got["columns"].get(c), want["columns"].get(c)) for c in got["columns"] | want["columns"]
                    if got["columns"].get(c) != want["columns"].get(c)}
            assert not diff, f"{dialect} table {name}: columns (nullable, type, length) differ, (db, tables.py): {diff}"
            for part in ("pk", "fks", "indexes", "unique"):
                assert got[part] == want[part], f"{dialect} table {name}: {part} differ\n db:     {got[part]}\n " \
                                                f"tables: {want[part]}"
    finally:
        engine.dispose()
