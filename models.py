"""People storage: the Person model, the field rules, and every query the service runs.

Resources call `People`; nothing outside this module writes SQL or opens a transaction.
"""
import fcntl
import hashlib
import json
import os
import re
import secrets
import time

from peewee import (BigAutoField, BigIntegerField, DatabaseProxy, IntegerField, IntegrityError, Model,
                    PostgresqlDatabase, SqliteDatabase, TextField)
from peewee import __exception_wrapper__ as driver_errors_as_peewee_errors
from playhouse.db_url import connect, parse

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'schema.sql')
MAX_ID = 2**63 - 1  # the largest id either backend can store
NO_NUL = '^[^\\u0000]*$'  # PostgreSQL cannot store NUL in text, so neither backend accepts it

# The field rules of a person, in JSON Schema: validate() enforces them, /openapi.json publishes
# them, and schema.sql's CHECKs repeat them (tests/test_schema.py keeps the three equal).
FIELDS = {
    'name': {'type': 'string', 'minLength': 1, 'maxLength': 200, 'pattern': NO_NUL},
    'age': {'type': 'integer', 'minimum': 0, 'maximum': 150},
    'locale': {'type': 'string', 'minLength': 1, 'maxLength': 64, 'pattern': NO_NUL},
}

database = DatabaseProxy()  # bound by open_database(), so one module serves any DATABASE_URL


class Person(Model):
    id = BigAutoField()
    name = TextField()
    age = IntegerField()
    locale = TextField()
    version = IntegerField(default=1)  # bumped by every update; the ETag, never shown

    class Meta:
        database = database
        table_name = 'people'


class Token(Model):
    name = TextField(primary_key=True)
    secret_hash = TextField(unique=True)
    scope = TextField()
    created_at = BigIntegerField()
    expires_at = BigIntegerField()

    class Meta:
        database = database
        table_name = 'tokens'


class IdempotencyKey(Model):
    key = TextField(primary_key=True)
    fingerprint = TextField()
    response = TextField()  # the person as first created, in JSON
    created_at = BigIntegerField()

    class Meta:
        database = database
        table_name = 'idempotency_keys'


KEY_LIFETIME = 24 * 3600

SCOPES = ('read', 'write')


