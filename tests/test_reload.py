"""Shipping new code: SIGUSR2 (systemctl reload) under keep-alive reads and creates. The code is a copy
in a temporary directory, changed between reloads as a deploy changes it."""
import glob
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import storage
from conftest import ROOT, Server
from test_deploy import INSECURE, Stack
from test_server import committed_but_unanswered


def copy_of_the_service(tmp_path):
    app = tmp_path / 'app'
    app.mkdir()
    for path in glob.glob(os.path.join(ROOT, '*.py')) + [os.path.join(ROOT, 'schema.sql')]:
        shutil.copy(path, app)
    return app


def set_version(app, version):
    """A change a client can see: the API version in /openapi.json."""
    source = (app / 'openapi.py').read_text()
    (app / 'openapi.py').write_text(re.sub(r"^VERSION = '[^']*'", f"VERSION = '{version}'", source, flags=re.M))


def version_served(port):
    """The version each of 24 new connections is answered (the kernel spreads them over the workers)."""
    seen = set()
    for _ in range(24):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/openapi.json')
        seen.add(json.loads(conn.getresponse().read())['info']['version'])
        conn.close()
    return seen


def client_loop(connect, headers, prefix, stop, results, read, waits):
    """Reads or creates on a keep-alive connection until `stop`, each request sent once; a failure is
    recorded by its exception's name (ConnectionRefusedError: the port refused) and the next request
    goes on a new connection."""
    conn = None
    for i in itertools.count():
        if stop.is_set():
            break
        conn = conn or connect()
        person = {'name': f'{prefix}-{i}', 'age': i % 150, 'locale': 'NYC'}
        sent = time.monotonic()
        try:
            if read:
                conn.request('GET', read, headers=headers)
            else:
                conn.request('POST', '/resources/data/', json.dumps(person), {**headers, 'Content-Type': 'application/json'})
            response = conn.getresponse()
            results.append((response.status, person, response.read()))
            waits.append(time.monotonic() - sent)
            if response.will_close:  # a draining worker says so on its last answer
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as error:
            results.append((type(error).__name__, person, None))
            conn.close()
            conn = None


