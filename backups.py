"""Backups: a consistent snapshot taken while the service serves and writes (SQLite's online backup
API, PostgreSQL's pg_dump), written whole or not at all; and restores of them."""
import os
import sqlite3
import subprocess
import tempfile
import time

from peewee import DatabaseError, SqliteDatabase

COUNT = 'SELECT (SELECT count(*) FROM people), (SELECT count(*) FROM tokens), (SELECT count(*) FROM idempotency_keys)'


class Failed(Exception):
    """A backup or restore that did not happen; the message is one line for the operator."""


def take(db, path):
    """Snapshot `db` into a hidden temporary file beside `path`, renamed once complete: `path` is whole or absent."""
    started, directory, partial = time.monotonic(), os.path.dirname(os.path.abspath(path)), None
    try:
        try:
            fd, partial = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.partial')
        except OSError as error:  # its message names the temporary file, which nobody asked for
            raise Failed(f'{path}: cannot write in {directory}: {error.strerror}') from None
        os.close(fd)  # made 0600: a backup holds every person and the tokens' hashes
        if isinstance(db, SqliteDatabase):
            target = sqlite3.connect(partial)
            # NOTE: copied in one step, so in one read transaction, which WAL lets writers work beside.
            db.connection().backup(target)
            target.execute('PRAGMA journal_mode=delete')  # the copy keeps the source's WAL mode: one file is simpler
            counts = target.execute(COUNT).fetchone()
            target.close()
        else:  # pg_dump dumps the snapshot this transaction exports, so the counts are of what it dumps
            with db.atomic():
                db.execute_sql('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ')
                snapshot, schema = db.execute_sql('SELECT pg_export_snapshot(), current_schema()').fetchone()
                counts = db.execute_sql(COUNT).fetchone()
                postgres(db, 'pg_dump', '--format=custom', f'--snapshot={snapshot}', f'--file={partial}',
                         *(f'--table={schema}.{table}' for table in ('people', 'tokens', 'idempotency_keys')))
        os.replace(partial, path)  # both have synced the file; a rename is atomic
    except (OSError, sqlite3.Error, DatabaseError) as error:
        raise Failed(f'{path}: {first_line(error)}') from None
    finally:
        if partial and os.path.exists(partial):
            os.unlink(partial)
    return summary(path, counts, started)


def restore(db, path, force=False):
    """Load the backup at `path` into `db`, refusing a database that holds people unless `force`."""
    started = time.monotonic()
    try:
        open(path).close()  # a missing backup fails before the database is touched (SQLite would make its file)
        if not force and db.table_exists('people') and db.execute_sql('SELECT 1 FROM people LIMIT 1').fetchone():
            raise Failed('the database holds people already: restore into an empty one, or --force to replace them')
        if isinstance(db, SqliteDatabase):  # every page is replaced, sqlite_sequence (the next id) included
            with open(path), sqlite3.connect(path) as source:  # open() first: connect() would create a missing file
                source.backup(db.connection())
            if db.execute_sql('PRAGMA integrity_check').fetchone()[0] != 'ok':
                raise Failed(f'{path} restored, but fails PRAGMA integrity_check')
        else:  # tables, rows and the identity sequence's position, replaced in one transaction
            schema = db.execute_sql('SELECT current_schema()').fetchone()[0]
            postgres(db, 'pg_restore', '--clean', '--if-exists', '--no-owner', '--no-privileges', '--exit-on-error',
                     '--single-transaction', f'--schema={schema}', path)
            if not db.table_exists('people'):  # --schema matched nothing: the backup is of another schema
                raise Failed(f'{path} holds no people table in schema {schema}')
        return summary(path, db.execute_sql(COUNT).fetchone(), started)
    except (OSError, sqlite3.Error, DatabaseError) as error:
        raise Failed(f'{path}: {first_line(error)}') from None


def postgres(db, tool, *args):
    """Run pg_dump or pg_restore on `db`; the password goes in the environment, not on the command line."""
    # host -> PGHOST, options -> PGOPTIONS, connect_timeout -> PGCONNECT_TIMEOUT: libpq's own names
    environment = {**os.environ, **{'PG' + key.upper(): str(value) for key, value in db.connect_params.items()}}
    result = subprocess.run([tool, f'--dbname={db.database}', *args], env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise Failed(first_line(result.stderr))


def first_line(error):  # an OSError's names the file: "[Errno 2] No such file or directory: 'pg_dump'"
    return str(error).strip().split('\n')[0]


def summary(path, counts, started):
    return (f'{path}: {counts[0]} people, {counts[1]} tokens, {counts[2]} idempotency keys; '
            f'{os.path.getsize(path) / 1e6:.1f} MB in {time.monotonic() - started:.1f} s')
