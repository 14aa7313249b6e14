"""The files under deploy/ are valid for the tools that read them."""
import glob
import http.client
import json
import contextlib
import fnmatch
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

import storage
from conftest import ROOT, free_ports, make_on_a_taken_port, pg_url_in
from resources import MAX_BODY

DEPLOY = os.path.join(ROOT, 'deploy')


# nginx's headers-more module (Debian: libnginx-mod-http-headers-more-filter), which the stack loads.
HEADERS_MORE = '/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so'
PACKAGES = {'promtool': 'prometheus', HEADERS_MORE: 'libnginx-mod-http-headers-more-filter'}


def require(tool, variable):
    if shutil.which(tool) or os.path.exists(f'/usr/sbin/{tool}') or os.path.exists(tool):
        return
    if os.environ.get(variable) == '1':
        pytest.fail(f'{variable}=1 but {tool} is not installed')
    pytest.skip(f'{tool} is not installed (Debian package {PACKAGES.get(tool, tool)})')


def require_nginx():
    """nginx as the stack runs it: with the headers-more module, and openssl for the certificate."""
    for tool in ('nginx', HEADERS_MORE, 'openssl'):
        require(tool, 'REQUIRE_NGINX')


def test_prometheus_alert_rules_pass_promtool():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'check', 'rules', 'alerts.yml'], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'SUCCESS: 7 rules found' in result.stdout


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
    for name in UNITS + ['people-backup.timer', 'people.socket']:
        with open(os.path.join(DEPLOY, name)) as f:
            text = f.read()
        (tmp_path / name).write_text(text.replace('/opt/people/.venv/bin/python', os.path.realpath(sys.executable))
                                     .replace('/opt/people/people-backup', os.path.join(DEPLOY, 'people-backup'))
                                     .replace('/opt/people', ROOT))
    return tmp_path


@pytest.mark.parametrize('name', UNITS + ['people-backup.timer', 'people.socket'])
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
    assert len(names) == 5 and re.fullmatch(r'people-\d{8}T\d{6}Z\.backup', names[3])
    assert names[4] == names[3] + '.sha256'  # the new backup's checksum, beside it


def test_systemd_stop_timeout_outlasts_the_drain():
    with open(os.path.join(DEPLOY, 'people.service')) as f:
        text = f.read()
    stop = int(re.search(r'^TimeoutStopSec=(\d+)', text, re.M)[1])
    drain = float(re.search(r'DRAIN_SECONDS=([\d.]+)', text)[1])
    assert stop > drain + 5


def test_install_script_parses():
    assert subprocess.run(['bash', '-n', os.path.join(DEPLOY, 'install.sh')]).returncode == 0


def test_install_script_makes_a_certificate_of_one_year_at_most():
    """Mozilla's intermediate profile allows a certificate 366 days at most."""
    with open(os.path.join(DEPLOY, 'install.sh')) as f:
        assert re.findall(r'openssl req .*-days (\d+)', f.read()) == ['365']


def test_install_script_copies_every_application_module():
    """A module the VM lacks (server.py, when the master moved there) fails only on the VM, at start."""
    with open(os.path.join(DEPLOY, 'install.sh')) as f:
        patterns = re.findall(r'^cp "\$SRC"/([\w*]+\.py) "\$SRC"/([\w*]+\.sql) "\$APP"/', f.read(), re.M)
    tracked = subprocess.run(['git', 'ls-files', '*.py', '*.sql'], cwd=ROOT, capture_output=True, text=True).stdout.split()
    modules = {name for name in tracked if '/' not in name}
    assert len(patterns) == 1 and 'storage.py' in modules
    assert {name for name in modules if any(fnmatch.fnmatch(name, pattern) for pattern in patterns[0])} == modules


