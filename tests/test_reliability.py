"""Retry-safe creates, crashes, outages and odd input: nothing acknowledged is lost, nothing is
created twice, and no request gets a 500."""
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
import storage
from conftest import ROOT, Relay, Server, pg_url_in
from models import FIELDS, ValidationError, validate
from test_server import create_load, stored

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


def rows(client):
    return client.get('/resources/data/?limit=500').json['items']


# -- Idempotency-Key ------------------------------------------------------------------------------

def test_same_key_and_body_answers_the_first_create_again(client):
    first = client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': 'k-1'})
    again = client.put('/resources/data/', 'data=' + quote(json.dumps(PETER)), headers={'Idempotency-Key': 'k-1'},
                       content_type='application/x-www-form-urlencoded')
    assert again.status_int == 201 and again.json == first.json
    assert again.headers['Location'] == first.headers['Location']
    assert len(rows(client)) == 1


def test_same_key_with_another_body_gives_422_and_creates_nothing(client):
    client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': 'k-2'})
    response = client.post_json('/resources/data/', {**PETER, 'age': 43}, headers={'Idempotency-Key': 'k-2'},
                                status=422)
    assert response.content_type == 'application/problem+json' and 'Idempotency-Key' in response.json['detail']
    assert len(rows(client)) == 1


