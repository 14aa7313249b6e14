"""`make stack`: the production topology on this machine, unprivileged and in the foreground.

nginx (the project's own deploy/nginx-people.conf, rendered into a temporary directory with a
self-signed certificate) on https://127.0.0.1:HTTPS_PORT and http://127.0.0.1:HTTP_PORT, in front
of INSTANCES service instances of WORKERS workers each, with the service's production defaults
(tokens on). Ctrl-C or SIGTERM stops everything and exits 0.

Environment: HTTPS_PORT (8443), HTTP_PORT (8080), WORKERS (2), INSTANCES (1), SERVICE_PORT (8000,
the first instance; the others follow), DATABASE_URL (SQLite in the temporary directory),
RATE and BURST (nginx's limit per client: 200 r/s, burst 400), CLIENT_TIMEOUT (10s), POOLER=1
(PgBouncer, deploy/pgbouncer.ini, between the instances and DATABASE_URL's PostgreSQL).

Shipping new code, as on a VM: `kill -USR2 PID` (this process's pid, in the banner) reloads every
instance (systemctl reload people); `kill -USR1 PID` restarts the instances one at a time, each ready
again before the next stops (systemctl restart people, VM by VM). Each instance's socket is held
here, as systemd's people.socket holds it, so neither refuses a connection.
"""
import getpass
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEPLOY = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DEPLOY)
sys.path.insert(0, ROOT)
from service import safe_url  # noqa: E402  (banners mask passwords as the service's log does)


def render(template, values):
    with open(template) as f:
        text = f.read()
    for name, value in values.items():
        text = text.replace(f'@{name}@', str(value))
    leftover = re.findall(r'@[A-Z_]+@', text)
    if leftover:
        sys.exit(f'unrendered placeholders in {template}: {leftover}')
    return text


def wait_for_port(port, process, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f'{process.args[0]} exited with {process.returncode} before listening on {port}')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f'nothing listens on {port} after {seconds} s')


# A command that ends with the stack, however the stack ends (SIGKILL included): the kernel sends this
# wrapper SIGTERM when its parent dies (PR_SET_PDEATHSIG, which the command's own change of user, as
# pgbouncer -u makes, would clear), and it passes SIGTERM on.
WITH_THE_STACK = ('import ctypes, signal, subprocess, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); '
                  'child = subprocess.Popen(sys.argv[1:]); signal.signal(signal.SIGTERM, lambda *_: child.terminate()); '
                  'sys.exit(child.wait())')

# Socket activation as systemd does it: the socket becomes fd 3 of a process that LISTEN_PID names.
ACTIVATE = ('import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ.update(LISTEN_FDS="1", '
            'LISTEN_PID=str(os.getpid())); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])')


def start_instance(listener, env, workers):
    port = str(listener.getsockname()[1])  # on the command line too, for ps and pgrep
    return subprocess.Popen([sys.executable, '-c', ACTIVATE, str(listener.fileno()), 'service.py', 'serve', '--port',
                             port, '--workers', workers], cwd=ROOT, env=env, pass_fds=[listener.fileno()])


def wait_until_ready(port, process, seconds=20):
    """Until the instance on `port` answers /readyz 200 (its socket, held here, accepts before it does)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f'the instance on {port} exited with {process.returncode} before it was ready')
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=1)
        try:
            conn.request('GET', '/readyz')
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    sys.exit(f'the instance on {port} is not ready after {seconds} s')


def refuse_taken(ports):
    """Exit with one line when any of the stack's ports is taken, before anything starts: a port
    something else answers on would otherwise look ready. A bind without SO_REUSEPORT fails
    while anything listens, a service's reuse-port workers included."""
    for name, port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(('127.0.0.1', port))
            except OSError as error:
                sys.exit(f'port {port} is taken ({error.strerror}): set {name} to a free port')