def commands_the_readme_runs():
    """Files of this repository that the README's code (and docs/') runs directly (`sudo deploy/install.sh ...`),
    not through an interpreter: each command's first word (after sudo and VAR=value), when a path."""
    text = ''
    for path in ['README.md', *glob.glob('docs/*.md', root_dir=ROOT)]:  # the README and the pages it links
        with open(os.path.join(ROOT, path)) as f:
            text += f.read()
    code = re.findall(r'^(?: {4}|\t)(.+)$', text, re.M) + re.findall(r'^ *```\w*\n(.*?)^ *```', text, re.M | re.S)
    code += [span for span in re.findall(r'`([^`\n]+)`', text) if ' ' in span]  # inline: commands have arguments
    tracked = set(subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True).stdout.split())
    found = set()
    for command in re.split(r'\n|&&|\|\||;|\||\$\(', '\n'.join(code)):
        words = [w for w in command.split() if not re.fullmatch(r'[A-Z_]+=\S*', w)]
        while words[:1] == ['sudo']:
            words = words[3:] if words[1:2] == ['-u'] else words[1:]
        if words and '/' in words[0] and words[0].removeprefix('./') in tracked:  # a path: run as a program
            found.add(words[0].removeprefix('./'))
    return found


def test_what_the_readme_runs_is_executable_in_git():
    runs = commands_the_readme_runs()
    assert 'deploy/install.sh' in runs, runs
    modes = subprocess.run(['git', 'ls-files', '-s', *runs], cwd=ROOT, capture_output=True, text=True).stdout
    assert {line.split()[3]: line.split()[0] for line in modes.splitlines()} == dict.fromkeys(runs, '100755')
    for path in runs:
        with open(os.path.join(ROOT, path)) as f:
            assert f.readline().startswith('#!'), path


# -- nginx, through `make stack` ------------------------------------------------------------------

def test_nginx_config_passes_nginx_t_without_a_warning():
    require_nginx()
    result = subprocess.run([sys.executable, os.path.join(DEPLOY, 'stack.py'), '--check'], capture_output=True,
                            text=True)
    assert result.returncode == 0 and 'test is successful' in result.stdout, result.stdout + result.stderr
    assert '[warn]' not in result.stdout  # e.g. OCSP stapling of a certificate that names no responder


def tls_servers():
    """The ssl_ lines (but the certificate's) of each TLS server block of the site, in order."""
    with open(os.path.join(DEPLOY, 'nginx-people.conf')) as f:
        blocks = re.split(r'^server \{', f.read(), flags=re.M)[1:]
    return [re.findall(r'^\s+(ssl_(?!certificate)\w+ .*);', block, re.M) for block in blocks
            if re.search(r'^\s+listen \S+ ssl', block, re.M)]


def test_nginx_caps_bodies_where_the_service_does():
    """A bulk create of MAX_BATCH people fits through nginx exactly as far as the service takes it."""
    with open(os.path.join(DEPLOY, 'nginx-people.conf')) as f:
        conf = f.read()
    assert int(re.search(r'client_max_body_size (\d+)m;', conf)[1]) * 1024 * 1024 == MAX_BODY
    assert f'413 "A request body may be at most {MAX_BODY} bytes.";' in conf


def test_every_tls_server_has_the_same_tls_settings():
    """A handshake without SNI gets the default server's settings, one with SNI some of each: each TLS
    server must say the same, or what a client gets depends on whether it sends SNI."""
    servers = tls_servers()
    assert len(servers) == 2 and servers[0] == servers[1], servers
    assert 'ssl_protocols TLSv1.2 TLSv1.3' in servers[0] and 'ssl_session_tickets off' in servers[0]


class Stack:
    """deploy/stack.py (what `make stack` runs) on free ports, with a write token."""

    def __init__(self, database_url, **env):
        require_nginx()
        instances = int(env.get('INSTANCES', 1))
        self.https, self.http, self.service = free_ports(3)
        while instances > 1 and (not port_is_free(self.service + 1) or self.service + 1 in (self.https, self.http)):
            self.https, self.http, self.service = free_ports(3)
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
    """Nothing listens on it and no connection holds it: a busy machine's outgoing connections take
    even ports like the one after free_port()'s odd one, and then the second instance cannot bind."""
    with socket.socket() as s:
        try:
            s.bind(('127.0.0.1', port))
            return True
        except OSError:
            return False


def test_make_stack_on_a_taken_port_prints_only_the_stacks_line():
    """As `make run`: the stack says why in one line, and make adds no "*** [Makefile:N: stack] Error 1"."""
    require_nginx()
    port, status, printed = make_on_a_taken_port('stack', 'HTTPS_PORT')
    assert status != 0
    assert printed == f'stack: port {port} is taken (Address already in use): set HTTPS_PORT to a free port\n'


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
    assert 'Server' not in headers  # no header names the software
    assert stack.request('GET', '/resources/data/', headers={'Authorization': 'Bearer nope'})[0] == 401


