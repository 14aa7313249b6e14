"""Fixtures: the app on each backend (SQLite in a temporary file, PostgreSQL in a schema of its
own), WebTest clients, and a real `service.py serve` process over loopback."""
import contextlib
import http.client
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import webtest

import models
import storage
from service import Config, create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('stack', os.path.join(ROOT, 'deploy', 'stack.py'))
stack = importlib.util.module_from_spec(_spec)  # deploy/stack.py renders deploy/pgbouncer.ini for the tests too
_spec.loader.exec_module(stack)
PG_URL = os.environ.get('TEST_DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/test')
REQUIRE_POSTGRES = os.environ.get('REQUIRE_POSTGRES') == '1'


@pytest.fixture(scope='session')
def pg_schema():
    """A fresh PostgreSQL schema for this run, dropped at the end; skip (or fail) without a server."""
    try:
        admin = psycopg2.connect(PG_URL, connect_timeout=3)
    except psycopg2.OperationalError as error:
        if REQUIRE_POSTGRES:
            pytest.fail(f'REQUIRE_POSTGRES=1 but PostgreSQL at {PG_URL} does not answer: {error}')
        pytest.skip(f'no PostgreSQL at {PG_URL} ({str(error).strip()}); set TEST_DATABASE_URL')
    admin.autocommit = True
    schema = 'people_test_' + uuid.uuid4().hex[:10]
    admin.cursor().execute(f'CREATE SCHEMA {schema}')
    yield admin, schema
    admin.cursor().execute(f'DROP SCHEMA {schema} CASCADE')
    admin.close()


def pytest_generate_tests(metafunc):
    """Storage tests run on SQLite and PostgreSQL; those marked `pooler` also through PgBouncer."""
    if 'database_url' in metafunc.fixturenames:
        backends = ['sqlite', 'postgresql'] + ['pgbouncer'] * bool(metafunc.definition.get_closest_marker('pooler'))
        metafunc.parametrize('database_url', backends, indirect=True)


@pytest.fixture
def database_url(request, tmp_path):
    """An empty people database on each backend, as a DATABASE_URL."""
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/people.db'
    if request.param == 'pgbouncer':
        pooler = request.getfixturevalue('pooler')
        pooler.admin.cursor().execute('DROP TABLE IF EXISTS people, tokens, idempotency_keys')
        return pooler.url
    admin, schema = request.getfixturevalue('pg_schema')
    admin.cursor().execute(f'DROP TABLE IF EXISTS {schema}.people, {schema}.tokens, {schema}.idempotency_keys')
    return pg_url_in(schema)


def pg_url_in(schema, url=PG_URL):
    # The timeout comes with the URL, so that create_schema leaves the shared database's default alone.
    separator = '&' if '?' in url else '?'
    return f'{url}{separator}options=-csearch_path%3D{schema}%20-cstatement_timeout%3D5000'


class Pooler:
    """PgBouncer set up as deploy/pgbouncer.ini sets it (transaction pooling, SCRAM against an auth
    file) on a free port, in front of PG_URL's server, with `pool_size` server connections a
    database; stop() and start() restart it on the same port."""

    def __init__(self, user, secret, pool_size, target=None):
        self.work = tempfile.mkdtemp(prefix='people-test-pgbouncer-')  # not under pytest's 0700 tree
        with open(os.path.join(self.work, 'userlist.txt'), 'w') as f:
            f.write(f'"{user}" "{secret}"\n')
        self.port, self.pool_size, server = free_port(), pool_size, urlsplit(PG_URL)
        self.command = stack.pooler_config(self.work, target or (server.hostname, server.port or 5432), self.port,
                                           default_pool_size=pool_size, max_db_connections=pool_size)
        self.start()

    def start(self):
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                return socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f'pgbouncer did not start listening; see {self.work}/pgbouncer.log')

    def stop(self):
        self.process.kill()
        self.process.wait()

    def remove(self):
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope='session')
def pooler(pg_schema):
    """PgBouncer in front of a database of this run's own (PgBouncer refuses the `options` that
    pick a schema), which a role of its own owns; `admin` is a direct superuser connection to it."""
    if not (shutil.which('pgbouncer') or os.path.exists('/usr/sbin/pgbouncer')):
        if os.environ.get('REQUIRE_PGBOUNCER') == '1':
            pytest.fail('REQUIRE_PGBOUNCER=1 but pgbouncer is not installed')
        pytest.skip('pgbouncer is not installed (apt-get install pgbouncer)')
    admin, _ = pg_schema
    name, password = 'people_pool_' + uuid.uuid4().hex[:10], uuid.uuid4().hex
    cursor = admin.cursor()
    cursor.execute(f'CREATE ROLE {name} LOGIN PASSWORD %s', (password,))
    cursor.execute(f'CREATE DATABASE {name} OWNER {name}')
    pooler = None
    try:
        cursor.execute('SELECT rolpassword FROM pg_authid WHERE rolname = %s', (name,))  # its SCRAM secret
        secret = cursor.fetchone()[0]
        pooler = Pooler(name, secret, pool_size=4)
        pooler.database, pooler.secret = name, secret
        pooler.url = f'postgresql://{name}:{password}@127.0.0.1:{pooler.port}/{name}'
        pooler.admin = psycopg2.connect(urlunsplit(urlsplit(PG_URL)._replace(path='/' + name)), connect_timeout=3)
        pooler.admin.autocommit = True
        yield pooler
        pooler.admin.close()
    finally:
        if pooler:
            pooler.remove()
        cursor.execute(f'DROP DATABASE {name} WITH (FORCE)')
        cursor.execute(f'DROP ROLE {name}')