def test_different_keys_create_different_people(client):
    ids = {client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': f'k-{i}'}).json['id']
           for i in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize('key', ['', 'x' * 256, 'has space', 'ünïcode', 'tab\there'])
def test_malformed_key_gives_400(client, key):
    response = client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': key}, status=400)
    assert response.content_type == 'application/problem+json'
    assert rows(client) == []


def test_keys_are_forgotten_after_a_day(client):
    first = client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': 'old'}).json
    models.IdempotencyKey.update(created_at=models.IdempotencyKey.created_at - models.KEY_LIFETIME - 1).execute()
    models.People(models.database.obj).purge_keys()  # what a keyed create does, at most once a minute
    second = client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': 'old'}).json
    assert second['id'] != first['id']
    assert models.IdempotencyKey.select().count() == 1


@pytest.mark.parametrize('tokens', ['on', 'off'])
def test_a_key_belongs_to_the_client_that_sent_it(secure, tokens):
    """Another client reusing a key gets a person of its own: keys are scoped to the token (to the address
    when tokens are off), never answered with another client's person or refused for another's body."""
    client = secure.make(PEOPLE_AUTH=tokens)
    models.create_token('second-writer', 'write', 3600)
    other = models.create_token('other-writer', 'write', 3600)
    if tokens == 'on':
        first, second = secure.auth('write'), {'Authorization': f'Bearer {other}'}
        extra = [{}, {}]
    else:
        first = second = {}
        extra = [{'REMOTE_ADDR': '127.0.0.1'}, {'REMOTE_ADDR': '127.0.0.2'}]
    mine = client.post_json('/resources/data/', PETER, headers={**first, 'Idempotency-Key': 'k'},
                            extra_environ=extra[0]).json
    theirs = client.post_json('/resources/data/', PETER, headers={**second, 'Idempotency-Key': 'k'},
                              extra_environ=extra[1]).json
    assert theirs['id'] != mine['id']
    changed = client.post_json('/resources/data/', {**PETER, 'age': 7}, headers={**second, 'Idempotency-Key': 'k2'},
                               extra_environ=extra[1], status=201).json
    assert client.post_json('/resources/data/', PETER, headers={**first, 'Idempotency-Key': 'k2'},
                            extra_environ=extra[0], status=201).json['id'] != changed['id']
    again = client.post_json('/resources/data/', PETER, headers={**first, 'Idempotency-Key': 'k'},
                             extra_environ=extra[0]).json
    assert again == mine  # and each client's own retry still answers its own person


def test_the_first_requests_after_postgresql_returns_succeed(pg_schema):
    """Every worker's connection died in an outage that has ended: a read finding it broken runs again
    on a new one, and a write finds it broken before its first statement. No client sees the outage."""
    _, schema = pg_schema
    relay = Relay()
    server = Server(pg_url_in(schema, relay.url), workers=2)

    def request(method, path, body=None):  # a new connection each time, so both workers are reached
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        conn.request(method, path, body and json.dumps(body), {'Content-Type': 'application/json'})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    try:
        created = [request('POST', '/resources/data/', PETER) for _ in range(10)]
        for first in ('writes', 'reads'):
            assert {request('GET', '/resources/data/1') for _ in range(20)} == {200}  # every worker connected
            relay.cut()
            relay.restore()
            if first == 'writes':
                statuses = [request('POST', '/resources/data/', PETER) for _ in range(20)]
                assert statuses == [201] * 20
            else:
                statuses = [request('GET', '/readyz') for _ in range(4)]
                statuses += [request('GET', '/resources/data/1') for _ in range(30)]
                assert statuses == [200] * 34
    finally:
        server.stop()
        relay.cut()
    assert created == [201] * 10


def test_clients_behind_a_proxy_with_garbled_hops_do_not_share_keys(secure):
    """Both hops read as 'unknown': with tokens off the two clients once shared one person through a key."""
    client = secure.make(PEOPLE_AUTH='off', PEOPLE_TRUSTED_PROXIES='127.0.0.1/32')
    ids = {client.post_json('/resources/data/', PETER, headers={'Idempotency-Key': 'k', 'X-Forwarded-For': hops},
                            extra_environ={'REMOTE_ADDR': '127.0.0.1'}).json['id'] for hops in ('one', 'two')}
    assert len(ids) == 2


def test_a_token_read_after_postgresql_returns_succeeds(pg_schema):
    """The token lookup is a read too: a token not yet cached, checked on a connection an outage closed,
    is looked up again on a new one instead of answering 503."""
    _, schema = pg_schema
    relay = Relay()
    server = Server(pg_url_in(schema, relay.url), workers=1, PEOPLE_AUTH='on')

    def status(token):
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        conn.request('GET', '/resources/data/1', headers={'Authorization': f'Bearer {token}'})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    try:
        storage.open_database(pg_url_in(schema))
        first, second = (models.create_token(f'outage-{n}', 'read', 3600) for n in range(2))
        models.database.close()
        assert status(first) in (200, 404)  # connected
        relay.cut()
        relay.restore()
        assert status(second) in (200, 404)
    finally:
        server.stop()
        relay.cut()


def concurrent_creates(url, key, count):
    results, barrier = [], threading.Barrier(count)

    def one():
        conn = http.client.HTTPConnection(url.split('//')[1].split(':')[0], int(url.rsplit(':', 1)[1]), timeout=10)
        barrier.wait()
        conn.request('POST', '/resources/data/', json.dumps(PETER),
                     {'Content-Type': 'application/json', 'Idempotency-Key': key})
        response = conn.getresponse()
        results.append((response.status, json.loads(response.read())))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.pooler
def test_concurrent_creates_with_one_key_make_one_person(server, database_url):
    results = concurrent_creates(server.url, 'race', 8)
    assert [status for status, _ in results] == [201] * 8
    assert len({body['id'] for _, body in results}) == 1
    db = storage.open_database(database_url)
    try:
        assert db.execute_sql('SELECT count(*) FROM people').fetchone()[0] == 1
    finally:
        db.close()


# -- crashes and outages -----------------------------------------------------------------------------

@pytest.mark.pooler
def test_kill_9_under_create_load_loses_no_acknowledged_write(database_url):
    server = Server(database_url, workers=2)
    with create_load(server, threads=6, per_thread=300, started=150) as results:
        server.signal_group(signal.SIGKILL)  # the whole service, master and workers, at once
        server.process.wait(10)
    acknowledged = [(person, body) for status, person, body in results if status == 201]
    assert len(acknowledged) >= 150
    restarted = Server(database_url, workers=2)  # starts on the same database, as after a reboot
    try:
        for person, body in acknowledged:
            assert stored(database_url, body['id']) == {'id': body['id'], **person}
    finally:
        restarted.stop()


def test_postgresql_outage_under_load_gives_503_then_recovers(pg_schema):
    _, schema = pg_schema
    relay = Relay()
    server = Server(pg_url_in(schema, relay.url), workers=2)
    statuses, stop = [], threading.Event()

    def load():
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        while not stop.is_set():
            started = time.monotonic()
            conn.request('GET', '/resources/data/987654321')
            response = conn.getresponse()
            response.read()
            statuses.append((response.status, time.monotonic() - started, response.getheader('Retry-After')))

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        relay.cut()
        time.sleep(2)
        during = len(statuses)
        relay.restore()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and statuses[-1][0] != 404:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
        relay.cut()
    codes = {status for status, _, _ in statuses}
    assert codes <= {404, 503}  # the person does not exist: 404 when up, 503 when not, never a 500
    assert 503 in {status for status, _, _ in statuses[:during]}
    assert all(retry == '1' for status, _, retry in statuses if status == 503)
    assert max(seconds for _, seconds, _ in statuses) < 5  # fast failures, never a hang
    assert statuses[-1][0] == 404  # recovered without a restart


# -- properties of the field rules ---------------------------------------------------------------------

VALID = st.fixed_dictionaries({
    'name': st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), min_size=1,
                    max_size=200),
    'age': st.integers(0, 150),
    'locale': st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), min_size=1,
                      max_size=64),
})
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(),
                        st.lists(st.integers(), max_size=3))


