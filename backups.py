"""Backups: a consistent snapshot taken while the service serves and writes (SQLite's online backup
API, PostgreSQL's pg_dump), written whole or not at all, its SHA-256 beside it; and restores that check
the backup whole before they touch the database, then replace its rows in one transaction."""
import hashlib
import itertools
import os
import re
import sqlite3
import stat
import subprocess
import tempfile
import time

from peewee import DatabaseError, SqliteDatabase

import models
import storage

# What a backup holds: each table's columns, in the models' order, which is the table's (tests/test_schema.py)
TABLES = {model._meta.table_name: tuple(model._meta.sorted_field_names)
          for model in (models.Person, models.Token, models.IdempotencyKey)}
COUNT = 'SELECT (SELECT count(*) FROM people), (SELECT count(*) FROM tokens), (SELECT count(*) FROM idempotency_keys)'
LIVE_TOKENS = 'SELECT name FROM tokens WHERE revoked_at = 0'
# A restore never brings back a token this database has revoked: its row goes back in, revoked, whether the
# backup holds the token live or not at all (a revocation is kept however many restores come after it).
REVOKED = f"SELECT {', '.join(TABLES['tokens'])} FROM tokens WHERE revoked_at <> 0"
KEEP_REVOKED = (f"INSERT INTO tokens ({', '.join(TABLES['tokens'])}) VALUES ({', '.join(['{p}'] * len(TABLES['tokens']))}) "
                'ON CONFLICT (name) DO UPDATE SET revoked_at = excluded.revoked_at')
MAGIC = {'SQLite': b'SQLite format 3\0', 'PostgreSQL': b'PGDMP'}  # how each backend's backup begins
# What pg_restore --list shows of a backup ("TYPE schema name ..."); any other entry is refused.
# Grants (ACL) come with a dump of the least-privilege setup; restore never applies them: it keeps the tables' own.
ENTRIES = re.compile(r'(TABLE|TABLE DATA) \w+ (people|tokens|idempotency_keys) |ACL \w+ (TABLE|SEQUENCE) '
                     r'(people|tokens|idempotency_keys|people_id_seq) |CONSTRAINT \w+ (people|tokens|idempotency_keys) \w+ '
                     r'|INDEX \w+ people_(name|locale) |SEQUENCE (SET )?\w+ people_id_seq ')


class Failed(Exception):
    """A backup or restore that did not happen; the message is one line for the operator."""


def take(db, path):
    """Snapshot `db` into a hidden temporary file beside `path`, renamed once complete: `path` is whole
    or absent; then PATH.sha256, which restore checks."""
    started, directory, partial = time.monotonic(), os.path.dirname(os.path.abspath(path)), None
    try:
        if isinstance(db, SqliteDatabase) and any(  # SQLite keeps its -wal beside the file a link names
                os.path.realpath(path) == os.path.realpath(base + suffix) for base in (db.database, os.path.realpath(
                    db.database)) for suffix in ('', '-wal', '-shm', '-journal', '.write-lock')):
            raise Failed(f'{path} is the database itself (or one of its files): name a file elsewhere')
        if os.path.isdir(path):
            raise Failed(f'{path} is a directory: name a file in it')
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
                run('pg_dump', '--format=custom', f'--snapshot={snapshot}', f'--file={partial}',
                    *(f'--table={schema}.{table}' for table in TABLES), db=db)
        os.replace(partial, path)  # both have synced the file; a rename is atomic
        with open(path, 'rb') as f, open(os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600), 'w') as out:
            out.write(f'{checksum(f.fileno())}  {os.path.basename(path)}\n')  # as sha256sum writes it, 0600 too
        os.replace(partial, path + '.sha256')
    except (OSError, sqlite3.Error, DatabaseError) as error:
        raise Failed(f'{path}: {first_line(error)}') from None
    finally:
        if partial and os.path.exists(partial):
            os.unlink(partial)
    return summary(path, counts, started)