def test_request_id_reaches_the_service_and_the_access_log(stack):
    status, headers, _ = stack.request('GET', '/resources/data/1', headers={'X-Request-ID': 'trace-me-42'})
    assert headers['x-request-id'] == 'trace-me-42'
    _, headers, _ = stack.request('GET', '/resources/data/1')
    assert re.fullmatch(r'[0-9a-f]{32}', headers['x-request-id'])  # nginx's own when the client sends none


def test_body_over_the_limit_gives_413_problem(stack):
    status, headers, body = stack.request('POST', '/resources/data/', b'x' * (MAX_BODY + 1),
                                          {'Content-Type': 'application/json'})
    assert status == 413 and headers['Content-Type'] == 'application/problem+json'
    assert json.loads(body)['status'] == 413


@pytest.mark.parametrize('body', ['none', 'over nginx\'s limit'])
def test_plain_http_to_the_service_is_refused_with_403_problem(edge, body):
    """Not redirected: a client that follows redirects would never notice its token went in clear."""
    head = 'GET /resources/data/7?x=1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer leaked\r\n'
    if body != 'none':
        head = head.replace('GET', 'POST') + 'Content-Length: 2000000\r\n'
    status, headers, problem = parse(exchange(edge.http, (head + 'Connection: close\r\n\r\n').encode(), tls=False))
    assert status == 403 and headers['content-type'] == 'application/problem+json' and 'location' not in headers
    problem = json.loads(problem)
    assert problem['status'] == 403 and 'https' in problem['detail']


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


@pytest.mark.parametrize('method', ['GET', 'POST'])
def test_burst_over_the_rate_gives_429_problem(database_url, method):
    stack = Stack(database_url, RATE='5', BURST='5')
    try:
        conn = stack.connection()
        statuses = []
        for i in range(30):
            if method == 'GET':
                conn.request('GET', '/livez')
            else:  # a write reaches nginx's @write location, which must answer the same way
                conn.request('POST', '/resources/data/', json.dumps({'name': f'r{i}', 'age': 1, 'locale': 'x'}),
                             {**stack.auth, 'Content-Type': 'application/json'})
            response = conn.getresponse()
            body = response.read()
            statuses.append(response.status)
            if response.status == 429:
                assert_security_headers_once(response.getheaders())
                assert response.getheader('Content-Type') == 'application/problem+json'
                assert response.getheader('Retry-After') == '1'
                assert json.loads(body)['status'] == 429
        assert {200 if method == 'GET' else 201, 429} <= set(statuses)
    finally:
        assert stack.stop() == 0


# -- what nginx answers by itself ---------------------------------------------------------------------

def exchange(port, data, sni='localhost', tls=True, timeout=10):
    """Send raw bytes on one new connection (TLS with this SNI, or plain); everything read until close."""
    raw = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    conn = INSECURE.wrap_socket(raw, server_hostname=sni) if tls else raw
    try:
        conn.sendall(data)
        reply = b''
        while chunk := conn.recv(65536):
            reply += chunk
        return reply
    except ConnectionResetError:
        return reply
    finally:
        conn.close()