@given(VALID)
def test_every_valid_person_validates_unchanged(person):
    assert validate(person) == person


@given(VALID, st.sampled_from(list(FIELDS)), JSON_VALUES)
def test_a_value_breaking_its_rule_is_named(person, field, value):
    candidate = {**person, field: value}
    rule = FIELDS[field]
    ok = (type(value) is int and rule['type'] == 'integer' and rule['minimum'] <= value <= rule['maximum']) or \
         (type(value) is str and rule['type'] == 'string' and rule['minLength'] <= len(value) <= rule['maxLength']
          and '\x00' not in value)
    if ok:
        assert validate(candidate)[field] == value
    else:
        with pytest.raises(ValidationError) as error:
            validate(candidate)
        assert [e['pointer'] for e in error.value.errors] == [f'#/{field}']


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.one_of(VALID, st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4)))
def test_any_json_object_gets_201_or_422_never_500(client, body):
    response = client.post_json('/resources/data/', body, status='*', expect_errors=True)
    assert response.status_int in (201, 422)
    if response.status_int == 201:
        assert client.get(response.headers['Location']).json == response.json


@contextlib.contextmanager
def stalled_database(pg_schema, **settings):
    """One worker on PostgreSQL through a Relay, holding a database connection; then the database
    stops answering mid-conversation (no error, no timeout) until relay.flowing is set."""
    relay = Relay()
    server = Server(pg_url_in(pg_schema[1], relay.url), workers=1, **settings)
    try:
        warm = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
        warm.request('GET', '/resources/data/987654321')
        assert warm.getresponse().status == 404  # the worker holds a database connection now
        relay.flowing.clear()
        yield server, relay
    finally:
        relay.flowing.set()
        server.stop()
        relay.cut()


def test_worker_stuck_past_the_deadline_is_killed_and_replaced(pg_schema):
    with stalled_database(pg_schema, REQUEST_DEADLINE='2') as (server, relay):
        stuck = http.client.HTTPConnection('127.0.0.1', server.port, timeout=15)
        started = time.monotonic()
        stuck.request('GET', '/resources/data/987654321')
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            stuck.getresponse()  # the master killed the worker: the connection drops
        assert time.monotonic() - started < 2 + 3
        relay.flowing.set()
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline and status != 404:
            try:
                again = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
                again.request('GET', '/resources/data/987654321')
                status = again.getresponse().status
            except OSError:
                time.sleep(0.1)
        assert status == 404  # a new worker serves
        assert 'stuck past the request deadline' in server.output()