def restore(db, path, force=False, keep_tokens=False):
    """Replace the rows of `db` with the backup's, in one transaction; returns the lines to print. The
    backup is checked whole first, and nothing of it but rows is used: the tables are schema.sql's."""
    started, tables = time.monotonic(), [t for t in TABLES if not (keep_tokens and t == 'tokens')]
    is_sqlite = isinstance(db, SqliteDatabase)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: a FIFO must not hang the command
    except OSError as error:
        raise Failed(f'{path}: {error.strerror}') from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Failed(f'{path} is not a file: not a backup')
        # NOTE: every step reads this one open file by its /proc name, so a file renamed over `path` meanwhile
        # is never the one restored: what was checked is what is copied.
        check(path, fd, 'SQLite' if is_sqlite else 'PostgreSQL')  # before the database is opened, let alone written
        storage.create_schema(db)  # the tables, indexes and statement timeout init-db makes
        held = [table for table, rows in zip(TABLES, db.execute_sql(COUNT).fetchone()) if rows and table in tables]
        if held and not force:
            raise Failed(f'the database holds {" and ".join(held)} already: restore into an empty one, or --force '
                         f'to replace them{"" if keep_tokens else " (--keep-tokens keeps the tokens)"}')
        before = {name for name, in db.execute_sql(LIVE_TOKENS)}
        revoked = db.execute_sql(REVOKED).fetchall() if 'tokens' in tables else []
        (replace_sqlite if is_sqlite else replace_postgres)(db, path, fd, tables, revoked)
        after = {name for name, in db.execute_sql(LIVE_TOKENS)}
        lines = [summary(path, db.execute_sql(COUNT).fetchone(), started)]
    except (OSError, sqlite3.Error, DatabaseError, UnicodeError) as error:
        raise Failed(f'{path}: {first_line(error)}') from None
    finally:
        os.close(fd)
    if revoked:
        lines.append(f'tokens revoked here stay revoked: {", ".join(sorted(row[0] for row in revoked))}')
    if before - after:
        lines.append(f'tokens gone, made since the backup: {", ".join(sorted(before - after))}')
    return lines


def check(path, fd, backend):
    """Refuse anything but a whole backup of this backend, as backup wrote it, holding schema.sql's tables."""
    head = os.pread(fd, 100, 0)
    if os.path.lexists(path + '.sha256'):  # absent when copied by hand: the checks below still apply
        if not os.path.isfile(path + '.sha256'):
            raise Failed(f'{path}.sha256 is not a file')
        with open(path + '.sha256', errors='replace') as f:
            if f.read(200).split()[:1] != [checksum(fd)]:
                raise Failed(f'{path} is not what backup wrote: its SHA-256 differs from {path}.sha256')
    if not head.startswith(MAGIC[backend]):
        other = next((name for name, magic in MAGIC.items() if head.startswith(magic)), None)
        raise Failed(f'{path} is empty: not a backup' if not head else
                     f'{path} is a {other} backup: restore it with a DATABASE_URL of {other}' if other else
                     f'{path} is not a {backend} backup')
    if backend == 'SQLite' and head[18:20] != b'\1\1':  # backup writes a rollback-journal file: one file, whole
        raise Failed(f'{path} is a SQLite file in WAL mode, not a backup (some of it may be in a -wal beside it)')
    try:
        if backend == 'SQLite':
            source, reference = sqlite3.connect(f'file:/proc/self/fd/{fd}?mode=ro', uri=True), sqlite3.connect(':memory:')
            is_whole = source.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
            found = upgraded([normal(row) for row in source.execute('SELECT type, name, tbl_name, sql FROM sqlite_master')])
            for _, _, statement in storage.schema_statements(None):
                reference.execute(statement)
            expected = {normal(row) for row in reference.execute('SELECT type, name, tbl_name, sql FROM sqlite_master')}
            foreign = [f'{row[0]} {row[1]}' for row in found if row not in expected]
            tables = [row[1] for row in found if row[0] == 'table' and row[1] in TABLES and is_whole]
            # SQLite stores any type in any column: rows the API would refuse (age 1.5, a NUL) would be 500s later.
            foreign += [f'{count} rows the API would refuse' for count in source.execute(
                "SELECT (SELECT count(*) FROM people WHERE typeof(id) || typeof(name) || typeof(age) || typeof(locale) "
                "|| typeof(version) != 'integertextintegertextinteger' OR instr(name, char(0)) OR instr(locale, char(0))) "
                "+ (SELECT count(*) FROM tokens WHERE typeof(name) || typeof(secret_hash) || typeof(created_at) "
                "|| typeof(expires_at) != 'texttextintegerinteger')").fetchone() if count] if not foreign else []
            source.close()
        else:  # "218; 1259 16413 TABLE zz people owner": each entry, from its type on, less its owner
            listing = [line.split('; ', 1)[1].split(' ', 2)[2].rsplit(' ', 1)[0] + ' '
                       for line in run('pg_restore', '--list', f'/proc/self/fd/{fd}', fds=(fd,)).splitlines()
                       if line and line[0] != ';']
            foreign = [entry.strip() for entry in listing if not ENTRIES.fullmatch(entry)]
            data = [entry.split()[2:4] for entry in listing if entry.startswith('TABLE DATA ')]  # [schema, table]
            tables = [name for schema, name in data] if len({schema for schema, _ in data}) == 1 else []
    except (sqlite3.DatabaseError, Failed) as error:
        raise Failed(f'{path} is damaged ({error})') from None
    if backend == 'SQLite' and not is_whole:
        raise Failed(f'{path} is damaged: it fails PRAGMA integrity_check')
    missing = sorted(set(TABLES) - set(tables)) if len(tables) == len(set(tables)) else ['one schema of each table']
    if foreign or missing:
        raise Failed(f'{path} is not a backup of this service: it ' + ' and '.join(
            [f'holds {", ".join(foreign)}'] * bool(foreign) + [f'lacks {", ".join(missing)}'] * bool(missing)))


