"""People: the models, the field rules, and every query the service runs on them. Resources call
`People`; nothing outside this module queries the people table (storage.py reaches the database)."""
import contextlib
import hashlib
import json
import re
import secrets
import time
from typing import NamedTuple

from peewee import (BigAutoField, BigIntegerField, Case, IntegerField, IntegrityError, Model, PostgresqlDatabase,
                    TextField)
from peewee import __exception_wrapper__ as driver_errors_as_peewee_errors

from storage import WriteTurn, database

MAX_ID = 2**63 - 1  # the largest id either backend can store
NO_NUL = '^[^\\u0000]*$'  # PostgreSQL cannot store NUL in text, so neither backend accepts it

# The field rules of a person, in JSON Schema: validate() enforces them, /openapi.json publishes
# them, and schema.sql's CHECKs repeat them (tests/test_schema.py keeps the three equal).
FIELDS = {
    'name': {'type': 'string', 'minLength': 1, 'maxLength': 200, 'pattern': NO_NUL},
    'age': {'type': 'integer', 'minimum': 0, 'maximum': 150},
    'locale': {'type': 'string', 'minLength': 1, 'maxLength': 64, 'pattern': NO_NUL},
}

# field_problem's patterns, compiled once: re.fullmatch(pattern, ...) looks each up in re's cache every call
PATTERNS = {rule['pattern']: re.compile(rule['pattern']) for rule in FIELDS.values() if 'pattern' in rule}


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
    revoked_at = BigIntegerField(default=0)  # 0: live
    last_used_at = BigIntegerField(default=0)  # 0: never
    requests = BigIntegerField(default=0)  # both added to by People.record_use, at most once a minute

    class Meta:
        database = database
        table_name = 'tokens'


class IdempotencyKey(Model):
    key = TextField(primary_key=True)
    fingerprint = TextField()
    response = TextField()  # the person (or people) as first created, in JSON
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
    return list(Token.select().order_by(Token.name).dicts())  # secrets are not stored: only their hashes


def revoke_token(name):
    """Mark a live token revoked; the row stays, so its name and secret are never handed out again."""
    return Token.update(revoked_at=int(time.time())).where(Token.name == name, Token.revoked_at == 0).execute() > 0


COLUMNS = (Person.id, Person.name, Person.age, Person.locale, Person.version)


class Filter(NamedTuple):
    """A list filter: its rule (published in /openapi.json), and its condition in SQL in two forms: one an
    index of schema.sql serves, and one no index serves, which makes the planner walk the index of the
    filter that drives the page instead (see find_page)."""
    rule: dict
    indexed: str
    unindexed: str


FILTERS = {  # query parameter -> its Filter
    'locale': Filter(FIELDS['locale'], 'locale = {p}', "locale || '' = {p}"),
    'name': Filter(FIELDS['name'], 'name = {p}', "name || '' = {p}"),
    'age_min': Filter(FIELDS['age'], 'age >= {p}', 'age + 0 >= {p}'),
    'age_max': Filter(FIELDS['age'], 'age <= {p}', 'age + 0 <= {p}'),
}
class PageQuery(NamedTuple):
    """The statements of a list page for one combination of filters."""
    driver: str  # the filter whose index the page walks ('': the key's)
    scan: str | None  # finds the last row a request may examine; None when one index serves every filter
    page: str


SCAN_LIMIT = 100  # the most rows a filtered list request examines (bench/: PostgreSQL is 2.2x the first page at 200)


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
    elif type(value) is not str:
        return 'must be a string'
    elif not rule['minLength'] <= len(value) <= rule['maxLength']:
        return f"must be {rule['minLength']} to {rule['maxLength']} characters long"
    elif not PATTERNS[rule['pattern']].fullmatch(value):
        return 'must not contain the NUL character'
    return None


def validate(body, partial=False):
    """The writable fields of `body` in FIELDS order, or ValidationError naming every bad field."""
    errors = [(name, 'is not a field of a person') for name in body if name not in FIELDS]
    for name, rule in FIELDS.items():
        if name in body:
            if problem := field_problem(body[name], rule):
                errors.append((name, problem))
        elif not partial:
            errors.append((name, 'is required'))
    if errors:
        raise ValidationError([{'pointer': '#/' + name.replace('~', '~0').replace('/', '~1'), 'detail': detail}
                               for name, detail in errors])
    return {name: body[name] for name in FIELDS if name in body}