def call(server, method, path, person=None):
    """(status, content type) of one request on a new connection: the workers share them out."""
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    try:
        body = json.dumps(person) if person else None
        conn.request(method, path, body, {'Content-Type': 'application/json'} if body else {})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader('Content-Type')
    finally:
        conn.close()


ANN = {'name': 'ann', 'age': 3, 'locale': 'LA'}


def test_removed_sqlite_directory_refuses_writes_and_readiness(tmp_path):
    """Workers holding a deleted file open answered 201 into a WAL that no restart could find."""
    directory = tmp_path / 'data'
    directory.mkdir()
    url = f'sqlite:///{directory}/people.db'
    server = Server(url, workers=2)
    try:
        assert {call(server, 'POST', '/resources/data/', ANN)[0] for _ in range(10)} == {201}
        shutil.rmtree(directory)
        answers = {call(server, 'POST', '/resources/data/', ANN) for _ in range(10)}
        assert answers == {(503, 'application/problem+json')}
        assert {call(server, 'GET', '/readyz')[0] for _ in range(10)} == {503}
        directory.mkdir()  # the operator puts a database back: served again, without a restart
        subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, env={**os.environ, 'DATABASE_URL': url},
                       check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and {call(server, 'GET', '/readyz')[0] for _ in range(6)} != {200}:
            time.sleep(0.05)
        assert {call(server, 'POST', '/resources/data/', ANN)[0] for _ in range(10)} == {201}
    finally:
        server.stop()
    assert '"level":"error"' in server.output() and 'unhandled' not in server.output()


def test_database_that_lost_its_tables_gives_503_until_init_db(database_url):
    """A PostgreSQL database dropped and made again empty (or SQLite tables dropped): 503 and not
    ready, never a 500; init-db brings it back without a restart."""
    server = Server(database_url, workers=2)
    try:
        assert call(server, 'POST', '/resources/data/', ANN)[0] == 201
        db = storage.open_database(database_url)
        db.execute_sql('DROP TABLE people')
        db.execute_sql('DROP TABLE tokens')
        db.execute_sql('DROP TABLE idempotency_keys')
        db.close()
        for method, path in (('GET', '/resources/data/1'), ('POST', '/resources/data/'), ('GET', '/resources/data/'),
                             ('DELETE', '/resources/data/1')):
            assert {call(server, method, path, ANN if method == 'POST' else None) for _ in range(4)} == \
                {(503, 'application/problem+json')}
        assert {call(server, 'GET', '/readyz')[0] for _ in range(6)} == {503}
        subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT,
                       env={**os.environ, 'DATABASE_URL': database_url}, check=True, capture_output=True)
        assert {call(server, 'GET', '/readyz')[0] for _ in range(6)} == {200}
        assert call(server, 'POST', '/resources/data/', ANN)[0] == 201
    finally:
        server.stop()
    assert 'unhandled' not in server.output()


def test_request_running_past_drain_seconds_is_finished_and_answered(pg_schema):
    with stalled_database(pg_schema, DRAIN_SECONDS='1') as (server, relay):  # a create is in progress for as long as we like
        slow = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
        slow.request('POST', '/resources/data/', json.dumps(PETER), {'Content-Type': 'application/json'})
        assert relay.holding.wait(10)  # the create is in the worker, waiting on the database
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(1 + 2)  # past DRAIN_SECONDS the worker still waits for its request
        relay.flowing.set()
        response = slow.getresponse()
        assert response.status == 201
        assert server.process.wait(10) == 0
        assert stored(pg_url_in(pg_schema[1]), json.loads(response.read())['id'])['name'] == 'peter'