def parse(reply):
    """(status, lower-cased headers, body) of one HTTP/1.1 response."""
    head, _, body = reply.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    headers = dict((name.lower(), value.strip()) for name, _, value in (line.partition(':') for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope='module')
def edge(tmp_path_factory):
    """One stack for the requests nginx answers itself: which database is behind it does not matter."""
    stack = Stack(f"sqlite:///{tmp_path_factory.mktemp('edge')}/people.db")
    yield stack
    assert stack.stop() == 0


def service_pids(stack):
    """The pids of the service processes behind the stack (stack.py's children but nginx, and theirs)."""
    def children(pid):
        try:
            with open(f'/proc/{pid}/task/{pid}/children') as f:
                return [int(child) for child in f.read().split()]
        except FileNotFoundError:
            return []
    services = [pid for pid in children(stack.process.pid) if b'service.py' in open(f'/proc/{pid}/cmdline', 'rb').read()]
    return services + [worker for pid in services for worker in children(pid)]


LONG = 'a' * 9000  # over large_client_header_buffers' 8 KiB
NGINX_ERRORS = {  # what nginx itself refuses, before the service sees it -> the status it must answer
    'malformed request line': (b'get / HTTP/1.1\r\nHost: localhost\r\n\r\n', 400),
    'path above the root': (b'GET /../x HTTP/1.1\r\nHost: localhost\r\n\r\n', 400),
    'malformed chunked body': (b'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked'
                               b'\r\n\r\nzz\r\n', 400),
    'Content-Length and Transfer-Encoding': (b'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1'
                                             b'\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400),
    'invalid Content-Length': (b'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1x\r\n\r\n', 400),
    'plain HTTP to the HTTPS port': (b'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n', 400),
    'metrics': (b'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', 404),
    'the error page itself': (b'GET /people_problem HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
                              404),
    'TRACE': (b'TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n', 405),
    'request line too long': (f'GET /{LONG} HTTP/1.1\r\nHost: localhost\r\n\r\n'.encode(), 414),
    'header too large': (f'GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {LONG}\r\n\r\n'.encode(), 431),
    'unknown Transfer-Encoding': (b'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip'
                                  b'\r\n\r\n', 501),
    'HTTP/2.0 in an HTTP/1 request line': (b'GET / HTTP/2.0\r\nHost: localhost\r\n\r\n', 505),
}


@pytest.mark.parametrize('case', list(NGINX_ERRORS))
def test_errors_nginx_makes_are_problem_json(edge, case):
    request_bytes, status = NGINX_ERRORS[case]
    reply = exchange(edge.https, request_bytes, tls=case != 'plain HTTP to the HTTPS port')
    got, headers, body = parse(reply)
    assert got == status, reply
    assert headers['content-type'] == 'application/problem+json'
    problem = json.loads(body)
    assert problem['status'] == status and problem['title'] and problem['detail']
    assert 'server' not in headers and b'nginx' not in reply


def test_service_down_gives_503_problem_with_retry_after(database_url):
    """Nothing left on the upstream port: not an instance, nor the stack that holds each one's socket (as
    systemd's people.socket does) and would start it again."""
    stack = Stack(database_url)
    work = re.search(r'files in (\S+?),? deleted on stop', stack.output())[1]
    services = service_pids(stack)
    try:
        stack.process.kill()
        stack.process.wait()
        for pid in services:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not port_is_free(stack.service) and time.monotonic() < deadline:
            time.sleep(0.05)
        status, headers, body = stack.request('GET', '/resources/data/1')
        assert status == 503 and headers['Content-Type'] == 'application/problem+json'
        assert headers['Retry-After'] == '1' and json.loads(body)['status'] == 503
        assert 'Server' not in headers
    finally:
        with open(os.path.join(work, 'nginx.pid')) as f:
            os.kill(int(f.read()), signal.SIGQUIT)
        for pid in services:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


NO_HOST = {  # requests that do not name this service get no answer at all, like an unknown host
    'no Host header': (b'GET / HTTP/1.1\r\n\r\n', 'https', 'localhost'),
    'request line too long, no SNI': (f'GET /{LONG} HTTP/1.1\r\nHost: localhost\r\n\r\n'.encode(), 'https', None),
    'request line too long, plain HTTP': (f'GET /{LONG} HTTP/1.1\r\nHost: localhost\r\n\r\n'.encode(), 'http', None),
    'header too large, plain HTTP': (f'GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {LONG}\r\n\r\n'.encode(),
                                     'http', None),
}


@pytest.mark.parametrize('request_bytes, scheme, sni', NO_HOST.values(), ids=list(NO_HOST))
def test_unparseable_requests_naming_no_host_get_connection_closed(edge, request_bytes, scheme, sni):
    port = edge.https if scheme == 'https' else edge.http
    assert exchange(port, request_bytes, sni=sni, tls=scheme == 'https') == b''


# -- TLS and the headers of every answer ------------------------------------------------------------

SECURITY_HEADERS = {'x-content-type-options': 'nosniff', 'cache-control': 'no-store', 'x-frame-options': 'DENY',
                    'content-security-policy': "frame-ancestors 'none'", 'referrer-policy': 'no-referrer',
                    'cross-origin-resource-policy': 'same-origin'}


def assert_security_headers_once(headers):
    """headers: (name, value) pairs as sent; each security header exactly once, whoever set it."""
    sent = {name: [value for key, value in headers if key.lower() == name] for name in SECURITY_HEADERS}
    assert sent == {name: [value] for name, value in SECURITY_HEADERS.items()}, headers


SECURITY_HEADER_CASES = {  # who answers -> (method, path, body, with the token, the status)
    'a service answer': ('GET', '/livez', None, True, 200),
    "the service's own error": ('GET', '/resources/data/', None, False, 401),
    "nginx's 413": ('POST', '/resources/data/', b'x' * (MAX_BODY + 1), True, 413),
    "nginx's 404 for /metrics": ('GET', '/metrics', None, True, 404),
}


@pytest.mark.parametrize('case', list(SECURITY_HEADER_CASES))
def test_every_answer_carries_the_security_headers_once(edge, case):
    method, path, body, with_token, status = SECURITY_HEADER_CASES[case]
    conn = edge.connection()
    try:
        conn.request(method, path, body, edge.auth if with_token else {})
        response = conn.getresponse()
        assert response.status == status
        assert_security_headers_once(response.getheaders())
        assert response.getheader('Strict-Transport-Security') == 'max-age=63072000'
    finally:
        conn.close()


def test_plain_http_refusal_carries_the_security_headers_once(edge):
    conn = http.client.HTTPConnection('127.0.0.1', edge.http, timeout=5)
    conn.request('GET', '/livez')
    response = conn.getresponse()
    assert response.status == 403
    assert_security_headers_once(response.getheaders())


SNI = pytest.mark.parametrize('sni', ['localhost', None], ids=['SNI', 'no SNI'])


def handshake(port, sni, *options):
    """openssl s_client to port with these options, sending this SNI (or none), asking for /livez:
    (its exit code, what it printed)."""
    command = ['openssl', 's_client', '-connect', f'127.0.0.1:{port}', '-ign_eof',
               *(['-servername', sni] if sni else ['-noservername']), *options]
    result = subprocess.run(command, input=b'GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
                            capture_output=True, timeout=20)
    return result.returncode, (result.stdout + result.stderr).decode('latin-1')


TLS_SERVED = {  # options -> what is negotiated
    'TLS 1.3, by default': ([], 'New, TLSv1.3, Cipher is TLS_'),
    'TLS 1.2': (['-tls1_2'], 'New, TLSv1.2, Cipher is ECDHE-ECDSA-AES256-GCM-SHA384'),
}


@SNI
@pytest.mark.parametrize('case', list(TLS_SERVED))
def test_tls_versions_served(edge, sni, case):
    options, negotiated = TLS_SERVED[case]
    code, said = handshake(edge.https, sni, *options)
    assert code == 0 and negotiated in said and 'HTTP/1.1 200 OK' in said, said


TLS_REFUSED = {  # SECLEVEL=0 lets this client offer what OpenSSL 3 would not: the server must refuse it
    'TLS 1.1': ['-tls1_1', '-cipher', 'DEFAULT:@SECLEVEL=0'],
    'TLS 1.0': ['-tls1', '-cipher', 'DEFAULT:@SECLEVEL=0'],
    'CBC with SHA-1': ['-tls1_2', '-cipher', 'ECDHE-ECDSA-AES128-SHA'],
    'CBC with SHA-256': ['-tls1_2', '-cipher', 'ECDHE-ECDSA-AES128-SHA256'],
}


@SNI
@pytest.mark.parametrize('case', list(TLS_REFUSED))
def test_tls_versions_and_suites_outside_mozilla_intermediate_are_refused(edge, sni, case):
    code, said = handshake(edge.https, sni, *TLS_REFUSED[case])
    assert code != 0 and 'HTTP/1.1' not in said and 'Cipher is (NONE)' in said, said


@SNI
def test_key_exchange_only_on_x25519_p256_p384(edge, sni):
    """Each group offered first (P-256 after it, which the certificate needs in TLS 1.2): the server
    takes the client's first choice when it allows it, and P-256 otherwise."""
    chosen = {}
    for version in ('-tls1_2', '-tls1_3'):
        for group in ('X25519', 'P-256', 'P-384', 'X448', 'P-521'):
            _, said = handshake(edge.https, sni, version, '-groups', group if group == 'P-256' else f'{group}:P-256')
            key = re.search(r'^Server Temp Key: (?:ECDH, )?(\w+)', said, re.M)
            chosen[version, group] = key and key[1]
    assert chosen == {(version, group): name for version in ('-tls1_2', '-tls1_3') for group, name in
                      [('X25519', 'X25519'), ('P-256', 'prime256v1'), ('P-384', 'secp384r1'),
                       ('X448', 'prime256v1'), ('P-521', 'prime256v1')]}


@SNI
def test_no_session_ticket_is_issued(edge, sni):
    """TLS 1.2: no ticket at all. TLS 1.3 always sends one, but without tickets nginx's is only the
    32-byte id of a session kept in its cache, never the session encrypted under a ticket key."""
    code, said = handshake(edge.https, sni, '-tls1_2')
    assert code == 0 and 'TLS session ticket' not in said, said
    code, said = handshake(edge.https, sni, '-tls1_3')
    tickets = re.findall(r'TLS session ticket:\n((?:\s+[0-9a-f]{4} - .*\n)+)', said)
    assert code == 0 and tickets and all(len(ticket.splitlines()) <= 2 for ticket in tickets), said


@SNI
@pytest.mark.parametrize('version', ['-tls1_2', '-tls1_3'])
def test_sessions_resume_from_the_cache(edge, sni, version, tmp_path):
    session = str(tmp_path / 'session.pem')
    code, said = handshake(edge.https, sni, version, '-sess_out', session)
    assert code == 0 and 'New, TLSv1.' in said, said
    code, said = handshake(edge.https, sni, version, '-sess_in', session)
    assert code == 0 and f'Reused, TLSv1.{version[-1]}' in said, said


def test_sslyze_finds_mozilla_intermediate_but_for_the_self_signed_certificate(edge):
    """sslyze's own check (pinned with the test packages): protocols, suites, curves, the certificate's
    key, signature and lifespan, known attacks. A self-signed certificate is all it may find."""
    result = subprocess.run([sys.executable, '-m', 'sslyze', '--mozilla_config=intermediate',
                             f'localhost:{edge.https}{{127.0.0.1}}'], capture_output=True, text=True, timeout=300)
    report = result.stdout.partition('COMPLIANCE AGAINST')[2]
    assert re.findall(r'^\s+\* (\w+):', report, re.M) == ['certificate_path_validation'], result.stdout


def test_slowloris_from_one_address_leaves_others_served(tmp_path):
    """1,024 slow TLS uploads from 127.0.0.2 (a body byte now and then) while 127.0.0.1 is served.

    1,024 connections filled the old worker_connections; now one address holds at most 64 requests
    (limit_conn), the rest are refused with 429, and nginx has room for them all.
    """
    slow, legit = 1024, 5
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < slow + 256:
        pytest.skip(f'RLIMIT_NOFILE hard limit {hard} is too low for {slow} connections')
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, slow + 256), hard))
    stack = Stack(f'sqlite:///{tmp_path}/people.db', CLIENT_TIMEOUT='10s', RATE='100000', BURST='100000')
    head = (f'POST /resources/data/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {stack.token}\r\n'
            f'Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{{').encode()
    held, fed = [], time.monotonic()

    def feed():  # a byte to each, well within client_body_timeout: each body stays in progress
        for conn in held:
            try:
                conn.send(b' ')
            except OSError:
                pass  # closed by nginx: refused and drained, or timed out

    try:
        for _ in range(slow):
            raw = socket.create_connection(('127.0.0.1', stack.https), timeout=5, source_address=('127.0.0.2', 0))
            try:
                conn = INSECURE.wrap_socket(raw, server_hostname='localhost')
                conn.sendall(head)
            except OSError:  # nginx has no connection left to give
                raw.close()
                break
            held.append(conn)
            if time.monotonic() - fed > 2:
                feed()
                fed = time.monotonic()
        feed()
        served = []
        for _ in range(legit):  # new connections from another address, while the slow ones are held
            try:
                reply = exchange(stack.https, b'GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
                                 timeout=5)
                served.append(parse(reply)[0])
            except OSError as error:
                served.append(repr(error))
        assert served == [200] * legit
        assert len(held) == slow

        replies, deadline = {conn: b'' for conn in held}, time.monotonic() + 30
        with selectors.DefaultSelector() as selector:  # all but 64 are refused at once, as problem+json
            for conn in held:
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
            while sum(reply.endswith(b'}') for reply in replies.values()) < slow - 64 and time.monotonic() < deadline:
                for key, _ in selector.select(1):
                    try:
                        chunk = key.fileobj.recv(65536)
                    except ssl.SSLWantReadError:
                        continue
                    except OSError:
                        chunk = b''
                    replies[key.fileobj] += chunk
                    if not chunk:
                        selector.unregister(key.fileobj)
        answered = [parse(reply) for reply in replies.values() if reply]
        assert len(answered) == slow - 64
        assert all(status == 429 and headers['retry-after'] == '1' and json.loads(body)['status'] == 429
                   for status, headers, body in answered)
    finally:
        for conn in held:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert stack.stop() == 0