def normal(row):  # an object of sqlite_master, its SQL with white space folded (ALTER TABLE adds its own)
    return (*row[:3], re.sub(r'\s*([(),])\s*', r'\1', ' '.join((row[3] or '').split())))


def upgraded(found):
    """The objects of a SQLite backup with its tables as init-db leaves them: a backup taken before a column
    was added is restored with the column's default."""
    scratch = SqliteDatabase(':memory:')
    for row in found:
        if row[0] == 'table' and row[1] in TABLES:
            scratch.execute_sql(row[3])
    storage.create_schema(scratch)  # adds the columns, as init-db does
    tables = {row[1]: normal(row) for row in scratch.execute_sql('SELECT type, name, tbl_name, sql FROM sqlite_master')}
    return [tables[row[1]] if row[0] == 'table' and row[1] in TABLES else row for row in found]


def replace_sqlite(db, path, fd, tables, revoked):
    """One write transaction, in the service's write turn: readers see the old rows until it commits,
    writers wait for it, and a failure anywhere leaves the database as it was."""
    connection = sqlite3.connect(db.database, uri=True, isolation_level=None, timeout=30)
    try:
        connection.execute('PRAGMA synchronous=FULL')
        connection.execute('ATTACH DATABASE ? AS backup', (f'file:/proc/self/fd/{fd}?mode=ro',))
        with storage.WriteTurn(db), connection:  # commits, or rolls back on any exception
            connection.execute('BEGIN IMMEDIATE')
            indexes = [(name, sql) for kind, name, sql in storage.schema_statements(None) if kind == 'INDEX']
            for name, _ in indexes:  # rebuilt after the rows, in the transaction: ~2x faster than row by row
                connection.execute(f'DROP INDEX IF EXISTS main.{name}')
            for table in tables:  # the backup's columns: one taken before a column was added lacks it
                held = {row[1] for row in connection.execute(f'PRAGMA backup.table_info({table})')}
                columns = ', '.join(column for column in TABLES[table] if column in held)
                connection.execute(f'DELETE FROM main.{table}')
                connection.execute(f'INSERT INTO main.{table} ({columns}) SELECT {columns} FROM backup.{table}')
            connection.executemany(KEEP_REVOKED.format(p='?'), revoked)  # main's tokens: searched before backup's
            for _, sql in indexes:
                connection.execute(sql)
            highest = max(connection.execute(  # ids handed out before, here or in the backup, never come again
                "SELECT max(seq) FROM main.sqlite_sequence WHERE name = 'people' UNION ALL "
                "SELECT max(seq) FROM backup.sqlite_sequence WHERE name = 'people' UNION ALL "
                "SELECT max(id) FROM main.people").fetchall(), key=lambda row: row[0] or 0)[0] or 0
            connection.execute("DELETE FROM main.sqlite_sequence WHERE name = 'people'")
            connection.execute("INSERT INTO main.sqlite_sequence (name, seq) VALUES ('people', ?)", (highest,))
    finally:
        connection.close()