def pooler_config(work, target, port, **settings):
    """deploy/pgbouncer.ini for `work`: listening on 127.0.0.1:port, in front of every database of
    the PostgreSQL server at target (host, port); `settings` override the file's (auth_type, ...).
    Client TLS stays required, with a throwaway self-signed certificate for localhost and 127.0.0.1
    in work/pgbouncer.crt: clients that verify name it as their sslrootcert."""
    with open(os.path.join(DEPLOY, 'pgbouncer.ini')) as f:
        text = f.read().replace('people = host=127.0.0.1 port=5432 dbname=people', f'* = host={target[0]} port={target[1]}')
    cert, key = os.path.join(work, 'pgbouncer.crt'), os.path.join(work, 'pgbouncer.key')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
                    '-nodes', '-days', '2', '-subj', '/CN=localhost', '-addext',
                    'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert],
                   check=True, capture_output=True)
    settings = {'listen_addr': '127.0.0.1', 'listen_port': port, 'unix_socket_dir': '',
                'logfile': f'{work}/pgbouncer.log', 'pidfile': f'{work}/pgbouncer.pid',
                'auth_file': f'{work}/userlist.txt', 'client_tls_key_file': key, 'client_tls_cert_file': cert,
                **settings}
    for name, value in settings.items():
        text, found = re.subn(rf'^{name} = .*$', f'{name} = {value}', text, flags=re.M)
        if not found:
            sys.exit(f'deploy/pgbouncer.ini has no {name} setting')
    path = os.path.join(work, 'pgbouncer.ini')
    with open(path, 'w') as f:
        f.write(text)
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it runs as nobody, who must reach, read and write here
        os.chmod(os.path.dirname(work), os.stat(os.path.dirname(work)).st_mode | 0o111)
        shutil.chown(work, 'nobody')
        for name in os.listdir(work):
            shutil.chown(os.path.join(work, name), 'nobody')
    return [shutil.which('pgbouncer') or '/usr/sbin/pgbouncer', *(['-u', 'nobody'] if os.geteuid() == 0 else []), path]


def prepare(work, env):
    """A certificate and the rendered nginx.conf in `work`; returns the nginx.conf path."""
    https_port, http_port = int(env.get('HTTPS_PORT', 8443)), int(env.get('HTTP_PORT', 8080))
    instances, service_port = int(env.get('INSTANCES', 1)), int(env.get('SERVICE_PORT', 8000))
    for name in ('logs', 'temp'):
        os.makedirs(os.path.join(work, name))
    cert, key = os.path.join(work, 'cert.pem'), os.path.join(work, 'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
                    '-nodes', '-days', '2', '-subj', '/CN=localhost', '-addext',
                    'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert],
                   check=True, capture_output=True)
    site = render(os.path.join(DEPLOY, 'nginx-people.conf'), {
        'RATE': env.get('RATE', 200), 'BURST': env.get('BURST', 400), 'CLIENT_TIMEOUT': env.get('CLIENT_TIMEOUT', '10s'),
        'HTTP_PORT': f'127.0.0.1:{http_port}', 'HTTPS_PORT': f'127.0.0.1:{https_port}',
        'SERVER_NAME': 'localhost 127.0.0.1',
        'CERT': cert, 'KEY': key, 'ACCESS_LOG': os.path.join(work, 'logs', 'access.log'),
        'UPSTREAM_SERVERS': '\n'.join(f'    server 127.0.0.1:{service_port + i} max_fails=1 fail_timeout=2s;'
                                      for i in range(instances)),
    })
    temp = os.path.join(work, 'temp')
    conf = os.path.join(work, 'nginx.conf')
    # Debian's libnginx-mod-http-headers-more-filter, which install.sh loads too: no Server header.
    headers_more = '/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so'
    if not os.path.exists(headers_more):
        sys.exit(f'{headers_more} is missing: apt-get install libnginx-mod-http-headers-more-filter')
    with open(conf, 'w') as f:
        f.write(f'''# make stack: nginx unprivileged in {work}
{"user root;" if os.geteuid() == 0 else ""}
load_module {headers_more};
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/logs/error.log warn;
# As install.sh sets them: room for slow clients (see the site's limits); two descriptors a
# connection (the client's and the upstream's).
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    more_clear_headers Server;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server_tokens off;
{site}
}}
''')
    return conf