def test_stack_with_a_database_it_cannot_open_says_why_in_two_lines(tmp_path):
    """Found walking the README: make stack on a PostgreSQL database not yet created printed two tracebacks."""
    require_nginx()
    ports = free_ports(3)
    url = f'sqlite:///{tmp_path}/missing/p.db'
    env = {**os.environ, 'DATABASE_URL': url, 'HTTPS_PORT': str(ports[0]), 'HTTP_PORT': str(ports[1]),
           'SERVICE_PORT': str(ports[2])}
    result = subprocess.run([sys.executable, os.path.join(DEPLOY, 'stack.py')], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'init-db failed: cannot open {url}: unable to open database file',
        'stack: service.py init-db failed (exit 1; why is above): stopping'], result.stderr


@pytest.mark.parametrize('taken', ['HTTP_PORT', 'SERVICE_PORT'])
def test_stack_refuses_a_taken_port_before_saying_it_is_ready(tmp_path, taken):
    """Without the check, a foreign listener on nginx's HTTP port got the banner, then nginx failed."""
    require_nginx()
    with socket.create_server(('127.0.0.1', 0)) as foreign:
        ports = free_ports(3)  # while the foreign one is held, so none is it
        env = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/p.db', 'HTTPS_PORT': str(ports[0]),
               'HTTP_PORT': str(ports[1]), 'SERVICE_PORT': str(ports[2]),
               taken: str(foreign.getsockname()[1])}
        result = subprocess.run([sys.executable, os.path.join(DEPLOY, 'stack.py')], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and 'stack: https://' not in result.stderr, result.stderr
    assert result.stderr == f'stack: port {env[taken]} is taken (Address already in use): set {taken} to a free port\n'


def test_stack_banner_masks_the_database_password(pg_schema):
    """The banner's token command names DATABASE_URL: never with its password (loopback trusts any here)."""
    _, schema = pg_schema
    url = urlsplit(pg_url_in(schema))
    if url.password is None:
        url = url._replace(netloc=f'{url.username or "postgres"}:banner-secret@{url.hostname}:{url.port or 5432}')
    stack = Stack(urlunsplit(url))
    try:
        assert url.password not in stack.output()
        assert f"DATABASE_URL='{url.scheme}://{url.username}:***@" in stack.output()  # quoted for the shell
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
        db = storage.open_database(url)
        try:
            stored = [row[0] for row in db.execute_sql("SELECT name FROM people WHERE locale = 'w'")]
        finally:
            db.close()
        assert len(stored) == len(set(stored))  # no write was sent twice
        assert sum(1 for r in results if r == ('write', 201)) <= len(stored)
    finally:
        assert stack.stop() == 0


def test_people_admin_database_url_overrides_people_env(tmp_path):
    """people-admin reads the service's people.env; --database-url runs init-db as another role (the
    owner), which the least-privilege DATABASE_URL there may not do. Paths pointed at this checkout."""
    with open(os.path.join(DEPLOY, 'people-admin')) as f:
        text = f.read()
    env_file = tmp_path / 'people.env'
    env_file.write_text(f'DATABASE_URL=sqlite:///{tmp_path}/service.db\n')
    script = tmp_path / 'people-admin'
    script.write_text(text.replace('[ "$(id -u)" = 0 ] && exec runuser', 'false && exec runuser')  # tests may run as root
                      .replace('/etc/people/people.env', str(env_file))
                      .replace('/opt/people/.venv/bin/python', sys.executable).replace('/opt/people', ROOT))
    run = [('sh', str(script), 'init-db'),
           ('sh', str(script), '--database-url', f'sqlite:///{tmp_path}/owner.db', 'init-db')]
    said = [subprocess.run(command, capture_output=True, text=True, check=True).stderr for command in run]
    assert said == [f'init-db: done in sqlite:///{tmp_path}/service.db\n',
                    f'init-db: done in sqlite:///{tmp_path}/owner.db\n']


def test_install_renders_nginx_upstream_with_the_port_of_people_env(tmp_path):
    """Runs install.sh's own PORT lines (the rest needs root and a VM) on a people.env."""
    with open(os.path.join(DEPLOY, 'install.sh')) as f:
        script = f.read()
    lines = re.findall(r'^PORT=.*\n', script, re.M)
    assert len(lines) == 2 and 'server 127.0.0.1:$PORT ' in script
    (tmp_path / 'people.env').write_text('# PORT=1\nWORKERS=2\nPORT="9001"\n')
    (tmp_path / 'default' / 'people.env').parent.mkdir()
    (tmp_path / 'default' / 'people.env').write_text('# PORT=1\n')
    ports = [subprocess.run(['bash', '-c', f'ETC={etc}\n{"".join(lines)}echo $PORT'], capture_output=True, text=True,
                            check=True).stdout.strip() for etc in (tmp_path, tmp_path / 'default')]
    assert ports == ['9001', '8000']


def test_make_stack_puts_pgbouncer_between_the_instances_and_postgresql(pooler):
    pooler.admin.cursor().execute('DROP TABLE IF EXISTS people, tokens, idempotency_keys')
    url = urlsplit(pooler.url)
    # One instance: the stack's consecutive instance ports could meet the pooler's outgoing ones.
    stack = Stack(urlunsplit(url._replace(netloc=url.netloc.replace(f':{pooler.port}', ':5432'))), POOLER='1')
    try:
        assert 'stack: PgBouncer on 127.0.0.1:' in stack.output()
        status, headers, body = stack.request('POST', '/resources/data/', json.dumps({'name': 'p', 'age': 1, 'locale': 'x'}),
                                              {'Content-Type': 'application/json'})
        assert status == 201
        assert [stack.request('GET', headers['location'])[0] for _ in range(4)] == [200] * 4
        assert f'login attempt: db={pooler.database} user={pooler.database} tls=TLSv1.3' in stack.output()  # through
        # PgBouncer, over TLS: the instances' URL verifies the pooler's certificate (sslmode=verify-full)
    finally:
        assert stack.stop() == 0  # to the whole group, as a terminal's Ctrl-C
    # PgBouncer stops last, so the instances add their token's use to the database through it as they leave.
    cursor = pooler.admin.cursor()
    cursor.execute('SELECT requests FROM tokens WHERE name = %s', (f'stack-{stack.https}',))
    assert cursor.fetchone() == (5,), stack.output()


def test_a_stack_killed_outright_leaves_no_pgbouncer(pooler):
    """PgBouncer runs in a session of its own (Ctrl-C must not take it before the instances): a stack killed
    with SIGKILL, which no handler sees, still takes it along."""
    url = urlsplit(pooler.url)
    stack = Stack(urlunsplit(url._replace(netloc=url.netloc.replace(f':{pooler.port}', ':5432'))), POOLER='1')
    work = re.search(r'files in (\S+?), deleted on stop', stack.output())[1]
    try:
        own = [line.split()[0] for line in subprocess.run(['pgrep', '-a', '-x', 'pgbouncer'], capture_output=True,
                                                          text=True).stdout.splitlines() if work in line]
        assert len(own) == 1, stack.output()
        os.kill(stack.process.pid, signal.SIGKILL)
        stack.stop()  # SIGKILL to what is left of its group: the instances and nginx
        deadline = time.monotonic() + 10
        while os.path.exists(f'/proc/{own[0]}') and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f'/proc/{own[0]}')
    finally:
        subprocess.run(['pkill', '-f', work])
        shutil.rmtree(work, ignore_errors=True)


def test_install_moves_people_socket_to_the_port_of_people_env(tmp_path):
    """Runs install.sh's own line that sets the socket's address on a copy of deploy/people.socket."""
    with open(os.path.join(DEPLOY, 'install.sh')) as f:
        line = re.search(r'^sed -i .*ListenStream.*people\.socket$', f.read(), re.M)[0]
    shutil.copy(os.path.join(DEPLOY, 'people.socket'), tmp_path)
    subprocess.run(['bash', '-c', f'PORT=9001\n{line.replace("/etc/systemd/system/", str(tmp_path) + "/")}'], check=True)
    assert re.findall(r'^ListenStream=.*$', (tmp_path / 'people.socket').read_text(), re.M) == ['ListenStream=127.0.0.1:9001']
