"""The container image (Containerfile), built and run with podman as a user would: tokens on, data
in its volume across containers, a non-root user, a clean stop under load as PID 1."""
import functools
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, free_port
from test_server import committed_but_unanswered, drain_under_load

# Building the images (about a minute each here) counts in the first test that needs them.
pytestmark = pytest.mark.timeout(600)

BASE = 'localhost/debian:bookworm-slim'  # what the Containerfile's FROM debian:bookworm-slim finds
CA_BUNDLE = '/etc/ssl/certs/ca-certificates.crt'


# compose's service names resolve through CNI's dnsname plugin (Debian's package of it).
DNSNAME = '/usr/lib/cni/dnsname'
PACKAGES = {DNSNAME: 'golang-github-containernetworking-plugin-dnsname'}


def require_podman(*tools):
    missing = [tool for tool in ('podman', 'runc', 'debootstrap', *tools) if not shutil.which(tool)
               and not os.path.exists(f'/usr/sbin/{tool}') and not os.path.exists(tool)]
    if missing:
        packages = ' '.join(PACKAGES.get(tool, tool) for tool in missing)
        if os.environ.get('REQUIRE_PODMAN') == '1':
            pytest.fail(f'REQUIRE_PODMAN=1 but {packages} is not installed')
        pytest.skip(f'not installed: Debian packages {packages}')