def replace_postgres(db, path, fd, tables, revoked):
    """One transaction: the tables locked against writers (readers go on), emptied, and filled with the
    backup's rows, read from pg_restore's text and copied in (the archive's SQL is never run)."""
    reader = subprocess.Popen(['pg_restore', '--data-only', '--file=-', f'/proc/self/fd/{fd}'], pass_fds=(fd,),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # bytes: in the dump's own encoding
    highest = 0
    try:
        with models.driver_errors_as_peewee_errors, db.atomic():
            cursor = db.cursor()
            cursor.execute('SET LOCAL statement_timeout = 0')  # as long as the copy takes; the service's stay 5 s
            cursor.execute(f'LOCK TABLE {", ".join(tables)} IN EXCLUSIVE MODE')
            cursor.execute('SELECT EXISTS (SELECT 1 FROM people)')
            if not cursor.fetchone()[0]:  # no reader waits on an empty table: its indexes follow the rows, 3x faster
                storage.drop_list_indexes(db)
            for table in tables:
                cursor.execute(f'DELETE FROM {table}')
            for line in reader.stdout:
                encoding = re.fullmatch(rb"SET client_encoding = '([\w-]+)';\n", line)
                if encoding:  # the rows come in the backed-up database's encoding (LATIN1, say): PostgreSQL converts
                    cursor.execute('SET LOCAL client_encoding = %s', (encoding[1].decode(),))
                sequence = re.fullmatch(rb"SELECT pg_catalog\.setval\('\w+\.people_id_seq', (\d+), (true|false)\);\n", line)
                highest = int(sequence[1]) - (sequence[2] == b'false') if sequence else highest
                copy = re.fullmatch(r'COPY \w+\.(\w+) \(([^)]*)\) FROM stdin;\n', line.decode('ascii', 'replace'))
                if copy and TABLES.get(copy[1], ())[:len(copy[2].split(', '))] != tuple(copy[2].split(', ')):
                    raise Failed(f'{path} holds {copy[1]} ({copy[2]}), not what backup writes')
                if copy and copy[1] not in tables:  # --keep-tokens: the backup's are passed over
                    all(CopyData(reader.stdout).lines)
                elif copy:
                    try:
                        cursor.copy_expert(f'COPY {copy[1]} ({copy[2]}) FROM STDIN', CopyData(reader.stdout))
                    except Exception as error:  # SQLSTATE class 22, a data exception: rows cut short or malformed
                        if not str(getattr(error, 'pgcode', '')).startswith('22'):
                            raise
                        raise Failed(f'{path} is damaged ({first_line(error)})') from None
            if reader.wait() != 0:
                raise Failed(f'{path} is damaged ({first_line(reader.stderr.read().decode(errors="replace"))})')
            cursor.executemany(KEEP_REVOKED.format(p='%s'), revoked)
            for statement in [statement for kind, _, statement in storage.schema_statements(db) if kind == 'INDEX']:
                cursor.execute(statement)  # those dropped above; IF NOT EXISTS, the others
            cursor.execute(  # ids handed out before, here or in the backup, never come again
                "SELECT setval(seq, greatest(n, 1), n > 0) FROM (SELECT seq, greatest(%s, (SELECT max(id) FROM people), "
                "pg_sequence_last_value(seq), 0) AS n FROM CAST(pg_get_serial_sequence('people', 'id') AS regclass) seq) s",
                (highest,))
    finally:
        reader.kill()
        reader.wait()


class CopyData:
    """One COPY block of pg_restore's text, up to its "\\." line, as the file copy_expert reads."""

    def __init__(self, lines):
        self.lines = itertools.takewhile(lambda line: line != b'\\.\n', lines)

    def read(self, size=-1):
        return b''.join(itertools.islice(self.lines, 1000))

    readline = read


def run(tool, *args, db=None, fds=()):
    """pg_dump or pg_restore's output (on `db`: its password in the environment, not on the command line)."""
    # host -> PGHOST, options -> PGOPTIONS, connect_timeout -> PGCONNECT_TIMEOUT: libpq's own names
    environment = {**os.environ, **{'PG' + key.upper(): str(value) for key, value in (db.connect_params if db else {}).items()}}
    result = subprocess.run([tool, *([f'--dbname={db.database}'] if db else []), *args], env=environment,
                            capture_output=True, text=True, errors='replace', pass_fds=fds)
    if result.returncode != 0:
        raise Failed(first_line(result.stderr))
    return result.stdout


def checksum(fd):
    digest, offset = hashlib.sha256(), 0
    for block in iter(lambda: os.pread(fd, 1 << 20, offset), b''):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def first_line(error):  # an OSError's names the file: "[Errno 2] No such file or directory: 'pg_dump'"
    return str(error).strip().split('\n')[0]


def summary(path, counts, started):
    return (f'{path}: {counts[0]} people, {counts[1]} tokens, {counts[2]} idempotency keys; '
            f'{os.path.getsize(path) / 1e6:.1f} MB in {time.monotonic() - started:.1f} s')
