"""OWASP API2, broken authentication: every bad credential is refused with 401 and a Bearer
challenge; expiry and revocation take effect, in every worker."""
import subprocess
import sys
import time

import pytest

import models
import security
from conftest import ROOT, Server, status_with_token


def assert_401(response):
    assert response.status_int == 401
    assert response.headers['WWW-Authenticate'].startswith('Bearer')
    assert response.content_type == 'application/problem+json'


@pytest.mark.parametrize('header', [None, '', 'Bearer', 'Bearer ', 'Basic dXNlcjpwYXNz', 'Token abc',
                                    'Bearer people_not-a-real-token', 'Bearer ' + 'x' * 5000])
def test_missing_malformed_or_unknown_token_gives_401(secure, header):
    client = secure.make()
    headers = {} if header is None else {'Authorization': header}
    assert_401(client.get('/resources/data/1', headers=headers, status=401))


def test_scheme_is_case_insensitive(secure):
    client = secure.make()
    token = secure.tokens['read']
    client.get('/resources/data/', headers={'Authorization': f'bearer {token}'}, status=200)


def test_expired_token_gives_401(secure):
    client = secure.make()
    secret = models.create_token('short', 'read', 2)  # expiry is kept in whole seconds: 1-2 s from now
    client.get('/resources/data/', headers={'Authorization': f'Bearer {secret}'}, status=200)
    time.sleep(2.1)  # past the token's life, but well inside the cache time: the cache never outlives expiry
    assert_401(client.get('/resources/data/', headers={'Authorization': f'Bearer {secret}'}, status=401))


def test_revoked_token_gives_401_within_the_cache_time(secure, monkeypatch):
    monkeypatch.setattr(security, 'CACHE_SECONDS', 0.2)
    client = secure.make()
    headers = secure.auth('read')
    client.get('/resources/data/', headers=headers, status=200)
    name = next(t['name'] for t in models.list_tokens() if t['scope'] == 'read')
    assert models.revoke_token(name)
    time.sleep(0.25)
    assert_401(client.get('/resources/data/', headers=headers, status=401))


def test_only_a_hash_is_stored(secure):
    secure.make()
    stored = models.database.obj.execute_sql('SELECT secret_hash FROM tokens').fetchall()
    secrets = set(secure.tokens.values())
    assert all(len(h) == 64 and h not in secrets for (h,) in stored)
    assert {h for (h,) in stored} == {models.hash_secret(s) for s in secrets}


def cli(database_url, *args):
    return subprocess.run([sys.executable, 'service.py', 'token', *args], cwd=ROOT, capture_output=True, text=True,
                          env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'})


def test_token_cli_creates_lists_and_revokes(database_url):
    created = cli(database_url, 'create', '--name', 'ci', '--scope', 'read', '--ttl', '12h')
    assert created.returncode == 0
    secret = created.stdout.splitlines()[-1]
    assert secret.startswith('people_') and len(secret) > 40
    listed = cli(database_url, 'list')
    assert 'ci\tread\texpires' in listed.stdout and secret not in listed.stdout
    assert cli(database_url, 'create', '--name', 'ci', '--scope', 'read').returncode != 0  # names are unique
    assert cli(database_url, 'revoke', 'ci').returncode == 0
    assert 'ci\tread\trevoked' in cli(database_url, 'list').stdout  # kept, so who had access stays answerable
    assert cli(database_url, 'revoke', 'ci').returncode != 0
    assert cli(database_url, 'create', '--name', 'ci', '--scope', 'read').returncode != 0  # never reused


@pytest.mark.parametrize('ttl', ['0', '-5', '10y', 'soon'])
def test_token_cli_refuses_a_bad_ttl(database_url, ttl):
    assert cli(database_url, 'create', '--name', 'x', '--scope', 'read', '--ttl', ttl).returncode != 0


def test_revocation_reaches_every_worker(database_url):
    secret = cli(database_url, 'create', '--name', 'shared', '--scope', 'read').stdout.splitlines()[-1]
    server = Server(database_url, workers=2, PEOPLE_AUTH='on')
    try:
        assert {status_with_token(server.url + '/resources/data/', secret) for _ in range(20)} == {200}  # both cache it
        assert cli(database_url, 'revoke', 'shared').returncode == 0
        deadline = time.monotonic() + security.CACHE_SECONDS + 5
        statuses = {200}
        while time.monotonic() < deadline and statuses != {401}:
            time.sleep(0.5)
            statuses = {status_with_token(server.url + '/resources/data/', secret) for _ in range(10)}
        assert statuses == {401}
    finally:
        server.stop()


def test_serve_refuses_a_public_address_without_auth(database_url):
    result = subprocess.run([sys.executable, 'service.py', 'serve', '--host', '0.0.0.0', '--port', '1'], cwd=ROOT,
                            capture_output=True, text=True, timeout=20,
                            env={'DATABASE_URL': database_url, 'PEOPLE_AUTH': 'off', 'PATH': '/usr/bin:/bin'})
    assert result.returncode != 0 and 'PEOPLE_AUTH=off' in result.stderr


def test_auth_is_on_unless_explicitly_off(secure):
    for value in ('', 'no', 'false', 'OFF '):
        client = secure.make(PEOPLE_AUTH=value)
        assert_401(client.get('/resources/data/', status=401))