def podman(*args, check=True, timeout=600, **kwargs):
    result = subprocess.run(['podman', *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode:
        raise AssertionError(f'podman {" ".join(args)}: {result.returncode}\n{result.stdout}{result.stderr}')
    return result


def debian_mirror():
    """The mirror apt uses here (the base must come from where this machine may download)."""
    for path in ('/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'):
        if os.path.exists(path):
            with open(path) as f:
                found = re.search(r'(?:URIs:|^deb)\s+(\S+/debian)\s', f.read(), re.M)
            if found:
                return found[1]
    return 'http://deb.debian.org/debian'


@pytest.fixture(scope='session')
def image(tmp_path_factory):
    """The image, built once a run from this checkout, and removed after it; the Debian base is made
    with debootstrap when missing (no registry is reachable here) and kept for the next run."""
    require_podman()
    work = tmp_path_factory.mktemp('podman')
    # crun fails on this kernel's cgroups, and the default ulimits are refused: see docs/deploy.md.
    (work / 'containers.conf').write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n')
    os.environ['CONTAINERS_CONF'] = str(work / 'containers.conf')
    if podman('image', 'exists', BASE, check=False).returncode:
        rootfs = work / 'rootfs'
        subprocess.run(['debootstrap', '--variant=minbase', 'bookworm', str(rootfs), debian_mirror()],
                       check=True, capture_output=True, timeout=600)
        with subprocess.Popen(['tar', '-C', str(rootfs), '-c', '.'], stdout=subprocess.PIPE) as tar:
            podman('import', '-', BASE, stdin=tar.stdout)
        shutil.rmtree(rootfs)
    # pip inside the build trusts the host's CA bundle (downloads go through a proxy only the host
    # trusts), mounted for the build only: never part of the image.
    (work / 'pip.conf').write_text('[global]\ncert = /etc/ssl/host-ca.crt\n')
    tag = f'localhost/people-test:{uuid.uuid4().hex[:8]}'
    started = time.monotonic()
    podman('build', '--format', 'docker', '--pull=never', '--layers=false', '--network', 'host',
           '--volume', f'{CA_BUNDLE}:/etc/ssl/host-ca.crt:ro', '--volume', f'{work}/pip.conf:/etc/pip.conf:ro',
           '--tag', tag, ROOT, timeout=900)
    print(f'\nimage built in {time.monotonic() - started:.0f} s')
    yield tag
    podman('rmi', '--force', tag, check=False)


class Container:
    """`podman run IMAGE serve` in the foreground (its exit status is the container's), on a free port
    of the host's network, with `data` (a host directory) as its /data."""

    def __init__(self, image, data, **env):
        self.name, self.port, self.logs = f'people-test-{uuid.uuid4().hex[:8]}', free_port(), ''
        settings = [f'--env={k}={v}' for k, v in {'PORT': self.port, **env}.items()]
        self.process = subprocess.Popen(
            ['podman', 'run', '--name', self.name, '--network', 'host', '--health-interval', 'disable',
             '--volume', f'{data}:/data', *settings, image],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.answers():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f'not serving within 30 s:\n{self.output()}'
            time.sleep(0.1)

    def answers(self):
        try:
            return call(self.port, 'GET', '/livez')[0] == 200
        except OSError:
            return False

    def output(self):
        if self.process.poll() is None or not self.logs:
            logs = podman('logs', self.name, check=False)
            self.logs = self.logs or logs.stdout + logs.stderr
        return self.logs

    def signal_group(self, signum):  # what `podman stop` does: the signal to PID 1, the master
        podman('kill', '--signal', str(int(signum)), self.name)

    def stop(self):
        if self.process.poll() is None:
            podman('stop', '--time', '10', self.name, check=False)
            self.process.wait(30)
        self.output()  # kept for assertions made after the container is gone
        podman('rm', '--force', self.name, check=False)


@pytest.fixture
def data(tmp_path):
    """A host directory for /data, owned by the image's user as a named volume would be."""
    path = tmp_path / 'data'
    path.mkdir()
    os.chown(path, 10001, 10001)
    return path


@pytest.fixture
def container(image, data):
    container = Container(image, data)
    yield container
    container.stop()


def call(port, method, path, body=None, token=None):
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {token}'} if token else {})}
    connection.request(method, path, json.dumps(body) if body else None, headers)
    response = connection.getresponse()
    return response.status, response.read()


def command(image, data, *args):
    """The service's command line in a one-off container on the same /data."""
    return podman('run', '--rm', '--network', 'host', '--volume', f'{data}:/data', image, *args).stdout.strip()


def test_image_serves_with_tokens_on_and_keeps_its_data_in_the_volume(image, data):
    command(image, data, 'init-db')
    token = command(image, data, 'token', 'create', '--name', 'ci', '--scope', 'write')
    first = Container(image, data)
    try:
        assert call(first.port, 'GET', '/resources/data/')[0] == 401
        status, body = call(first.port, 'POST', '/resources/data/', {'name': 'Ada', 'age': 36, 'locale': 'en'}, token)
        assert status == 201, body
        created = json.loads(body)
    finally:
        first.stop()
    second = Container(image, data)  # a new container on the same volume: the person and the token are there
    try:
        status, body = call(second.port, 'GET', f"/resources/data/{created['id']}", token=token)
        assert (status, json.loads(body)) == (200, created)
    finally:
        second.stop()
    command(image, data, 'backup', '/data/people.backup')
    assert (data / 'people.backup').stat().st_size > 0


def test_image_runs_as_a_non_root_user_with_a_healthcheck(image, container):
    assert podman('image', 'inspect', image, '--format', '{{.Config.User}}').stdout.strip() == '10001:10001'
    users = podman('top', container.name, 'user', 'args').stdout.splitlines()[1:]
    assert len(users) == 3 and all(line.split()[0] == 'people' for line in users), users  # the master, 2 workers
    assert podman('healthcheck', 'run', container.name, check=False).returncode == 0


def test_master_as_pid_1_reaps_orphans_and_serves_on(container):
    """A process `podman exec` leaves behind becomes PID 1's child: the master once failed on its exit."""
    podman('exec', container.name, '/opt/people/venv/bin/python', '-c',
           'import os, time\nif os.fork() == 0:\n    time.sleep(0.5)\nos._exit(0)')
    time.sleep(1.5)
    assert container.process.poll() is None, container.output()
    assert container.answers()
    stats = podman('exec', container.name, 'sh', '-c', 'cat /proc/[0-9]*/stat').stdout.splitlines()
    states = [line.rpartition(') ')[2].split()[0] for line in stats]
    assert len(states) >= 3 and 'Z' not in states, stats  # the master, its workers, and cat itself


def test_sigterm_to_pid_1_under_load_exits_0_within_10_s_with_every_create_answered(image, data):
    command(image, data, 'init-db')
    token = command(image, data, 'token', 'create', '--name', 'load', '--scope', 'write')
    container = Container(image, data, DRAIN_SECONDS='3')
    connect = functools.partial(http.client.HTTPConnection, '127.0.0.1', container.port, timeout=10)
    times, signal_group, wait = [], container.signal_group, container.process.wait
    container.signal_group = lambda signum: (times.append(time.monotonic()), signal_group(signum))
    container.process.wait = lambda timeout=None: (wait(timeout), times.append(time.monotonic()))[0]
    status, results = drain_under_load(container, connect, 'pid1', {'Authorization': f'Bearer {token}'})
    stopped_in = times[1] - times[0]
    assert status == 0, container.output()
    assert stopped_in < 10
    assert {status for status, _, _ in results} <= {201, None}
    assert committed_but_unanswered(f'sqlite:///{data}/people.db', 'pid1', results) == []


# -- compose.yaml ---------------------------------------------------------------------------------

def https(port, method, path, body=None, token=None):
    """A request to the compose project's nginx, for the name its site serves (localhost)."""
    connection = http.client.HTTPSConnection('127.0.0.1', port, timeout=10, context=ssl._create_unverified_context())
    headers = {'Host': 'localhost', 'Content-Type': 'application/json',
               **({'Authorization': f'Bearer {token}'} if token else {})}
    connection.request(method, path, json.dumps(body) if body else None, headers)
    response = connection.getresponse()
    return response.status, response.read()


@pytest.fixture
def compose(image, tmp_path):
    """compose.yaml brought up as a user would, with this run's images and free ports; taken down after."""
    require_podman(DNSNAME)
    compose_tool = os.path.join(os.path.dirname(sys.executable), 'podman-compose')
    if not os.path.exists(compose_tool):
        compose_tool = shutil.which('podman-compose')
    assert compose_tool, 'podman-compose is pinned in requirements.txt'
    parts = f'localhost/people-parts-test:{uuid.uuid4().hex[:8]}'
    podman('build', '--format', 'docker', '--pull=never', '--layers=false', '--network', 'host',
           '--file', 'deploy/compose/Containerfile', '--tag', parts, ROOT, cwd=ROOT, timeout=900)
    project = f'peopletest{uuid.uuid4().hex[:8]}'
    https_port, http_port = free_port(), free_port()
    environ = {**os.environ, 'PEOPLE_IMAGE': image, 'PARTS_IMAGE': parts, 'OWNER_PASSWORD': uuid.uuid4().hex,
               'APP_PASSWORD': uuid.uuid4().hex, 'HTTPS_PORT': str(https_port), 'HTTP_PORT': str(http_port)}
    # --no-deps: podman 4.3 (Debian 12) cannot start a container whose dependency has dependencies.
    up = subprocess.run([compose_tool, '-p', project, 'up', '-d', '--no-deps'], cwd=ROOT, env=environ,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 120
        while True:
            try:
                if https(https_port, 'GET', '/readyz')[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, '\n'.join(
                [podman('ps', '-a', '--filter', f'label=io.podman.compose.project={project}').stdout]
                + [podman('logs', f'{project}_{name}_1', check=False).stderr[-2000:] for name in ('init-db', 'app')])
            time.sleep(0.5)
        # podman 4.3 ignores the health-gated order, so nginx starts before the replicas and marks each
        # that refused it down for fail_timeout (2 s), in each of its workers: wait for both, then that.
        ready = ('import urllib.request; urllib.request.urlopen("http://127.0.0.1:8000/readyz", timeout=2)')
        for name in (f'{project}_app_1', f'{project}_app_2'):
            while podman('exec', name, '/opt/people/venv/bin/python', '-c', ready, check=False).returncode != 0:
                assert time.monotonic() < deadline, f'{name} is not ready'
                time.sleep(0.5)
        time.sleep(2.5)
        yield project, https_port
    finally:
        # The replicas' anonymous /data volumes (unused with PostgreSQL) go with their containers.
        mine = podman('ps', '-aq', '--filter', f'label=io.podman.compose.project={project}').stdout.split()
        if mine:
            podman('rm', '--force', '--volumes', *mine, check=False)
        subprocess.run([compose_tool, '-p', project, 'down', '-v'], cwd=ROOT, env=environ, capture_output=True,
                       timeout=300)
        podman('volume', 'rm', '--force', f'{project}_db', check=False)
        podman('network', 'rm', '--force', f'{project}_default', check=False)
        podman('rmi', '--force', parts, check=False)


def upstreams(project):
    """The replicas nginx's access log says it sent requests to."""
    log = podman('logs', f'{project}_proxy_1').stdout
    return set(re.findall(r'"upstream":"([\d.]+:8000)"', log))


def test_compose_serves_two_replicas_through_nginx_and_survives_losing_one(compose):
    project, port = compose
    assert https(port, 'GET', '/resources/data/')[0] == 401
    token = podman('exec', f'{project}_app_1', '/opt/people/venv/bin/python', '/opt/people/service.py', 'token',
                   'create', '--name', 'compose', '--scope', 'write').stdout.strip()
    created = [https(port, 'POST', '/resources/data/', {'name': f'c{i}', 'age': i, 'locale': 'en'}, token)
               for i in range(10)]
    assert [status for status, _ in created] == [201] * 10
    assert len(upstreams(project)) == 2  # both replicas served
    podman('kill', f'{project}_app_1')
    first = json.loads(created[0][1])['id']
    assert [https(port, 'GET', f'/resources/data/{first}', token=token)[0] for _ in range(10)] == [200] * 10
    # A create is never sent twice: one that went to the dead replica is refused (503), once.
    writes = [https(port, 'POST', '/resources/data/', {'name': f'd{i}', 'age': i, 'locale': 'en'}, token)[0]
              for i in range(6)]
    assert set(writes) <= {201, 503} and writes.count(201) >= 5, writes