def start_pooler(processes, work, service_env):
    """POOLER=1: PgBouncer (deploy/pgbouncer.ini) on a free port in front of DATABASE_URL's
    PostgreSQL; the instances connect through it. Loopback only, so it trusts the URL's user."""
    url = urlsplit(service_env['DATABASE_URL'])
    if not url.scheme.startswith('postgres'):
        sys.exit('POOLER=1 needs a PostgreSQL DATABASE_URL')
    pooler = os.path.join(work, 'pgbouncer')
    os.makedirs(pooler)
    user, password = unquote(url.username or getpass.getuser()), unquote(url.password or '')  # libpq's defaults
    with open(os.path.join(pooler, 'userlist.txt'), 'w') as f:
        f.write(f'"{user}" "{password}"\n')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # A session of its own, so that a terminal's Ctrl-C does not reach it: it stops last (see stop in main).
    processes.append(subprocess.Popen([sys.executable, '-c', WITH_THE_STACK, *pooler_config(
        pooler, (url.hostname, url.port or 5432), port, auth_type='trust')], start_new_session=True))
    processes[-1].is_pooler = True
    wait_for_port(port, processes[-1])
    credentials = url.netloc.rpartition('@')[0] or quote(user)
    # As deployed: TLS to the pooler, its certificate verified (the throwaway one pooler_config made).
    verify = f'sslmode=verify-full&sslrootcert={quote(os.path.join(pooler, "pgbouncer.crt"))}'
    service_env['DATABASE_URL'] = urlunsplit(url._replace(netloc=f'{credentials}@127.0.0.1:{port}',
                                                          query='&'.join(filter(None, (url.query, verify)))))
    print(f'stack: PgBouncer on 127.0.0.1:{port} -> {url.hostname}:{url.port or 5432}', file=sys.stderr, flush=True)


def start(processes, env, service_env, nginx, work, conf):
    """The service instances, then nginx in front of them; each must be listening before the next."""
    service_port, instances = int(env.get('SERVICE_PORT', 8000)), int(env.get('INSTANCES', 1))
    https_port, http_port = int(env.get('HTTPS_PORT', 8443)), int(env.get('HTTP_PORT', 8080))
    refuse_taken([('HTTPS_PORT', https_port), ('HTTP_PORT', http_port)]
                 + [('SERVICE_PORT', port) for port in range(service_port, service_port + instances)])
    subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, env=service_env, check=True)
    for port in range(service_port, service_port + instances):
        listener = socket.create_server(('127.0.0.1', port), backlog=1024)
        processes.append(start_instance(listener, service_env, env.get('WORKERS', '2')))
        processes[-1].listener = listener
        wait_until_ready(port, processes[-1])
    processes.append(subprocess.Popen([nginx, '-p', work, '-c', conf, '-g', 'daemon off;']))
    for port in (https_port, http_port):  # the banner comes only once every part listens
        wait_for_port(port, processes[-1])
    url = service_env['DATABASE_URL']
    print(f'stack: https://127.0.0.1:{https_port}/ (http://127.0.0.1:{http_port}/ answers 403: https only) -> '
          f'{instances} instance(s) from port {service_port}; files in {work}, deleted on stop. A token and a call '
          f'(-k: the certificate is self-signed; or --cacert {work}/cert.pem'
          f'{"; *** is the password" if safe_url(url) != url else ""}):\n'
          f'  TOKEN=$(DATABASE_URL={shlex.quote(safe_url(url))} .venv/bin/python service.py token create '
          f'--name me --scope write)\n'
          f'  curl -k -H "Authorization: Bearer $TOKEN" https://127.0.0.1:{https_port}/resources/data/\n'
          f'New code: kill -USR2 {os.getpid()} reloads every instance; kill -USR1 {os.getpid()} restarts them one by one.',
          file=sys.stderr, flush=True)


