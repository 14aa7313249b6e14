"""Where the data lives: the database a DATABASE_URL names, opened so that pre-forked workers can share
it, the tables and indexes schema.sql defines, and SQLite's write turn. models.py holds what is stored
and every query; this module, how the database is reached."""
import fcntl
import os
import re
import select

from peewee import DatabaseProxy, OperationalError, PostgresqlDatabase, ProgrammingError, SqliteDatabase
from playhouse.db_url import connect, parse

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'schema.sql')

database = DatabaseProxy()  # bound by open_database(); the models' Meta names it, so one module serves any URL


def open_database(url):
    """The database DATABASE_URL names, bound to the models. Connections open lazily, in the
    process that first queries, so a master can open it and then fork workers."""
    options = {}
    if url.startswith('sqlite'):
        # WAL lets readers run beside the writer; synchronous=FULL makes an acknowledged write
        # survive power loss; IMMEDIATE takes the write lock at BEGIN, because a deferred
        # transaction that has to upgrade its lock fails at once with "database is locked" when
        # another worker writes, busy timeout or not.
        options = {'pragmas': {'journal_mode': 'wal', 'synchronous': 'full'}, 'timeout': 5, 'lock_type': 'IMMEDIATE'}
    elif url.startswith(('postgres', 'psycopg')):
        # An unreachable server must fail fast (503), never hold a worker. A runaway statement
        # too: its timeout is the database's default (create_schema), not a startup option,
        # which PgBouncer refuses.
        options = {'connect_timeout': parse(url).get('connect_timeout', 3)}
    # A bjoern worker is one thread, so Peewee's per-thread connection state (a threading.local,
    # read on every query) buys nothing: plain state saves ~40 ns a query.
    db = connect(url, thread_safe=False, **options)
    database.initialize(db)
    return db


# In a child after fork(), the connection state that came from the parent is dropped without closing:
# closing would end the parent's session on the shared socket; using it would mix two processes'
# queries on one connection (a pool's close() only returns it to the pool).
os.register_at_fork(after_in_child=lambda: database.obj and database.obj.dispose())


def schema_statements(db):
    """(TABLE or INDEX, its name, its statement) for each CREATE in schema.sql, in this database's dialect."""
    with open(SCHEMA_FILE) as f:
        sql = ''.join(line for line in f if not line.lstrip().startswith('--'))
    if isinstance(db, PostgresqlDatabase):
        sql = sql.replace('INTEGER PRIMARY KEY AUTOINCREMENT', 'BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY')
    return [(*re.match(r'\s*CREATE (TABLE|INDEX) IF NOT EXISTS (\w+)', statement).groups(), statement)
            for statement in filter(str.strip, sql.split(';'))]


def create_schema(db):
    """Create what schema.sql defines and is missing, never dropping data; return the indexes it may not create."""
    existing, refused = set(db.get_tables()), []
    with db.atomic():
        existing.update([index.name for table in existing for index in db.get_indexes(table)])
        for kind, name, statement in schema_statements(db):
            # Skipped when it exists: even IF NOT EXISTS needs the CREATE privilege (or owning the
            # table), which the service's least-privilege role does not have (docs/security.md).
            if name in existing and kind == 'TABLE':  # made by an older version: add the columns since
                columns = [column.name for column in db.get_columns(name)]
                for column in re.findall(r'^ +(\w.*?),?$', statement, re.M):  # one a line, defined as there
                    if column.split()[0] not in columns:
                        db.execute_sql(f'ALTER TABLE {name} ADD COLUMN {column}')
            elif name not in existing:
                try:
                    with db.atomic():
                        db.execute_sql(statement)
                except ProgrammingError:
                    if kind == 'TABLE':
                        raise
                    refused.append(' '.join(statement.split()))
        if isinstance(db, PostgresqlDatabase) and db.execute_sql('SHOW statement_timeout').fetchone()[0] == '0':
            # NOTE: a pooler in transaction mode gives each transaction any server connection, so
            # the timeout must hold in every session: the database's default does (needs its owner,
            # as init-db is run). SET makes this connection, which a pooler keeps, agree at once.
            db.execute_sql("DO $$BEGIN EXECUTE 'ALTER DATABASE ' || quote_ident(current_database()) || "
                           "' SET statement_timeout = 5000'; END$$")
            db.execute_sql('SET statement_timeout = 5000')
    return refused


def drop_list_indexes(db):  # for bulk loads: create_schema() then rebuilds them, 3x faster than row by row
    for name in [name for kind, name, _ in schema_statements(db) if kind == 'INDEX']:
        db.execute_sql(f'DROP INDEX IF EXISTS {name}')


class WriteTurn:
    """The start of every write. SQLite lets one writer in at a time and makes the others poll with
    growing sleeps (a create p99 of ~0.7 s with two workers); waiting on a flock beside the file hands
    the turn over at once. A turn is refused (503) unless the connection's file is still the one at the
    path: a worker holding a deleted file open would otherwise acknowledge writes that no restart can
    find. On PostgreSQL a turn starts on a connection the server has not closed (see __enter__)."""

    def __init__(self, db):
        self.db = db
        self.path = db.database if isinstance(db, SqliteDatabase) else None
        self.fd = self.pid = self.connection = self.file = None

    def check_file(self):
        if self.path:
            try:
                found = os.stat(self.path)
            except OSError as error:
                raise OperationalError(f'the database file is gone: {error}') from None
            connection = self.db.connection()
            if connection is not self.connection:  # a connection new to this check opened what is there now
                self.connection, self.file = connection, (found.st_dev, found.st_ino)
            elif self.file != (found.st_dev, found.st_ino):
                raise OperationalError('the database file was replaced since this connection opened it')

    def __enter__(self):
        if not self.path:
            # NOTE: a write may not be repeated (it may have committed), so a connection the server closed
            # while it sat idle (a restart, an outage that has ended) is found before the first statement:
            # an idle connection with something to read holds only the server's goodbye.
            if not self.db.is_closed() and select.select([self.db.connection()], [], [], 0)[0]:
                self.db.close()
            return
        self.check_file()
        try:
            if self.pid != os.getpid():  # a lock file opened before fork() would be shared, so open per process
                self.fd, self.pid = os.open(self.path + '.write-lock', os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as error:
            raise OperationalError(f'the write lock is unavailable: {error}') from None

    def __exit__(self, *exc):
        if self.path:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