def as_person(row):
    return {'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]}


class People:
    """The queries of the people (and the tokens' look-up) on one database. Methods return (person, version)
    pairs. They query two ways: Peewee builds and compiles a query to SQL on every call (~70 us of a ~110 us
    read, ~90 us of an insert), so the statements of every request (the read by id, the insert, the list
    pages, the token look-up) are compiled once per database and run as plain SQL by run(); the rest use
    Peewee's query builder, which reads as Python. bench/ measures the difference."""

    def __init__(self, db, scan_limit=SCAN_LIMIT):
        self.db, self.scan_limit = db, scan_limit
        self.write_turn = WriteTurn(db)
        self.purged_at = 0.0
        self.select_by_id = Person.select(*COLUMNS).where(Person.id == 0).sql()[0]
        self.insert = Person.insert(dict.fromkeys(FIELDS, 0)).sql()[0]  # parameters: FIELDS, then version
        self.page_queries = {}  # filter names -> their PageQuery (compile_page)
        self.select_token = Token.select(Token.scope, Token.expires_at, Token.name).where(
            Token.secret_hash == '', Token.revoked_at == 0).sql()[0]

    def run(self, sql, params, is_read=False):
        """A cursor that has run compiled SQL: execute_sql() less its query logging. A read whose connection
        broke (a server restart, an ended outage) runs again on a new one: no client sees an outage after it ended."""
        try:  # NOTE: not `with driver_errors_as_peewee_errors:` around it: entering it costs each read
            # Peewee's open connection, else a new one: db.cursor() less two calls (~900 instructions).
            cursor = (self.db._state.conn or self.db.connection()).cursor()
            cursor.execute(sql, params)
            return cursor
        except Exception:  # psycopg2 marks a connection it found broken closed
            if is_read and getattr(self.db.connection(), 'closed', 0):
                self.discard_connection()
                return self.run(sql, params)
            with driver_errors_as_peewee_errors:
                raise

    def find_token(self, secret_hash):
        """(scope, expires_at, name) of the live token with this hash, or None (the Guard's look-up)."""
        return self.run(self.select_token, (secret_hash, 0), is_read=True).fetchone()

    def find(self, person_id):
        row = self.run(self.select_by_id, (person_id,), is_read=True).fetchone()
        # as_person(row), written out: a read is the hot path, and a call costs ~1,000 instructions
        return None if row is None else ({'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]}, row[4])

    def find_page(self, after, limit, **filters):
        """Up to `limit` people with ids above `after`, and the next page's `after` (None at the end). Keyset
        paging; a filtered page examines at most `scan_limit` rows, so it may be short (even empty)."""
        if filters.get('age_min', 0) > filters.get('age_max', FIELDS['age']['maximum']):
            return [], None  # no age is in the range: nothing to walk
        names = tuple(name for name in FILTERS if name in filters)
        query = self.page_queries.get(names)
        if query is None:  # compiled once per combination of filters, as the hot statements are
            query = self.page_queries[names] = self.compile_page(names)
        driving = (filters[query.driver],) if query.driver else ()
        last = None  # the last row this request may examine, when the page is filtered further (None: the end)
        if query.scan:
            found = self.run(query.scan, (*driving, after, self.scan_limit - 1), True).fetchone()
            last = found and found[0]
        further = (self.scan_limit, *(filters[name] for name in names if name != query.driver)) if query.scan else ()
        rows = self.run(query.page, (*driving, after, last or MAX_ID, *further, limit + 1), True).fetchall()
        items = [as_person(row) for row in rows[:limit]]
        return items, items[-1]['id'] if len(rows) > limit else last

    def compile_page(self, names):
        """The PageQuery of a combination of filters, in this database's dialect."""
        p = self.db.param
        driver = next((name for name in ('name', 'locale') if name in names), '')  # indexed, most selective first
        driving = FILTERS[driver].indexed.format(p=p) + ' AND ' if driver else ''
        page = f'SELECT id, name, age, locale, version FROM people WHERE {driving}id > {p} AND id <= {p} ORDER BY id LIMIT {p}'
        if names in ((), (driver,)):  # one index serves every filter: the page is its next rows
            return PageQuery(driver, None, page)
        # The rows examined: the next scan_limit of the driver's index (or of the key), up to `last`, the
        # last of them; the other filters then apply outside, in a form no index serves, so no planner
        # walks their index (not in id order) instead.
        further = ' AND '.join(FILTERS[name].unindexed.format(p=p) for name in names if name != driver)
        return PageQuery(driver, f'SELECT id FROM people WHERE {driving}id > {p} ORDER BY id LIMIT 1 OFFSET {p}',
                         f'SELECT * FROM ({page}) examined WHERE {further} ORDER BY id LIMIT {p}')

    def create(self, fields, key=None, caller=''):
        """(the person or people made of validated `fields`, or of a list of them: all or none; whether they are
        new). With an idempotency `key`, a create the same `caller` already made with it is answered again instead."""
        if key is not None:
            # Keys belong to the client that sent them: stored as a hash of both, another's is never found.
            return self.create_once(fields, hashlib.sha256(f'{caller}\n{key}'.encode()).hexdigest())
        with self.write_turn:
            return self.insert_people(fields), True

    def insert_people(self, fields):
        if isinstance(fields, dict):
            cursor = self.run(self.insert, (*fields.values(), 1))
            person_id = cursor.fetchone()[0] if self.db.returning_clause else cursor.lastrowid  # PostgreSQL: RETURNING
            return {'id': person_id, **fields}
        # NOTE: one multi-row INSERT, one statement and one round trip for the batch (atomic on its own). Rows
        # take their ids in the order of VALUES on both backends (as Django's bulk_create relies on), so the
        # ids sorted are the people's in the order sent, whatever order RETURNING lists them in.
        values = ', '.join([f'({self.db.param}, {self.db.param}, {self.db.param}, 1)'] * len(fields))
        cursor = self.run(f'INSERT INTO people (name, age, locale, version) VALUES {values} RETURNING id',
                          [value for person in fields for value in person.values()])
        return [{'id': person_id, **person} for (person_id,), person in zip(sorted(cursor.fetchall()), fields)]

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
                        return json.loads(earlier.response), False
                    created = self.insert_people(fields)
                    IdempotencyKey.create(key=key, fingerprint=fingerprint, response=json.dumps(created),
                                          created_at=int(time.time()))
                    return created, True
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

    def record_use(self, used):
        """Add to each token its requests and last use counted since the last call ({name: (requests, when)})."""
        with self.write_turn, self.db.atomic():
            for name, (requests, when) in used.items():
                later = Case(None, [(Token.last_used_at < int(when), int(when))], Token.last_used_at)
                Token.update(requests=Token.requests + requests, last_used_at=later).where(Token.name == name).execute()

    def seed(self, first, last):
        """Insert generated people numbered first..last, the same for the same numbers."""
        # NOTE: the database makes the rows itself: ~1 s per million on SQLite; Peewee building them took ~32 s.
        p, is_postgres = self.db.param, isinstance(self.db, PostgresqlDatabase)
        mod = '%%' if is_postgres else '%'  # psycopg2 reads a lone % as a placeholder
        mix = '(n * 2654435761 & 4294967295)'  # a multiplicative hash of the number
        names, locales = (' '.join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(values.split())) for values in
                          ('ann bob cleo dev eva finn gus hana ivo june kai lea', 'NYC LA SF CHI BER PAR TOK SYD'))
        with self.write_turn, self.db.atomic():
            self.run(f"INSERT INTO people (name, age, locale) WITH RECURSIVE seq(n) AS (SELECT CAST({p} AS BIGINT) "
                     f"UNION ALL SELECT n + 1 FROM seq WHERE n < {p}) SELECT (CASE {mix} / 151 {mod} 12 {names} END) || ' ' "
                     f"|| CAST(n * 7919 {mod} 1000003 AS TEXT), {mix} {mod} 151, CASE {mix} / 1812 {mod} 8 {locales} END FROM seq", (first, last))
            if is_postgres:  # NOTE: until autovacuum analyzes, PostgreSQL planned a filtered page at ~30 ms, not ~0.1
                self.run('ANALYZE people', ())

    def update(self, person_id, changes, matches=None):
        """Apply validated `changes`; `matches(version)` is the If-Match guard against lost updates."""
        with self.write_turn, self.db.atomic():
            person, version = self._locked(person_id, matches)
            if changes:
                Person.update(**changes, version=Person.version + 1).where(Person.id == person_id).execute()
                person.update(changes)
                version += 1
            return person, version

    def delete(self, person_id, matches=None):
        with self.write_turn, self.db.atomic():
            found = self._locked(person_id, matches)
            Person.delete().where(Person.id == person_id).execute()
            return found

    def _locked(self, person_id, matches):
        """(the person, its version), its row locked until the transaction ends; StaleVersion unless it `matches`."""
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
        """Raise unless the database answers, is the file on disk (SQLite) and has the tables."""
        self.write_turn.check_file()
        self.run('SELECT 1 FROM people, tokens, idempotency_keys LIMIT 1', (), is_read=True).fetchall()

    def discard_connection(self):
        """Drop a connection that failed, so the next query opens a fresh one."""
        with contextlib.suppress(Exception):
            self.db.close()  # forgets the connection even when closing it fails