def restart(processes, i, service_env, workers, stop=True):
    """Instance i again on its socket (which queued what came meanwhile), ready before this returns."""
    process, port = processes[i], processes[i].listener.getsockname()[1]
    if stop:
        process.send_signal(signal.SIGTERM)  # it drains
        process.wait(30)
    processes[i] = start_instance(process.listener, service_env, workers)
    processes[i].listener = process.listener
    wait_until_ready(port, processes[i])
    print(f'stack: instance on {port} {"restarted" if stop else "started again"}', file=sys.stderr, flush=True)


def watch(processes, env, service_env, signals):
    """Until nginx ends: nginx is the stack. An instance that ends starts again (as systemd's
    Restart=on-failure does; its socket queues connections meanwhile); USR1 restarts the instances one
    at a time, USR2 reloads them (`signals`: those that came, in order)."""
    reported, workers = set(), env.get('WORKERS', '2')
    instances = [i for i, process in enumerate(processes) if hasattr(process, 'listener')]
    while processes[-1].poll() is None:
        while signals:
            if signals.pop(0) == signal.SIGUSR1:
                for i in instances:
                    restart(processes, i, service_env, workers)
            else:
                for i in instances:
                    processes[i].send_signal(signal.SIGUSR2)
        for i, process in enumerate(processes[:-1]):
            if process.poll() is not None and process.pid not in reported:
                reported.add(process.pid)
                print(f'stack: {process.args[0]} {process.pid} ended ({process.returncode})', file=sys.stderr, flush=True)
                if i in instances:
                    restart(processes, i, service_env, workers, stop=False)
        time.sleep(0.2)
    print('stack: nginx ended; stopping the rest', file=sys.stderr)


def main():
    env = os.environ
    nginx = shutil.which('nginx') or '/usr/sbin/nginx'
    work = tempfile.mkdtemp(prefix='people-stack-')
    conf = prepare(work, env)
    if sys.argv[1:] == ['--check']:  # nginx -t on the rendered configuration, then leave
        result = subprocess.run([nginx, '-t', '-p', work, '-c', conf], capture_output=True, text=True)
        print(result.stderr, end='')
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(result.returncode)
    service_env = {**env, 'DATABASE_URL': env.get('DATABASE_URL', f'sqlite:///{work}/people.db'),
                   'PEOPLE_TRUSTED_PROXIES': env.get('PEOPLE_TRUSTED_PROXIES', '127.0.0.1/32')}
    service_env.pop('PEOPLE_AUTH', None)  # production defaults: tokens on
    processes = []

    def stop(*_, code=0):
        # The pooler last: the instances add their tokens' use to the database through it as they leave.
        first = [process for process in processes if not hasattr(process, 'is_pooler')]
        for group in (first, [process for process in processes if process not in first]):
            for process in reversed(group):
                if process.poll() is None:
                    process.send_signal(signal.SIGQUIT if process.args[0] == nginx else signal.SIGTERM)
            for process in group:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(code)

    for stopping in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(stopping, stop)
    signals = []  # acted on in watch(), one at a time
    for ship in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(ship, lambda signum, _: signals.append(signum))
    try:
        if env.get('POOLER') == '1':
            start_pooler(processes, work, service_env)
        start(processes, env, service_env, nginx, work, conf)
        watch(processes, env, service_env, signals)
    except SystemExit as stopping:
        if not stopping.code:
            raise  # the clean stop of a signal
        print(f'stack: {stopping.code}', file=sys.stderr)  # a part that did not start
    except subprocess.CalledProcessError as error:  # it said why on stderr, above
        print(f"stack: {' '.join(error.cmd[1:])} failed (exit {error.returncode}; why is above): stopping", file=sys.stderr)
    except Exception as error:
        print(f'stack: {error!r}', file=sys.stderr)
    stop(code=1)


if __name__ == '__main__':
    main()
