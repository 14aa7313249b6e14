"""`make bench`: seed a database, start the service with its production settings (tokens on: a
write token is made for wrk), run each wrk script in bench/ against it, and print one table (req/s, p50/p99 latency, errors, worker RSS).

    python bench/run.py [--rows N] [--seconds S] [--conns C] [--workers W] [--only read,mix_90_10]
                        [--memory] [--database-url URL] [--stack] [--pooler] [--batch N]

The server runs pinned to CPU 0 and wrk to CPU 1 (with --workers 2, the server gets both). On
PostgreSQL the bare bjoern + psycopg2 ceiling (bench/raw_psycopg.py) is measured beside the read.
--memory reads a worker's RSS after 100k and after 1M requests of the read script.
The bulk workload posts arrays of --batch people and adds people/s and CPU time per person.
--database-url URL (or BENCH_DATABASE_URL) picks PostgreSQL: URL names the server, and a database there
to connect to that is never changed; the benchmark creates a database of its own on that server
(people_bench_<random hex>, so that runs sharing a server never meet) and drops it at the end, also
after an error, Ctrl-C or SIGTERM. URL's user needs CREATEDB. Without it: SQLite in a temporary directory.
--stack runs the workloads as deployed: through the project's nginx over TLS (deploy/stack.py's
configuration, rate limit raised out of the way) to the service with PEOPLE_TRUSTED_PROXIES=127.0.0.1/32,
nothing pinned (nginx, the workers and wrk share both cores); it adds the CPU time nginx and the
workers spent per request (from /proc/PID/stat before and after each run).
"""
import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from urllib.parse import urlsplit, urlunsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
PYTHON = sys.executable
sys.path.insert(0, os.path.join(ROOT, 'deploy'))
import stack  # noqa: E402  (deploy/stack.py starts PgBouncer for --pooler)
# name -> (wrk script, extra environment for the script)
SCRIPTS = {
    'read': ('read.lua', {}),
    'create_form': ('create_form.lua', {}),
    'create_json': ('create_json.lua', {}),
    'bulk': ('bulk.lua', {}),  # arrays of --batch people
    'list_walk': ('list.lua', {}),
    'mix_90_10': ('mix.lua', {}),
    'page_first': ('page.lua', {'PAGE_AFTER': '0'}),
    'page_deep': ('page.lua', {'PAGE_AFTER': None}),  # 90% of the way into the table
    # Filtered first pages, each against page_first. 'eva 7919' is the seed's first person, in NYC.
    'f_name_absent': ('page.lua', {'PAGE_QUERY': '&name=nobody'}),
    'f_name_rare': ('page.lua', {'PAGE_QUERY': '&name=eva%207919'}),
    'f_locale': ('page.lua', {'PAGE_QUERY': '&locale=SF'}),
    'f_age_range': ('page.lua', {'PAGE_QUERY': '&age_min=30&age_max=40'}),
    'f_locale_age': ('page.lua', {'PAGE_QUERY': '&locale=SF&age_min=150'}),  # rare: a short page
    'f_name_locale': ('page.lua', {'PAGE_QUERY': '&name=eva%207919&locale=SF'}),  # matches nothing
}


