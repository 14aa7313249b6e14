"""The real thing: `service.py serve` on bjoern over loopback, on SQLite and PostgreSQL."""
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


import models
from conftest import ROOT, Server

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


def curl(*args):
    result = subprocess.run(['curl', '-s', '-w', '\n%{http_code}', *args], capture_output=True, text=True, timeout=10)
    body, status = result.stdout.rsplit('\n', 1)
    return int(status), body


def stored(database_url, person_id):
    """A person as the database holds it, read without the server."""
    db = models.open_database(database_url)
    try:
        found = models.People(db).find(person_id)
        return found and found[0]
    finally:
        db.close()


def test_original_curl_commands(server):
    status, body = curl(f'{server.url}/resources/data/', '-d', 'data={"name": "peter", "locale": "NYC", "age": 42}',
                        '-X', 'PUT')
    assert status == 201 and json.loads(body) == {'id': 1, **PETER}
    assert curl(f'{server.url}/resources/data/1') == (200, body)
    assert curl(f'{server.url}/resources/data/1', '-X', 'DELETE') == (200, body)
    status, body = curl(f'{server.url}/resources/data/1')
    assert status == 404 and json.loads(body)['status'] == 404


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    conn.request('POST', '/resources/data/', json.dumps(PETER), {'Content-Type': 'application/json'})
    assert conn.getresponse().read() and conn.sock is not None
    first_socket = conn.sock
    for _ in range(20):
        conn.request('GET', '/resources/data/1')
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())['name'] == 'peter'
    assert conn.sock is first_socket  # never reconnected
    conn.close()


def test_chunked_body_is_read_not_taken_as_empty(server):
    body = json.dumps(PETER).encode()
    request = (b'POST /resources/data/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
               + b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body))
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(request)
        reply = b''
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b'HTTP/1.1 201'), reply
    assert json.loads(reply.split(b'\r\n\r\n', 1)[1]) == {'id': 1, **PETER}


def create_many(port, count, results):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    for i in range(count):
        person = {'name': f'p{threading.get_ident()}-{i}', 'age': i % 150, 'locale': 'NYC'}
        try:
            conn.request('POST', '/resources/data/', json.dumps(person), {'Content-Type': 'application/json'})
            response = conn.getresponse()
            results.append((response.status, person, json.loads(response.read())))
        except (OSError, http.client.HTTPException):
            results.append((None, person, None))  # a connection cut by the shutdown: not acknowledged
            conn.close()
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
            time.sleep(0.01)
    conn.close()


@contextlib.contextmanager
def create_load(server, threads, per_thread, started):
    """Creates from `threads` connections; entered once `started` have been answered, it yields
    the (status, person, body) results, and on leaving waits for every thread to finish."""
    results = []
    workers = [threading.Thread(target=create_many, args=(server.port, per_thread, results)) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(results) < started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield results
    finally:
        for t in workers:
            t.join(60)


def test_twelve_connections_create_concurrently(server, database_url):
    results = []
    threads = [threading.Thread(target=create_many, args=(server.port, 25, results)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [status for status, _, _ in results]
    assert statuses == [201] * 300
    ids = [body['id'] for _, _, body in results]
    assert len(set(ids)) == 300
    for _, person, body in results[::25]:
        assert stored(database_url, body['id']) == {'id': body['id'], **person}


def test_sigterm_to_group_under_load_drains_and_loses_nothing(database_url):
    server = Server(database_url, workers=2, DRAIN_SECONDS='3')
    try:
        with create_load(server, threads=6, per_thread=400, started=100) as results:
            server.signal_group(signal.SIGTERM)  # what systemd does: every process in the group
            started = time.monotonic()
            assert server.process.wait(15) == 0, server.output()
            assert time.monotonic() - started < 3 + 2
    finally:
        server.stop()
    acknowledged = [(person, body) for status, person, body in results if status == 201]
    assert len(acknowledged) >= 100
    assert not [status for status, _, _ in results if status not in (201, None)]  # no 5xx or other errors
    for person, body in acknowledged:
        assert stored(database_url, body['id']) == {'id': body['id'], **person}


def test_sigint_stops_cleanly(database_url):
    server = Server(database_url, workers=2)
    server.process.send_signal(signal.SIGINT)  # Ctrl-C at a terminal
    assert server.process.wait(10) == 0
    assert 'stopped' in server.output()


def test_dead_worker_is_replaced(database_url):
    server = Server(database_url, workers=1)
    try:
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        (worker,) = map(int, workers.stdout.split())
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, _ = curl(f'{server.url}/resources/data/1')
            if status == 404:
                break
            time.sleep(0.05)
        assert status == 404  # a new worker answers
        assert 'starting another' in server.output()
    finally:
        server.stop()


def serve_beside(port, temp, database_url, **env):
    """A second `serve` on `port`, with its temporary files in `temp`: (exit code, stderr)."""
    temp.mkdir()
    environ = {**os.environ, 'DATABASE_URL': database_url, 'PEOPLE_AUTH': 'off', 'TMPDIR': str(temp), **env}
    second = subprocess.Popen([sys.executable, 'service.py', 'serve', '--port', str(port)], cwd=ROOT, env=environ,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        return second.wait(30), second.stderr.read()
    except subprocess.TimeoutExpired:  # it joined the port and serves: stop it and its workers
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        return None, 'still serving after 30 s'
    finally:
        second.stderr.close()


def test_second_serve_on_a_served_port_refuses_in_one_line(database_url, tmp_path):
    """Workers bind with SO_REUSEPORT: without the check, a copy would silently join the port (tokens
    on, say, beside one with tokens off) and the kernel would split the clients between them."""
    first = Server(database_url, workers=2)
    try:
        code, errors = serve_beside(first.port, tmp_path / 'second', f'sqlite:///{tmp_path}/second/people.db',
                                    PEOPLE_AUTH='on')
        assert code != 0 and errors.count('\n') == 1, errors
        assert errors.startswith(f'cannot serve on 127.0.0.1:{first.port}: Address already in use'), errors
        assert os.listdir(tmp_path / 'second') == []  # no people-metrics-* directory, not even its database
        assert curl(f'{first.url}/resources/data/1')[0] == 404  # the first serves on, alone
    finally:
        first.stop()


def test_serve_on_a_port_a_foreign_process_holds_refuses_in_one_line(database_url, tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as foreign:
        port = foreign.getsockname()[1]
        code, errors = serve_beside(port, tmp_path / 'second', database_url)
    assert code != 0 and errors.count('\n') == 1 and 'Traceback' not in errors, errors
    assert errors.startswith(f'cannot serve on 127.0.0.1:{port}: Address already in use'), errors
    assert os.listdir(tmp_path / 'second') == []


def test_serving_line_says_tokens_and_database_without_password(tmp_path):
    url = f'sqlite:///{tmp_path}/people.db'
    server = Server(url, workers=1, PEOPLE_AUTH='on')
    try:
        serving = json.loads(server.output().splitlines()[0])
    finally:
        server.stop()
    assert serving['event'] == 'serving' and serving['tokens'] == 'on' and serving['database'] == url
    from service import safe_url
    assert safe_url('postgresql://app:s3cret@db:5432/people?password=s3cret') == \
        'postgresql://app:***@db:5432/people?password=***'
