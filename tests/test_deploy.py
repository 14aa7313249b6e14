"""The files under deploy/ are valid for the tools that read them."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import models
from conftest import ROOT, free_port, pg_url_in

DEPLOY = os.path.join(ROOT, 'deploy')


def require(tool, variable):
    if shutil.which(tool) or os.path.exists(f'/usr/sbin/{tool}'):
        return
    if os.environ.get(variable) == '1':
        pytest.fail(f'{variable}=1 but {tool} is not installed')
    pytest.skip(f'{tool} is not installed (Debian package {"prometheus" if tool == "promtool" else tool})')


def test_prometheus_alert_rules_pass_promtool():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'check', 'rules', 'alerts.yml'], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'SUCCESS: 5 rules found' in result.stdout


def test_backup_alert_fires_after_26_hours_without_a_backup():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'test', 'rules', 'backup_alert_test.yml'], cwd=os.path.join(ROOT, 'tests'),
                            capture_output=True, text=True)
    assert result.returncode == 0 and 'SUCCESS' in result.stdout, result.stdout + result.stderr


def test_prometheus_scrape_config_passes_promtool():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'check', 'config', 'prometheus.yml'], cwd=DEPLOY,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd ------------------------------------------------------------------------------------

UNITS = ['people.service', 'people-backup.service']


@pytest.fixture
def units(tmp_path):
    """deploy/'s units with their paths pointed at this checkout, so verify finds the binaries."""
    for name in UNITS + ['people-backup.timer']:
        with open(os.path.join(DEPLOY, name)) as f:
            text = f.read()
        (tmp_path / name).write_text(text.replace('/opt/people/.venv/bin/python', os.path.realpath(sys.executable))
                                     .replace('/opt/people/people-backup', os.path.join(DEPLOY, 'people-backup'))
                                     .replace('/opt/people', ROOT))
    return tmp_path


@pytest.mark.parametrize('name', UNITS + ['people-backup.timer'])
def test_systemd_unit_verifies_clean(units, name):
    require('systemd-analyze', 'REQUIRE_SYSTEMD_ANALYZE')
    result = subprocess.run(['systemd-analyze', 'verify', str(units / name)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == '', result.stderr


@pytest.mark.parametrize('name', UNITS)
def test_systemd_unit_exposure_is_ok_or_better(units, name):
    require('systemd-analyze', 'REQUIRE_SYSTEMD_ANALYZE')
    result = subprocess.run(['systemd-analyze', 'security', '--offline=true', str(units / name)], capture_output=True,
                            text=True)
    score = float(re.search(rf'Overall exposure level for {name}: ([\d.]+)', result.stdout)[1])
    assert score <= 2.0, result.stdout


def test_backup_timer_runs_daily_at_a_random_time():
    with open(os.path.join(DEPLOY, 'people-backup.timer')) as f:
        text = f.read()
    assert re.search(r'^OnCalendar=daily$', text, re.M) and re.search(r'^RandomizedDelaySec=\S+', text, re.M)


def test_backup_script_keeps_the_newest_backups(tmp_path):
    """deploy/people-backup (what the timer runs) adds a backup and keeps BACKUP_KEEP, oldest removed first."""
    backups = tmp_path / 'backups'
    backups.mkdir()
    for day in range(1, 5):
        (backups / f'people-2020010{day}T000000Z.backup').write_text('old')
    (backups / 'kept-by-hand.backup').write_text('not ours')
    environ = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/people.db', 'BACKUP_DIR': str(backups),
               'BACKUP_KEEP': '3', 'PYTHON': sys.executable}
    subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, env=environ, check=True, capture_output=True)
    result = subprocess.run([os.path.join(DEPLOY, 'people-backup')], cwd=ROOT, env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(backups))
    assert names[:3] == ['kept-by-hand.backup', 'people-20200103T000000Z.backup', 'people-20200104T000000Z.backup']
    assert len(names) == 4 and re.fullmatch(r'people-\d{8}T\d{6}Z\.backup', names[3])


def test_systemd_stop_timeout_outlasts_the_drain():
    with open(os.path.join(DEPLOY, 'people.service')) as f:
        text = f.read()
    stop = int(re.search(r'^TimeoutStopSec=(\d+)', text, re.M)[1])
    drain = float(re.search(r'DRAIN_SECONDS=([\d.]+)', text)[1])
    assert stop > drain + 5


def test_install_script_parses():
    assert subprocess.run(['bash', '-n', os.path.join(DEPLOY, 'install.sh')]).returncode == 0


# -- nginx, through `make stack` ------------------------------------------------------------------

def test_nginx_config_passes_nginx_t():
    require('nginx', 'REQUIRE_NGINX')
    result = subprocess.run([sys.executable, os.path.join(DEPLOY, 'stack.py'), '--check'], capture_output=True,
                            text=True)
    assert result.returncode == 0 and 'test is successful' in result.stdout, result.stdout + result.stderr


