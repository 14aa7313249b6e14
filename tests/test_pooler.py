"""Through PgBouncer in transaction mode (deploy/pgbouncer.ini): the service's promises hold when
any transaction may get any server connection, and the server connections stay within the pool.
The contract, kill -9 and one-instance races run here too: the tests marked `pooler`."""
import http.client
import json
import threading
import time

import peewee
import psycopg2
import pytest

import models
import storage
from conftest import Pooler, Relay, Server
from test_reliability import PETER
from test_server import stored


@pytest.fixture
def pooled_url(pooler):
    pooler.admin.cursor().execute('DROP TABLE IF EXISTS people, tokens, idempotency_keys')
    return pooler.url


def server_connections(pooler):
    cursor = pooler.admin.cursor()
    cursor.execute('SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s',
                   (pooler.database, pooler.database))
    return cursor.fetchone()[0]


def lock_waiters(pooler, count):
    """Wait until `count` of the service's statements wait for a lock (at most 10 s)."""
    cursor, deadline = pooler.admin.cursor(), time.monotonic() + 10
    while time.monotonic() < deadline:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s "
                       "AND wait_event_type = 'Lock'", (pooler.database, pooler.database))
        if cursor.fetchone()[0] >= count:
            return
        time.sleep(0.02)


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request(method, path, body and json.dumps(body), {'Content-Type': 'application/json', **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read(), response.getheader('Retry-After')


def test_two_instances_of_four_workers_hold_no_more_server_connections_than_the_pool(pooled_url, pooler):
    servers = [Server(pooled_url, workers=4) for _ in range(2)]
    statuses, peak, done = [], 0, threading.Event()

    def load(port):
        for i in range(40):
            status, body, _ = request(port, 'POST', '/resources/data/', PETER)
            statuses.append(status)
            statuses.append(request(port, 'GET', f'/resources/data/{json.loads(body)["id"]}')[0])

    threads = [threading.Thread(target=load, args=(server.port,)) for server in servers for _ in range(8)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, server_connections(pooler))
            time.sleep(0.01)
    finally:
        for t in threads:
            t.join(60)
        for server in servers:
            server.stop()
    assert statuses.count(201) == 640 and statuses.count(200) == 640
    assert 1 <= peak <= pooler.pool_size < 2 * 4  # 8 workers, each with its own client connection


def test_idempotent_creates_racing_on_two_instances_make_one_person(pooled_url, pooler):
    servers = [Server(pooled_url, workers=4) for _ in range(2)]
    results, barrier = [], threading.Barrier(16)

    def create(port):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        conn.connect()
        barrier.wait()  # all sixteen at once, half on each instance
        conn.request('POST', '/resources/data/', json.dumps(PETER),
                     {'Content-Type': 'application/json', 'Idempotency-Key': 'race-two'})
        response = conn.getresponse()
        results.append((response.status, json.loads(response.read())))

    threads = [threading.Thread(target=create, args=(server.port,)) for server in servers for _ in range(8)]
    holder = psycopg2.connect(pooler.admin.dsn)
    try:  # keys cannot be written until every server connection has a racer that found none
        holder.cursor().execute('LOCK TABLE idempotency_keys IN SHARE ROW EXCLUSIVE MODE')
        for t in threads:
            t.start()
        lock_waiters(pooler, pooler.pool_size)
        holder.rollback()
        for t in threads:
            t.join(60)
    finally:
        holder.close()
        for server in servers:
            server.stop()
    assert [status for status, _ in results] == [201] * 16
    assert len({body['id'] for _, body in results}) == 1
    db = storage.open_database(pooled_url)
    try:
        assert db.execute_sql('SELECT count(*) FROM people').fetchone()[0] == 1
    finally:
        db.close()


def test_an_update_locks_its_row_through_the_pooler(pooled_url, pooler):
    server = Server(pooled_url, workers=2)
    other = psycopg2.connect(pooler.admin.dsn)  # another writer, straight to PostgreSQL
    try:
        person = json.loads(request(server.port, 'POST', '/resources/data/', PETER)[1])
        other.cursor().execute('SELECT 1 FROM people WHERE id = %s FOR UPDATE', (person['id'],))
        answer = []
        patch = threading.Thread(target=lambda: answer.append(request(
            server.port, 'PATCH', f"/resources/data/{person['id']}", {'age': 43}, {'If-Match': '"1"'})))
        patch.start()
        lock_waiters(pooler, 1)  # the service's transaction waits for the other's lock
        other.cursor().execute('UPDATE people SET age = 44, version = version + 1 WHERE id = %s', (person['id'],))
        other.commit()
        patch.join(30)
    finally:
        other.close()
        server.stop()
    assert answer[0][0] == 412  # it read the row only once the lock was its own: version 2, not the "1" it was sent
    assert stored(pooled_url, person['id'])['age'] == 44


def test_a_runaway_statement_is_cut_off_through_the_pooler(pooled_url, pooler):
    cursor = pooler.admin.cursor()
    cursor.execute(f'ALTER DATABASE {pooler.database} RESET statement_timeout')

    def fresh_server_connections():  # so that no setting lingers in a session the pooler kept
        cursor.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND usename = %s',
                       (pooler.database, pooler.database))
        deadline = time.monotonic() + 10
        while server_connections(pooler) and time.monotonic() < deadline:
            time.sleep(0.05)

    fresh_server_connections()
    db = storage.open_database(pooled_url)
    try:
        storage.create_schema(db)  # what init-db and serve do
        fresh_server_connections()
        people = models.People(db)
        with pytest.raises(peewee.OperationalError, match='statement timeout'):
            people.run('SELECT pg_sleep(60)', ())
        people.ping()  # the same client connection serves the next statement
    finally:
        db.close()


def outage_under_load(url, go_down, come_back):
    """Reads of an unknown id from 4 threads while go_down() and come_back() run: the (status,
    seconds, Retry-After) answers, and how many came before come_back()."""
    server = Server(url, workers=2)
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            started = time.monotonic()
            status, _, retry = request(server.port, 'GET', '/resources/data/987654321')
            statuses.append((status, time.monotonic() - started, retry))

    def wait_for(status, since):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and status not in [s for s, _, _ in statuses[since:]]:
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(404, 0)
        go_down()
        wait_for(503, len(statuses))
        come_back()
        restored = len(statuses)
        wait_for(404, restored)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    return statuses, restored


def assert_fast_503s_then_recovery(statuses, restored):
    assert {status for status, _, _ in statuses} == {404, 503}  # never a 500
    assert all(retry == '1' for status, _, retry in statuses if status == 503)
    assert max(seconds for _, seconds, _ in statuses) < 5  # fast failures, never a hang
    assert 404 in {status for status, _, _ in statuses[restored:]}  # recovered without a restart


def test_pooler_restart_under_load_gives_503_then_recovers(pooled_url, pooler):
    try:
        assert_fast_503s_then_recovery(*outage_under_load(pooled_url, pooler.stop, pooler.start))
    finally:
        if pooler.process.poll() is not None:
            pooler.start()


def test_postgresql_outage_behind_the_pooler_gives_503_then_recovers(pooled_url, pooler):
    relay = Relay()
    behind = Pooler(pooler.database, pooler.secret, pool_size=4, target=('127.0.0.1', relay.port))
    try:
        url = pooled_url.replace(f':{pooler.port}/', f':{behind.port}/')
        assert_fast_503s_then_recovery(*outage_under_load(url, relay.cut, relay.restore))
    finally:
        behind.remove()
        relay.cut()