def hash_secret(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(name, scope, ttl_seconds):
    """Store a new token and return its secret, which exists nowhere else afterwards."""
    secret = 'people_' + secrets.token_urlsafe(32)
    now = int(time.time())
    Token.create(name=name, secret_hash=hash_secret(secret), scope=scope, created_at=now, expires_at=now + ttl_seconds)
    return secret


def list_tokens():
    return list(Token.select(Token.name, Token.scope, Token.created_at, Token.expires_at).order_by(Token.name).dicts())


def revoke_token(name):
    return Token.delete().where(Token.name == name).execute() > 0


def find_token(secret_hash):
    """(scope, expires_at) of the token with this hash, or None."""
    return Token.select(Token.scope, Token.expires_at).where(Token.secret_hash == secret_hash).tuples().first()


COLUMNS = (Person.id, Person.name, Person.age, Person.locale, Person.version)

# The list filters: query parameter -> (its rule, the condition it adds). Also published in /openapi.json.
FILTERS = {
    'locale': (FIELDS['locale'], lambda value: Person.locale == value),
    'name': (FIELDS['name'], lambda value: Person.name == value),
    'age_min': (FIELDS['age'], lambda value: Person.age >= value),
    'age_max': (FIELDS['age'], lambda value: Person.age <= value),
}


class ValidationError(Exception):
    """A body that breaks the field rules; `errors` has one RFC 9457 entry per bad field."""

    def __init__(self, errors):
        super().__init__(errors)
        self.errors = errors


class StaleVersion(Exception):
    """The client's If-Match names a version that is no longer current."""


class KeyReused(Exception):
    """An Idempotency-Key came back with a different body."""


def field_problem(value, rule):
    """What is wrong with one value under one rule of FIELDS, or None."""
    if rule['type'] == 'integer':
        # NOTE: bool is an int in Python, and 42.0 or "42" are not integers in JSON Schema terms.
        if type(value) is not int:
            return 'must be an integer'
        if not rule['minimum'] <= value <= rule['maximum']:
            return f"must be between {rule['minimum']} and {rule['maximum']}"
        return None
    if type(value) is not str:
        return 'must be a string'
    if not rule['minLength'] <= len(value) <= rule['maxLength']:
        return f"must be {rule['minLength']} to {rule['maxLength']} characters long"
    if not re.fullmatch(rule['pattern'], value):
        return 'must not contain the NUL character'
    return None


def validate(body, partial=False):
    """The writable fields of `body` in FIELDS order, or ValidationError naming every bad field."""
    errors = [(name, 'is not a field of a person') for name in body if name not in FIELDS]
    for name, rule in FIELDS.items():
        if name in body:
            problem = field_problem(body[name], rule)
            if problem:
                errors.append((name, problem))
        elif not partial:
            errors.append((name, 'is required'))
    if errors:
        raise ValidationError([{'pointer': '#/' + name.replace('~', '~0').replace('/', '~1'), 'detail': detail}
                               for name, detail in errors])
    return {name: body[name] for name in FIELDS if name in body}


def open_database(url):
    """The database DATABASE_URL names, bound to the models. Connections open lazily, in the
    process that first queries, so a master can open it and then fork workers."""
    options = {}
    if url.startswith('sqlite'):
        # WAL lets readers run beside the writer; synchronous=FULL makes an acknowledged write
        # survive power loss; IMMEDIATE takes the write lock at BEGIN, because a deferred
        # transaction that has to upgrade its lock fails at once with "database is locked" when
        # another worker writes, busy timeout or not.
        options = {'pragmas': {'journal_mode': 'wal', 'synchronous': 'full'}, 'timeout': 5,
                   'lock_type': 'IMMEDIATE'}
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


def create_schema(db):
    """Create what schema.sql defines and is missing; never drops or changes data."""
    with open(SCHEMA_FILE) as f:
        sql = ''.join(line for line in f if not line.lstrip().startswith('--'))
    if isinstance(db, PostgresqlDatabase):
        sql = sql.replace('INTEGER PRIMARY KEY AUTOINCREMENT', 'BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY')
    existing = set(db.get_tables())
    with db.atomic():
        for statement in filter(str.strip, sql.split(';')):
            # Skipped when the table exists: even IF NOT EXISTS needs the CREATE privilege, which the
            # service's least-privilege role does not have (README, Security).
            table = re.match(r'\s*CREATE TABLE IF NOT EXISTS (\w+)', statement)
            if not (table and table[1] in existing):
                db.execute_sql(statement)
        if isinstance(db, PostgresqlDatabase) and db.execute_sql('SHOW statement_timeout').fetchone()[0] == '0':
            # NOTE: a pooler in transaction mode gives each transaction any server connection, so
            # the timeout must hold in every session: the database's default does (needs its owner,
            # as init-db is run). SET makes this connection, which a pooler keeps, agree at once.
            db.execute_sql("DO $$BEGIN EXECUTE 'ALTER DATABASE ' || quote_ident(current_database()) || "
                           "' SET statement_timeout = 5000'; END$$")
            db.execute_sql('SET statement_timeout = 5000')


def as_person(row):
    return {'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]}


class WriteTurn:
    """SQLite lets one writer in at a time and makes the others poll with growing sleeps (a create
    p99 of ~0.7 s with two workers); waiting on a flock beside the file hands the turn over at once."""

    def __init__(self, db):
        self.path = db.database + '.write-lock' if isinstance(db, SqliteDatabase) else None
        self.fd = self.pid = None

    def __enter__(self):
        if self.path:
            if self.pid != os.getpid():  # a lock file opened before fork() would be shared, so open per process
                self.fd, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        if self.path:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class People:
    """The people table's queries on one database. Methods return (person, version) pairs."""

    def __init__(self, db):
        self.db = db
        self.write_turn = WriteTurn(db)
        self.purged_at = 0.0
        # NOTE: Peewee builds and compiles a query to SQL on every call: ~70 us of a ~110 us read
        # and ~90 us of an insert. The two hot statements are compiled once here, per database,
        # and run as plain SQL on Peewee's connection; bench/ measures the difference.
        self.select_by_id = Person.select(*COLUMNS).where(Person.id == 0).sql()[0]
        self.insert = Person.insert(dict.fromkeys(FIELDS, 0)).sql()[0]  # parameters: FIELDS, then version
        self.page_sql = {}  # filter names -> the list query; parameters: after, filter values, limit

    def run(self, sql, params):
        """A cursor that has run compiled SQL: what execute_sql() does, less its query logging."""
        try:  # NOTE: not `with driver_errors_as_peewee_errors:` around it: entering it costs each read
            cursor = self.db.cursor()
            cursor.execute(sql, params)
            return cursor
        except Exception:
            with driver_errors_as_peewee_errors:
                raise

    def find(self, person_id):
        row = self.run(self.select_by_id, (person_id,)).fetchone()
        return None if row is None else (as_person(row), row[4])

    def find_page(self, after, limit, **filters):
        """Up to `limit` people with ids above `after`, and whether more follow. Keyset paging, no
        OFFSET: a page deep in the table costs what the first costs."""
        names = tuple(name for name in FILTERS if name in filters)
        sql = self.page_sql.get(names)
        if sql is None:  # compiled once per combination of filters, as the hot statements are
            query = Person.select(*COLUMNS).where(Person.id > 0)
            for name in names:
                query = query.where(FILTERS[name][1](0))
            sql = self.page_sql[names] = query.order_by(Person.id).limit(1).sql()[0]
        rows = self.run(sql, (after, *(filters[name] for name in names), limit + 1)).fetchall()
        return [as_person(row) for row in rows[:limit]], len(rows) > limit

    def create(self, fields, key=None):
        """Insert validated `fields` (in FIELDS order, as validate() returns them). With an
        idempotency `key`, a create already made with it is answered again instead."""
        if key is not None:
            return self.create_once(fields, key)
        with self.write_turn:
            return self.insert_person(fields)

    def insert_person(self, fields):
        cursor = self.run(self.insert, (*fields.values(), 1))
        person_id = cursor.fetchone()[0] if self.db.returning_clause else cursor.lastrowid  # PostgreSQL: RETURNING
        return {'id': person_id, **fields}, 1

    def create_once(self, fields, key):
        fingerprint = hashlib.sha256(json.dumps(fields).encode()).hexdigest()
        self.purge_keys()
        for attempt in range(2):
            try:
                with self.write_turn, self.db.atomic():
                    earlier = IdempotencyKey.get_or_none(IdempotencyKey.key == key)
                    if earlier is not None:
                        if earlier.fingerprint != fingerprint:
                            raise KeyReused
                        return json.loads(earlier.response), 1
                    person, version = self.insert_person(fields)
                    IdempotencyKey.create(key=key, fingerprint=fingerprint, response=json.dumps(person),
                                          created_at=int(time.time()))
                    return person, version
            except IntegrityError:
                # PostgreSQL: a concurrent create with the same key committed first; this
                # transaction (its person included) rolled back, and the second pass answers with theirs.
                if attempt:
                    raise

    def purge_keys(self):
        """Forget keys older than KEY_LIFETIME, at most once a minute per process."""
        now = time.time()
        if now - self.purged_at > 60:
            self.purged_at = now
            with self.write_turn:
                IdempotencyKey.delete().where(IdempotencyKey.created_at < now - KEY_LIFETIME).execute()

    def create_many(self, people):
        """Insert already-validated people in one transaction (seeding and bulk loads)."""
        with self.write_turn, self.db.atomic():
            Person.insert_many(people, fields=list(FIELDS)).execute()

    def update(self, person_id, changes, matches=None):
        """Apply validated `changes`; `matches(version)` is the If-Match guard against lost updates."""
        with self.write_turn, self.db.atomic():
            person, version = self._lock(person_id, matches)
            if changes:
                Person.update(**changes, version=Person.version + 1).where(Person.id == person_id).execute()
                person.update(changes)
                version += 1
            return person, version

    def delete(self, person_id, matches=None):
        with self.write_turn, self.db.atomic():
            found = self._lock(person_id, matches)
            Person.delete().where(Person.id == person_id).execute()
            return found

    def _lock(self, person_id, matches):
        query = Person.select(*COLUMNS).where(Person.id == person_id)
        if self.db.for_update:  # PostgreSQL locks the row; SQLite's BEGIN IMMEDIATE already locked the file
            query = query.for_update()
        row = query.tuples().first()
        if row is None:
            raise Person.DoesNotExist
        if matches is not None and not matches(row[4]):
            raise StaleVersion
        return as_person(row), row[4]

    def ping(self):
        self.run('SELECT 1', ()).fetchone()

    def discard_connection(self):
        """Drop a connection that failed, so the next query opens a fresh one."""
        try:
            self.db.close()  # forgets the connection even when closing it fails
        except Exception:
            pass