class Load:
    """Two keep-alive create loops and two loops reading one person, on a loopback port or through
    `connect` (the stack's nginx, say) with `headers`."""

    def __init__(self, port, prefix, connect=None, headers=None):
        connect = connect or (lambda: http.client.HTTPConnection('127.0.0.1', port, timeout=30))
        headers = headers or {}
        conn = connect()
        conn.request('POST', '/resources/data/', json.dumps({'name': 'reader', 'age': 1, 'locale': 'NYC'}),
                     {**headers, 'Content-Type': 'application/json'})
        read = '/resources/data/%d' % json.loads(conn.getresponse().read())['id']
        conn.close()
        self.results, self.waits, self.stop = [], [], threading.Event()
        self.threads = [threading.Thread(target=client_loop, args=(connect, headers, f'{prefix}-{n}', self.stop,
                                                                   self.results, n >= 2 and read, self.waits))
                        for n in range(4)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        failures = [(status, person['name'], body and body[:160]) for status, person, body in self.results
                    if status not in (200, 201)]
        return failures


def workers_of(master):
    return set(subprocess.run(['pgrep', '-P', str(master)], capture_output=True, text=True).stdout.split())


def wait_for(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.05)


@pytest.fixture
def migrate_queued_connections():
    """net.ipv4.tcp_migrate_req=1, as install.sh sets it: a worker that stops listening hands the
    connections queued at its socket to the others instead of resetting them."""
    path = '/proc/sys/net/ipv4/tcp_migrate_req'
    try:
        with open(path) as f:
            before = f.read()
        with open(path, 'w') as f:
            f.write('1')
    except OSError:
        pytest.skip('cannot set net.ipv4.tcp_migrate_req here')
    yield
    with open(path, 'w') as f:
        f.write(before)


@pytest.mark.parametrize('socket_activated', [False, True], ids=['own listeners', 'people.socket'])
def test_twenty_reloads_under_load_serve_the_new_code_and_fail_nothing(database_url, tmp_path, socket_activated, request):
    if not socket_activated:  # each worker's own listener closes as it drains
        request.getfixturevalue('migrate_queued_connections')
    app = copy_of_the_service(tmp_path)
    set_version(app, 'reload-0')
    server = Server(database_url, workers=2, root=app, socket_activated=socket_activated, DRAIN_SECONDS='3')
    try:
        load = Load(server.port, 'reload')
        for n in range(1, 21):
            before = workers_of(server.process.pid)
            set_version(app, f'reload-{n}')
            server.process.send_signal(signal.SIGUSR2)
            # The old workers are gone (every worker is new) and every new connection gets the new code.
            wait_for(lambda: workers_of(server.process.pid).isdisjoint(before)
                     and len(workers_of(server.process.pid)) == 2)
            assert version_served(server.port) == {f'reload-{n}'}
        failures = load.finish()
        assert server.process.poll() is None, server.output()
        assert failures == [], f'{failures}\n' + server.output()[-2000:]
        answered = [status for status, _, _ in load.results]
        assert answered.count(201) > 100 and answered.count(200) > 100
        assert committed_but_unanswered(database_url, 'reload', load.results) == []
        assert server.output().count('"reloaded":true') == 20
        print(f'20 reloads: {len(load.waits)} answers, longest wait {max(load.waits):.2f} s')
    finally:
        server.stop()


def test_a_restart_with_people_socket_makes_clients_wait_not_fail(database_url):
    """systemctl restart (after a change to people.env): the socket stays, so connections made while no
    worker runs wait in its queue and are answered once the service is back."""
    server = Server(database_url, workers=2, socket_activated=True, DRAIN_SECONDS='3')
    try:
        load = Load(server.port, 'restart')
        for _ in range(5):
            time.sleep(0.5)
            server.restart()
        time.sleep(0.5)
        failures = load.finish()
        assert failures == [], f'{failures}\n' + server.output()[-2000:]
        assert committed_but_unanswered(database_url, 'restart', load.results) == []
        print(f'socket-activated restarts: {len(load.waits)} answers, longest wait {max(load.waits):.2f} s')
        assert max(load.waits) > 0.1  # the restarts were under the load, which waited through them
    finally:
        server.stop()


def test_a_reload_with_code_that_does_not_start_leaves_the_workers_serving(database_url, tmp_path):
    app = copy_of_the_service(tmp_path)
    server = Server(database_url, workers=2, root=app)
    try:
        before = workers_of(server.process.pid)
        load = Load(server.port, 'broken')
        (app / 'resources.py').write_text((app / 'resources.py').read_text() + '\nx = (\n')
        server.process.send_signal(signal.SIGUSR2)
        wait_for(lambda: 'reload failed' in server.output())
        time.sleep(0.5)
        assert load.finish() == []
        assert workers_of(server.process.pid) == before
        failed = [json.loads(line) for line in server.output().splitlines() if 'reload failed' in line]
        assert len(failed) == 1 and 'SyntaxError' in failed[0]['cause'], failed
        assert committed_but_unanswered(database_url, 'broken', load.results) == []
    finally:
        server.stop()


def test_check_loads_the_code_and_exits_without_serving(database_url, tmp_path):
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    environ = {**os.environ, 'DATABASE_URL': database_url, 'PEOPLE_AUTH': 'off', 'TMPDIR': str(scratch)}
    environ.pop('METRICS_DIR', None)
    done = subprocess.run([os.sys.executable, 'service.py', 'serve', '--check'], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []  # no metrics directory left behind
    app = copy_of_the_service(tmp_path)
    (app / 'models.py').write_text((app / 'models.py').read_text() + '\nimport peewee_gone\n')
    done = subprocess.run([os.sys.executable, 'service.py', 'serve', '--check'], cwd=app, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "No module named 'peewee_gone'" in done.stderr


def test_readyz_answers_503_once_a_worker_drains(database_url):
    """A balancer's health check that reaches a draining worker (on a connection it still holds) is told
    to stop sending there."""
    server = Server(database_url, workers=1, DRAIN_SECONDS='5')
    try:
        probe = socket.create_connection(('127.0.0.1', server.port), timeout=10)
        probe.sendall(b'GET /readyz HTTP/1.1\r\nHost: x\r\n')  # still arriving: the drain waits for it
        time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        probe.sendall(b'\r\n')
        answer = probe.recv(65536).decode()
        assert answer.startswith('HTTP/1.1 503'), answer
        assert 'application/problem+json' in answer and 'retry-after: 1' in answer.lower(), answer
        assert server.process.wait(10) == 0
    finally:
        server.stop()


def stored_twice(database_url, prefix):
    db = storage.open_database(database_url)
    try:
        return db.execute_sql('SELECT name FROM people WHERE name LIKE %s GROUP BY name HAVING COUNT(*) > 1'
                              .replace('%s', db.param), (prefix + '-%',)).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize('shipping', ['rolling restarts', 'reloads'])
def test_new_code_behind_nginx_under_load_fails_nothing(database_url, shipping):
    """make stack INSTANCES=2: ten rolling restarts (each instance drains and starts again on its socket,
    ready before the next goes), or ten reloads of both, under keep-alive HTTPS reads and creates."""
    stack = Stack(database_url, INSTANCES='2', RATE='100000', BURST='100000')
    try:
        prefix = shipping.split()[0]
        load = Load(None, prefix, lambda: http.client.HTTPSConnection('127.0.0.1', stack.https, timeout=30,
                                                                      context=INSECURE), stack.auth)
        for n in range(10):
            time.sleep(0.3)
            said = stack.output().count('restarted') + stack.output().count('"reloaded":true')
            stack.process.send_signal(signal.SIGUSR1 if shipping == 'rolling restarts' else signal.SIGUSR2)
            wait_for(lambda: stack.output().count('restarted') + stack.output().count('"reloaded":true') >= said + 2,
                     seconds=60)
        time.sleep(0.5)
        failures = load.finish()
        work = re.search(r'files in (\S+?),? deleted on stop', stack.output())[1]
        with open(os.path.join(work, 'logs', 'error.log')) as f:
            assert failures == [], f'{failures}\n' + f.read()[-3000:]
        answered = [status for status, _, _ in load.results]
        assert answered.count(201) > 50 and answered.count(200) > 50
        assert committed_but_unanswered(database_url, prefix, load.results) == []
        assert stored_twice(database_url, prefix) == []  # no create was sent twice
        print(f'{shipping} behind nginx: {len(load.waits)} answers, longest wait {max(load.waits):.2f} s')
    finally:
        assert stack.stop() == 0