def start(cmd, env, cpus):
    process = subprocess.Popen(['taskset', '-c', cpus, *cmd], cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # in a session of its own, Ctrl-C does not reach it: stopped here whatever ends the wait
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{PORT}/resources/data/1', timeout=1).read()
                return process
            except urllib.error.HTTPError:
                return process
            except OSError:
                time.sleep(0.1)
        sys.exit(f'{cmd} did not start')
    except BaseException:
        stop(process)
        raise


def stop(process, signum=signal.SIGTERM):
    os.killpg(process.pid, signum)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def worker_rss_mb(master_pid):
    """The resident memory of the first worker: a child of the master (taskset execs, so the
    master is the started process itself), or of the process when it has no children."""
    children = subprocess.run(['pgrep', '-P', str(master_pid)], capture_output=True, text=True).stdout.split()
    pid = children[0] if children else master_pid
    with open(f'/proc/{pid}/status') as f:
        return int(re.search(r'VmRSS:\s+(\d+)', f.read()).group(1)) / 1024


def cpu_seconds(pids):
    """User plus system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / os.sysconf('SC_CLK_TCK')


def children(pid):
    return [int(p) for p in subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()]


def start_nginx(work, conf, port):
    """nginx -p work -c conf in the foreground of its own session; waits until `port` answers."""
    nginx = shutil.which('nginx') or '/usr/sbin/nginx'
    process = subprocess.Popen([nginx, '-p', work, '-c', conf, '-g', 'daemon off;'], start_new_session=True)
    try:  # stopped here whatever ends the wait, as in start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
                return process
            except OSError:
                time.sleep(0.1)
        sys.exit(f'nginx did not listen on {port}; see {work}/logs/error.log')
    except BaseException:
        stop(process, signal.SIGQUIT)
        raise


def wrk(script, seconds, conns, env):
    out = subprocess.run([*PIN, 'wrk', '-t1', f'-c{conns}', f'-d{seconds}s', '--latency',
                          '-s', os.path.join(BENCH, script), URL],
                         capture_output=True, text=True, env={**os.environ, **env}).stdout

    def latency(percent):
        value, unit = re.search(rf'^\s+{percent}%\s+([\d.]+)(\w+)', out, re.M).groups()
        return float(value) * {'us': 0.001, 'ms': 1, 's': 1000, 'm': 60000}[unit]

    errors = sum(int(n) for n in re.findall(r'Non-2xx or 3xx responses: (\d+)', out))
    errors += sum(int(n) for n in re.findall(r'(?:connect|read|write|timeout) (\d+)', out))
    return {'rps': float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)),
            'requests': int(re.search(r'(\d+) requests in', out).group(1)),
            'p50': latency(50), 'p99': latency(99), 'errors': errors}


@contextlib.contextmanager
def own_database(server_url):
    """A new database of the benchmark's own on the PostgreSQL server of `server_url`, dropped on the
    way out whatever ends the run: a database, not a schema, because PgBouncer refuses the startup
    option that picks a schema. The database that server_url names only carries the CREATE and DROP."""
    name = 'people_bench_' + uuid.uuid4().hex[:10]
    server = urlsplit(server_url)
    execute(server_url, f'CREATE DATABASE {name}')
    print(f'bench: database {name} on {server.hostname}:{server.port or 5432}, dropped at the end', flush=True)
    try:
        yield urlunsplit(server._replace(path='/' + name))
    finally:
        # A connection of its own: the run may have outlived one opened at the start.
        execute(server_url, f'DROP DATABASE {name} WITH (FORCE)')


def execute(url, statement):
    """One statement on its own connection; a failure exits with one line, without the password."""
    import psycopg2

    def masked(error):  # libpq quotes a malformed password back ('invalid percent-encoded token')
        password = urlsplit(url).password
        return str(error).strip().replace(password, '***') if password else str(error).strip()
    try:
        conn = psycopg2.connect(url.replace('+pool', ''), connect_timeout=10)
    except psycopg2.Error as error:
        sys.exit(f'bench: cannot connect to PostgreSQL: {masked(error)}')
    conn.autocommit = True
    try:
        conn.cursor().execute(statement)
    except psycopg2.Error as error:
        sys.exit(f'bench: {statement}: {masked(error)}')
    finally:
        conn.close()


def main():
    global PORT, URL, PIN
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=100_000, help='people seeded first (default: %(default)s)')
    parser.add_argument('--seconds', type=int, default=5, help='how long wrk runs each workload (default: %(default)s)')
    parser.add_argument('--conns', type=int, default=32, help="wrk's open connections (default: %(default)s)")
    parser.add_argument('--workers', type=int, default=1, help='bjoern workers of the service (default: %(default)s)')
    parser.add_argument('--only', default='', metavar='NAME,...',
                        help=f'run only these workloads, of: {", ".join(SCRIPTS)} (default: all)')
    parser.add_argument('--batch', type=int, default=100, help='people in each request of the bulk workload '
                        '(default: %(default)s)')
    parser.add_argument('--memory', action='store_true', help="a worker's RSS after 100k and after 1M reads")
    parser.add_argument('--database-url', default=os.environ.get('BENCH_DATABASE_URL', ''), metavar='URL',
                        help='a PostgreSQL server (default: SQLite in a temporary directory): the benchmark '
                             'creates a database of its own there, people_bench_<random hex>, and drops it at the '
                             'end; the database URL names is only connected to, never changed')
    parser.add_argument('--port', type=int, default=18600, help="the service's port (default: %(default)s)")
    parser.add_argument('--stack', action='store_true', help='through nginx over TLS, as deployed')
    parser.add_argument('--pooler', action='store_true', help='PostgreSQL through PgBouncer in transaction mode')
    args = parser.parse_args()
    PORT = args.port
    URL, PIN = f'http://127.0.0.1:{PORT}', ['taskset', '-c', '1']
    if args.database_url and not args.database_url.startswith('postgresql'):
        sys.exit('--database-url takes a PostgreSQL URL: the benchmark seeds a database of its own')
    if not shutil.which('wrk'):
        sys.exit('wrk is missing: apt-get install wrk')
    if args.stack and not (shutil.which('nginx') or os.path.exists('/usr/sbin/nginx')):
        sys.exit('--stack needs nginx: apt-get install nginx')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit('bench: stopped'))  # so that the cleanup below runs
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever ends the run
        tmp = tempfile.mkdtemp(prefix='people-bench-')
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        url = f'sqlite:///{tmp}/people.db'
        if args.database_url:
            url = cleanup.enter_context(own_database(args.database_url))
        pooler = []
        cleanup.callback(lambda: [process.terminate() for process in pooler])
        measure(args, url, tmp, pooler)


def measure(args, url, tmp, pooler):
    """Seed `url`, serve it, run the workloads and print the table."""
    global URL, PIN
    env = {'DATABASE_URL': url}
    sys.path.insert(0, os.path.join(ROOT, 'deploy'))
    import stack  # deploy/stack.py: the nginx site and PgBouncer as make stack runs them
    if args.pooler:  # deploy/pgbouncer.ini in front of the database, as `make stack POOLER=1` runs it
        stack.start_pooler(pooler, tmp, env)
    print(f'seeding {args.rows} people into {url.split("://")[0]} ...', flush=True)
    subprocess.run([PYTHON, 'service.py', 'seed', '--count', str(args.rows)], cwd=ROOT, env={**os.environ, **env},
                   check=True)
    token = subprocess.run([PYTHON, 'service.py', 'token', 'create', '--name', f'bench-{os.getpid()}', '--scope', 'write',
                            '--ttl', '1h'], cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True,
                           text=True).stdout.splitlines()[-1]
    cpus = '0' if args.workers == 1 and not args.stack else '0,1'
    if args.stack:
        https_port = PORT + 1
        conf = stack.prepare(tmp + '/stack', {'HTTPS_PORT': https_port, 'HTTP_PORT': PORT + 2, 'SERVICE_PORT': PORT,
                                              'RATE': 1_000_000, 'BURST': 1_000_000})
        URL, PIN = f'https://127.0.0.1:{https_port}', []
        env['PEOPLE_TRUSTED_PROXIES'] = '127.0.0.1/32'  # as deploy/people.service sets it
    server = start([PYTHON, 'service.py', 'serve', '--port', str(PORT), '--workers', str(args.workers)], env, cpus)
    nginx = start_nginx(tmp + '/stack', conf, https_port) if args.stack else None
    rows = []
    try:
        names = [n for n in SCRIPTS if not args.only or n in args.only.split(',')]
        for name in names:
            script, extra = SCRIPTS[name]
            extra = {'ROWS': str(args.rows), 'TOKEN': token, 'BATCH': str(args.batch), **extra}
            if extra.get('PAGE_AFTER', '') is None:
                extra['PAGE_AFTER'] = str(args.rows * 9 // 10)
            before = worker_rss_mb(server.pid)
            workers, nginx_workers = children(server.pid) or [server.pid], children(nginx.pid) if nginx else []
            cpu = cpu_seconds(workers), cpu_seconds(nginx_workers)
            result = wrk(script, args.seconds, args.conns, extra)
            result['worker_us'] = (cpu_seconds(workers) - cpu[0]) / result['requests'] * 1e6
            result['nginx_us'] = (cpu_seconds(nginx_workers) - cpu[1]) / result['requests'] * 1e6
            rows.append((name, result, before, worker_rss_mb(server.pid)))
        memory = []
        if args.memory:
            total = 0
            for target in (100_000, 1_000_000):
                while total < target:
                    total += wrk('read.lua', 2, args.conns, {'ROWS': str(args.rows), 'TOKEN': token})['requests']
                memory.append((total, worker_rss_mb(server.pid)))
    finally:
        if nginx:
            stop(nginx, signal.SIGQUIT)
        stop(server)
    ceiling = None
    if url.startswith('postgresql') and not args.stack and (not args.only or 'read' in args.only):
        raw = start([PYTHON, os.path.join(BENCH, 'raw_psycopg.py'), '127.0.0.1', str(PORT)], env, '0')
        try:
            ceiling = wrk('read.lua', args.seconds, args.conns, {'ROWS': str(args.rows)})
        finally:
            stop(raw)

    print(f'\n{url.split("://")[0]}{" through PgBouncer" * args.pooler}, {args.rows} rows, workers={args.workers}, '
          f'conns={args.conns}, {args.seconds}s each{", through nginx over TLS" if args.stack else ""}')
    print(f'{"workload":14s} {"req/s":>9s} {"p50 ms":>8s} {"p99 ms":>8s} {"errors":>7s} {"RSS MB before/after":>20s} '
          f'{"CPU us/req: workers":>20s}{" / nginx" if args.stack else ""}')
    for name, r, before, after in rows:
        nginx_us = f' / {r["nginx_us"]:.1f}' if args.stack else ''
        print(f'{name:14s} {r["rps"]:9.0f} {r["p50"]:8.2f} {r["p99"]:8.2f} {r["errors"]:7d} '
              f'{before:9.1f} / {after:6.1f} {r["worker_us"]:20.1f}{nginx_us}')
    if ceiling:
        read = next(r for name, r, _, _ in rows if name == 'read')
        print(f'{"raw_psycopg":14s} {ceiling["rps"]:9.0f} {ceiling["p50"]:8.2f} {ceiling["p99"]:8.2f} '
              f'{ceiling["errors"]:7d}   read vs ceiling: {read["rps"] / ceiling["rps"]:.2f}')
    for name, r, _, _ in rows:
        if name == 'bulk':
            print(f'bulk, {args.batch} people a request: {r["rps"] * args.batch:.0f} people/s, CPU us/person: workers '
                  f'{r["worker_us"] / args.batch:.1f}' + f', nginx {r["nginx_us"] / args.batch:.1f}' * args.stack)
    pages = {name: r['rps'] for name, r, _, _ in rows if name.startswith('page_')}
    if 'page_deep' in pages and 'page_first' in pages:
        print(f'deep page (after={args.rows * 9 // 10}) costs {pages["page_first"] / pages["page_deep"]:.2f}x '
              f'the first page')
    for name, r, _, _ in rows:
        if name.startswith('f_') and 'page_first' in pages:
            print(f'{name} ({SCRIPTS[name][1]["PAGE_QUERY"][1:]}) costs {pages["page_first"] / r["rps"]:.2f}x the first page')
    for requests, rss in memory:
        print(f'worker RSS after {requests} requests: {rss:.1f} MB')
    if len(memory) == 2:
        print(f'growth from ~100k to ~1M requests: {100 * (memory[1][1] / memory[0][1] - 1):+.1f}%')


if __name__ == '__main__':
    main()