@pytest.fixture
def app(database_url, tmp_path):
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=database_url,
                            metrics_dir=str(tmp_path / 'metrics')))
    storage.create_schema(models.database.obj)
    yield app
    models.database.close()


@pytest.fixture
def secure(database_url, tmp_path):
    """make(**environ): a WebTest client of the app with production defaults (tokens on), and
    `tokens`, one live token per scope."""
    class Secure:
        def make(self, **environ):
            app = create_app(Config(environ=environ, database_url=database_url, metrics_dir=str(tmp_path / 'm')))
            storage.create_schema(models.database.obj)
            self.tokens = {scope: models.create_token(f'{scope}-{uuid.uuid4().hex[:6]}', scope, 3600)
                           for scope in models.SCOPES}
            return webtest.TestApp(app)

        def auth(self, scope):
            return {'Authorization': f'Bearer {self.tokens[scope]}'}

    yield Secure()
    models.database.close()


@pytest.fixture
def client(app):
    return webtest.TestApp(app)


@pytest.fixture
def person(client):
    """A stored person, as the API returned it."""
    return client.post_json('/resources/data/', {'name': 'peter', 'age': 42, 'locale': 'NYC'}).json


def status_with_token(url, secret):
    """The status of a GET of `url` with `Authorization: Bearer <secret>`, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={'Authorization': f'Bearer {secret}'}),
                                    timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def make_on_a_taken_port(target, variable, ignore_sigint=False):
    """`make TARGET VARIABLE=<a port something listens on>`, as from a terminal: not a make inside `make test`,
    which would add "Entering directory" lines (or, ignoring SIGINT, as a script's background job). Returns
    (the port, make's exit status, all it printed)."""
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if k not in ('MAKELEVEL', 'MAKEFLAGS', 'MFLAGS')}
        result = subprocess.run(['make', '-o', '.venv/.installed', target, f'{variable}={port}'], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, env=environ,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
    return port, result.returncode, result.stdout + result.stderr


def free_port():
    return free_ports(1)[0]


def free_ports(count):
    """`count` distinct ports: each socket is held until all are bound, or the kernel may hand the
    same port out twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]


class Server:
    """`python service.py serve` in its own process group, on a free loopback port. socket_activated:
    the port's socket is this object's, passed as systemd's people.socket passes it (LISTEN_FDS), so
    that it outlives the service across restart()."""

    def __init__(self, database_url, workers=2, port=None, root=ROOT, socket_activated=False, **env):
        self.port = port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.environ = {**os.environ, 'DATABASE_URL': database_url, 'PEOPLE_AUTH': 'off', **env}
        self.command = ['service.py', 'serve', '--port', str(self.port), '--workers', str(workers)]
        self.root, self.listener = root, None
        if socket_activated:
            self.listener = socket.create_server(('127.0.0.1', self.port), backlog=1024)
            self.command = ['-c', stack.ACTIVATE, str(self.listener.fileno()), *self.command]
        self.log = tempfile.TemporaryFile(mode='w+')
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, *self.command], cwd=self.root, env=self.environ, start_new_session=True,
            stdout=self.log, stderr=subprocess.STDOUT, pass_fds=[self.listener.fileno()] if self.listener else [])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.listener:  # a held socket accepts at once: wait for an answer instead
                    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=1)
                    conn.request('GET', '/livez')
                    conn.getresponse().read()
                    conn.close()
                else:
                    socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close()
                return
            except (OSError, http.client.HTTPException):
                if self.process.poll() is not None:
                    raise RuntimeError('server exited: ' + self.output())
                time.sleep(0.05)
        self.stop()
        raise RuntimeError('server did not start listening within 15 s')

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def signal_group(self, signum):
        os.killpg(self.process.pid, signum)

    def stop(self):
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.process.wait()
        if self.listener:
            self.listener.close()

    def restart(self):
        """systemctl restart with people.socket: the service drains and stops, then starts on the same
        socket, which queued the connections that came meanwhile."""
        self.signal_group(signal.SIGTERM)
        assert self.process.wait(15) == 0, self.output()
        self.start()


@pytest.fixture
def server(database_url):
    server = Server(database_url)
    yield server
    server.stop()


class Relay:
    """A loopback TCP relay to PostgreSQL that a test can cut (refusing and dropping every
    connection, as an outage does) and restore on the same port."""

    def __init__(self, target_url=PG_URL):
        parts = urlsplit(target_url)
        self.target = (parts.hostname, parts.port or 5432)
        self.port = free_port()
        self.url = urlunsplit(parts._replace(netloc=f'{parts.username}@127.0.0.1:{self.port}'))
        self.sockets = []
        self.flowing = threading.Event()
        self.flowing.set()
        self.holding = threading.Event()  # set once bytes are held back while frozen
        self.restore()

    def restore(self):
        self.listener = socket.create_server(('127.0.0.1', self.port))
        threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    def pump(self, source, sink):
        try:
            while data := source.recv(65536):
                if not self.flowing.is_set():
                    self.holding.set()
                self.flowing.wait()  # frozen: bytes are held, as on a network that stopped answering
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would leave listening
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.sockets = []


@pytest.fixture
def small_filesystem(tmp_path):
    """fill() -> a directory on a tmpfs of 8 MiB of its own, and a way to fill it up."""
    mount_point = tmp_path / 'small'
    mount_point.mkdir()
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if os.geteuid() == 0:
            pytest.fail(f'cannot mount a tmpfs as root: {result.stderr}')
        pytest.skip('mounting a small filesystem needs root')

    def fill():
        with open(mount_point / 'filler', 'wb') as f:
            try:
                while True:
                    f.write(b'\0' * 65536)
                    f.flush()
            except OSError:
                pass
    yield mount_point, fill
    subprocess.run(['umount', '-l', str(mount_point)], check=True)
