"""Use by client: requests by token name in /metrics (bounded), each token's requests and last use in the
database (written at most once a minute per worker, and when a worker leaves), revoked tokens kept and listed,
and older databases and backups brought up to the tokens table with those columns."""
import re
import subprocess
import sys
import time

import pytest

import models
import storage
import telemetry
from conftest import ROOT, Server, status_with_token

OLD_TOKENS = """CREATE TABLE tokens (
    name        TEXT    NOT NULL PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    secret_hash TEXT    NOT NULL UNIQUE,
    scope       TEXT    NOT NULL CHECK (scope IN ('read', 'write')),
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL
)"""  # as schema.sql made it before tokens kept their use and revocation


def cli(database_url, *args):
    return subprocess.run([sys.executable, 'service.py', *args], cwd=ROOT, capture_output=True, text=True,
                          env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'})


def token_series(client):
    text = client.get('/metrics').text
    return {match[:3]: int(match[3]) for match in re.findall(
        r'^people_token_requests_total\{token="((?:[^"\\]|\\.)*)",route="([^"]*)",status="(\dxx)"\} (\d+)$', text, re.M)}


def test_metrics_count_requests_by_token_name_route_and_status_class(secure):
    client = secure.make()
    read = models.list_tokens()[0]['name']  # read-..., then write-...
    for _ in range(3):
        client.get('/resources/data/', headers=secure.auth('read'))
    client.post_json('/resources/data/', {'name': 'x', 'age': 1, 'locale': 'x'}, headers=secure.auth('read'), status=403)
    client.get('/resources/data/', status=401)
    client.get('/resources/data/', headers={'Authorization': 'Bearer people_made-up'}, status=401)
    series = token_series(client)
    # The Guard refuses before routing, so refusals count under the route 'unmatched', as in http_requests_total.
    assert series == {(read, '/resources/data/', '2xx'): 3, (read, 'unmatched', '4xx'): 1, ('-', 'unmatched', '4xx'): 2}
    assert all(secret not in client.get('/metrics').text for secret in secure.tokens.values())


def test_token_names_past_the_cap_share_the_other_series_and_are_escaped(secure, monkeypatch):
    monkeypatch.setattr(telemetry, 'MAX_TOKEN_NAMES', 2)
    client = secure.make()
    names = ['a"quote', 'b\\slash', 'c', 'd']
    secrets = [models.create_token(name, 'read', 60) for name in names]
    for secret in secrets:
        client.get('/resources/data/', headers={'Authorization': f'Bearer {secret}'})
    assert token_series(client) == {('a\\"quote', '/resources/data/', '2xx'): 1,
                                    ('b\\\\slash', '/resources/data/', '2xx'): 1, ('other', '/resources/data/', '2xx'): 2}


def test_token_use_is_written_at_most_once_a_minute_not_a_request(secure, monkeypatch):
    client = secure.make()
    middleware = next(m for m in client.app._unprepared_middleware if isinstance(m, telemetry.Telemetry))
    writes, record = [], middleware.record_use
    monkeypatch.setattr(middleware, 'record_use', lambda used: writes.append(dict(used)) or record(used))
    for _ in range(50):
        client.get('/resources/data/', headers=secure.auth('read'))
    assert writes == [] and {t['requests'] for t in models.list_tokens()} == {0}
    middleware.use_due = time.monotonic()  # a minute on
    started = time.time()
    client.get('/resources/data/', headers=secure.auth('write'))
    assert len(writes) == 1 and sorted(n for n, _ in writes[0].values()) == [1, 50]
    listed = {t['scope']: t for t in models.list_tokens()}
    assert listed['read']['requests'] == 50 and listed['write']['requests'] == 1
    assert started - 60 <= listed['read']['last_used_at'] <= listed['write']['last_used_at'] <= time.time()
    for _ in range(10):
        client.get('/resources/data/', headers=secure.auth('read'))
    assert len(writes) == 1 and middleware.use_due > time.monotonic() + 50  # the next write is a minute away


def test_a_failed_write_of_token_use_fails_no_request_and_is_kept_for_the_next(secure, monkeypatch):
    client = secure.make()
    middleware = next(m for m in client.app._unprepared_middleware if isinstance(m, telemetry.Telemetry))
    record = middleware.record_use

    def broken(used):
        raise models.OperationalError('disk I/O error')
    monkeypatch.setattr(middleware, 'record_use', broken)
    middleware.use_due = 0
    client.get('/resources/data/', headers=secure.auth('read'), status=200)
    assert middleware.used and models.list_tokens()[0]['requests'] == 0
    monkeypatch.setattr(middleware, 'record_use', record)
    middleware.use_due = 0
    client.get('/resources/data/', headers=secure.auth('read'), status=200)
    assert models.list_tokens()[0]['requests'] == 2 and not middleware.used


def test_token_list_shows_the_use_of_real_requests_once_the_workers_leave(database_url):
    secrets = {name: cli(database_url, 'token', 'create', '--name', name, '--scope', 'read').stdout.strip()
               for name in ('ci', 'idle')}
    server = Server(database_url, workers=2, PEOPLE_AUTH='on')
    try:
        assert [status_with_token(server.url + '/resources/data/', secrets['ci']) for _ in range(30)] == [200] * 30
        assert status_with_token(server.url + '/resources/data/', 'made-up') == 401
    finally:
        server.stop()  # each worker drains, and writes what it counted as it leaves
    listed = cli(database_url, 'token', 'list').stdout
    assert re.search(r'^ci\tread\texpires [^\t]+\tlast used \d{4}-\d\d-\d\d \d\d:\d\d UTC\t30 requests$', listed, re.M)
    assert re.search(r'^idle\tread\texpires [^\t]+\tnever used\t0 requests$', listed, re.M), listed


def test_a_revoked_token_is_listed_as_revoked_refused_and_its_name_never_reused(secure):
    client = secure.make()
    name = next(t['name'] for t in models.list_tokens() if t['scope'] == 'read')
    assert models.revoke_token(name) and not models.revoke_token(name)
    assert models.People(models.database.obj).find_token(models.hash_secret(secure.tokens['read'])) is None
    revoked = next(t for t in models.list_tokens() if t['name'] == name)
    assert time.time() - 5 < revoked['revoked_at'] <= time.time()
    client.get('/resources/data/', headers=secure.auth('read'), status=401)
    with pytest.raises(models.IntegrityError):
        models.create_token(name, 'read', 60)


def make_old_database(url):
    """A database as an older version left it: the tokens table without the columns added since, one token."""
    db = storage.open_database(url)
    storage.create_schema(db)
    db.execute_sql('DROP TABLE tokens')
    db.execute_sql(OLD_TOKENS)
    db.execute_sql(f"INSERT INTO tokens VALUES ('old', {db.param}, 'read', 1, {db.param})",
                   (models.hash_secret('people_old'), int(time.time()) + 3600))
    db.close()


def test_init_db_adds_the_new_columns_to_an_older_tokens_table(database_url):
    make_old_database(database_url)
    assert cli(database_url, 'init-db').returncode == 0
    assert re.search(r'^old\tread\texpires [^\t]+\tnever used\t0 requests$', cli(database_url, 'token', 'list').stdout,
                     re.M)
    storage.open_database(database_url)
    try:
        assert models.People(models.database.obj).find_token(models.hash_secret('people_old'))[::2] == ('read', 'old')
    finally:
        models.database.close()
    assert cli(database_url, 'token', 'revoke', 'old').returncode == 0


def test_a_backup_of_an_upgraded_sqlite_database_restores(tmp_path):
    """ALTER TABLE writes the table's SQL its own way: restore's check must still know it for schema.sql's."""
    url = f'sqlite:///{tmp_path}/p.db'
    make_old_database(url)
    assert cli(url, 'init-db').returncode == 0
    assert cli(url, 'token', 'revoke', 'old').returncode == 0
    assert cli(url, 'backup', str(tmp_path / 'b')).returncode == 0
    restored = cli(f'sqlite:///{tmp_path}/fresh.db', 'restore', str(tmp_path / 'b'))
    assert restored.returncode == 0, restored.stderr
    assert '\nold\tread\trevoked' in '\n' + cli(f'sqlite:///{tmp_path}/fresh.db', 'token', 'list').stdout