class Stack:
    """deploy/stack.py (what `make stack` runs) on free ports, with a write token."""

    def __init__(self, database_url, **env):
        require('nginx', 'REQUIRE_NGINX')
        self.https, self.http, self.service = free_port(), free_port(), free_port()
        instances = int(env.get('INSTANCES', 1))
        while instances > 1 and not port_is_free(self.service + 1):
            self.service = free_port()
        self.log = tempfile.TemporaryFile(mode='w+')
        self.env = {**os.environ, 'DATABASE_URL': database_url, 'HTTPS_PORT': str(self.https),
                    'HTTP_PORT': str(self.http), 'SERVICE_PORT': str(self.service), 'WORKERS': '2', **env}
        self.env.pop('PEOPLE_AUTH', None)
        self.process = subprocess.Popen([sys.executable, os.path.join(DEPLOY, 'stack.py')], cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 'stack: https://' not in self.output():
            assert self.process.poll() is None, self.output()
            time.sleep(0.1)
        assert 'stack: https://' in self.output(), self.output()
        token = subprocess.run([sys.executable, 'service.py', 'token', 'create', '--name', f'stack-{self.https}',
                                '--scope', 'write'], cwd=ROOT, env=self.env, capture_output=True, text=True, check=True)
        self.token = token.stdout.splitlines()[-1]
        self.auth = {'Authorization': f'Bearer {self.token}'}

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def connection(self):
        return http.client.HTTPSConnection('127.0.0.1', self.https, timeout=10, context=INSECURE)

    def request(self, method, path, body=None, headers=None):
        conn = self.connection()
        try:
            conn.request(method, path, body, {**self.auth, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


INSECURE = ssl.create_default_context()
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE  # the stack's certificate is self-signed


def port_is_free(port):
    with socket.socket() as s:
        return s.connect_ex(('127.0.0.1', port)) != 0


@pytest.fixture
def stack(database_url):
    stack = Stack(database_url, CLIENT_TIMEOUT='2s')
    yield stack
    assert stack.stop() == 0  # SIGTERM stops everything cleanly


def test_original_curl_commands_over_https(stack):
    def curl(*args):
        result = subprocess.run(['curl', '-sk', '-w', '\n%{http_code}', '-H', f'Authorization: Bearer {stack.token}',
                                 *args], capture_output=True, text=True, timeout=10)
        body, status = result.stdout.rsplit('\n', 1)
        return int(status), body

    base = f'https://127.0.0.1:{stack.https}/resources/data/'
    status, body = curl(base, '-d', 'data={"name": "peter", "locale": "NYC", "age": 42}', '-X', 'PUT')
    assert status == 201
    person = json.loads(body)
    assert curl(base + str(person['id'])) == (200, body)
    assert curl(base + str(person['id']), '-X', 'DELETE') == (200, body)
    assert curl(base + str(person['id']))[0] == 404


def test_api_happy_paths_over_https(stack):
    status, headers, body = stack.request('POST', '/resources/data/', json.dumps({'name': 'ann', 'age': 3, 'locale': 'LA'}),
                                          {'Content-Type': 'application/json'})
    assert status == 201
    url = headers['location']
    status, headers, _ = stack.request('PATCH', url, json.dumps({'age': 4}),
                                       {'Content-Type': 'application/json', 'If-Match': headers['etag']})
    assert status == 200
    assert stack.request('GET', url, headers={'If-None-Match': headers['etag']})[0] == 304
    status, headers, body = stack.request('GET', '/resources/data/?locale=LA')
    assert status == 200 and json.loads(body)['items'][0]['age'] == 4
    assert headers['Strict-Transport-Security'].startswith('max-age=')
    assert stack.request('GET', '/resources/data/', headers={'Authorization': 'Bearer nope'})[0] == 401


def test_request_id_reaches_the_service_and_the_access_log(stack):
    status, headers, _ = stack.request('GET', '/resources/data/1', headers={'X-Request-ID': 'trace-me-42'})
    assert headers['x-request-id'] == 'trace-me-42'
    _, headers, _ = stack.request('GET', '/resources/data/1')
    assert re.fullmatch(r'[0-9a-f]{32}', headers['x-request-id'])  # nginx's own when the client sends none


def test_body_over_the_limit_gives_413_problem(stack):
    status, headers, body = stack.request('POST', '/resources/data/', b'x' * (70 * 1024),
                                          {'Content-Type': 'application/json'})
    assert status == 413 and headers['Content-Type'] == 'application/problem+json'
    assert json.loads(body)['status'] == 413


def test_http_redirects_to_https(stack):
    conn = http.client.HTTPConnection('127.0.0.1', stack.http, timeout=5)
    conn.request('GET', '/resources/data/7?x=1')
    response = conn.getresponse()
    assert response.status == 308
    assert response.getheader('Location') == f'https://127.0.0.1:{stack.https}/resources/data/7?x=1'


@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_unknown_host_gets_connection_closed(stack, scheme):
    if scheme == 'http':
        conn = http.client.HTTPConnection('127.0.0.1', stack.http, timeout=5)
    else:
        conn = stack.connection()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        conn.request('GET', '/resources/data/1', headers={'Host': 'evil.example'})
        conn.getresponse()


def test_two_requests_in_one_write_both_answered(stack):
    raw = socket.create_connection(('127.0.0.1', stack.https), timeout=5)
    tls = INSECURE.wrap_socket(raw, server_hostname='localhost')
    one = 'GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n'
    two = f'GET /resources/data/1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {stack.token}\r\nConnection: close\r\n\r\n'
    tls.sendall((one + two).encode())
    reply = b''
    while chunk := tls.recv(65536):
        reply += chunk
    tls.close()
    statuses = re.findall(rb'HTTP/1.1 (\d{3}) ', reply)
    assert statuses == [b'200', b'404']


def test_stalled_client_is_cut_off_while_others_are_served(stack):
    raw = socket.create_connection(('127.0.0.1', stack.https), timeout=10)
    stalled = INSECURE.wrap_socket(raw, server_hostname='localhost')
    stalled.sendall(b'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"na')
    started = time.monotonic()
    for _ in range(5):  # a single-threaded worker would be stuck behind the half request; nginx is not
        assert stack.request('GET', '/livez')[0] == 200
    answer = stalled.recv(65536)  # nginx gives up on the body after CLIENT_TIMEOUT (2 s here)
    assert time.monotonic() - started < 8
    assert answer == b'' or answer.startswith(b'HTTP/1.1 408')
    stalled.close()


def test_metrics_are_not_exposed_through_nginx(stack):
    assert stack.request('GET', '/metrics')[0] == 404


def test_burst_over_the_rate_gives_429_problem(database_url):
    stack = Stack(database_url, RATE='5', BURST='5')
    try:
        conn = stack.connection()
        statuses = []
        for _ in range(30):
            conn.request('GET', '/livez')
            response = conn.getresponse()
            body = response.read()
            statuses.append(response.status)
            if response.status == 429:
                assert response.getheader('Content-Type') == 'application/problem+json'
                assert json.loads(body)['status'] == 429
        assert 200 in statuses and 429 in statuses
    finally:
        assert stack.stop() == 0


# -- scale-out: two instances, one PostgreSQL, one nginx --------------------------------------------

def test_two_instances_share_postgresql_and_survive_losing_one(pg_schema):
    _, schema = pg_schema
    url = pg_url_in(schema)
    subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, env={**os.environ, 'DATABASE_URL': url},
                   check=True, capture_output=True)
    stack = Stack(url, INSTANCES='2', WORKERS='1')
    try:
        direct = [http.client.HTTPConnection('127.0.0.1', stack.service + i, timeout=5) for i in (0, 1)]
        direct[0].request('POST', '/resources/data/', json.dumps({'name': 'shared', 'age': 1, 'locale': 'x'}),
                          {**stack.auth, 'Content-Type': 'application/json'})
        created = json.loads(direct[0].getresponse().read())
        direct[1].request('GET', f"/resources/data/{created['id']}", headers=stack.auth)
        assert json.loads(direct[1].getresponse().read()) == created  # written through one, read through the other

        results, names = [], []

        def reads():
            conn = stack.connection()
            for _ in range(300):
                conn.request('GET', f"/resources/data/{created['id']}", headers=stack.auth)
                response = conn.getresponse()
                response.read()
                results.append(response.status)

        def writes():
            for i in range(60):
                name = f'w{i}'
                names.append(name)
                status, _, _ = stack.request('POST', '/resources/data/', json.dumps({'name': name, 'age': 1, 'locale': 'w'}),
                                             {'Content-Type': 'application/json'})
                results.append(('write', status))

        threads = [threading.Thread(target=reads), threading.Thread(target=writes)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        subprocess.run(['pkill', '-KILL', '-f', f'serve --port {stack.service + 1} '])  # one instance dies
        for t in threads:
            t.join(60)
        reads_seen = [s for s in results if not isinstance(s, tuple)]
        assert reads_seen == [200] * 300  # nginx retried reads on the other instance: no client saw an error
        writes_seen = [status for kind, status in (r for r in results if isinstance(r, tuple))]
        assert set(writes_seen) <= {201, 503}, writes_seen
        db = models.open_database(url)
        try:
            stored = [row[0] for row in db.execute_sql("SELECT name FROM people WHERE locale = 'w'")]
        finally:
            db.close()
        assert len(stored) == len(set(stored))  # no write was sent twice
        assert sum(1 for r in results if r == ('write', 201)) <= len(stored)
    finally:
        assert stack.stop() == 0
