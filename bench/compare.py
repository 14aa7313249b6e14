"""Side by side in one run: the service against the ceiling and its peers, direct or as deployed.

    python bench/compare.py [--only ceiling,service,flask,fastapi] [--workload read|create] [--rounds R]
                            [--seconds S] [--conns C] [--port PORT] [--production | --stack]

  ceiling  a bare WSGI function on bjoern + sqlite3 (bench/peers.py): no framework, no ORM; the same
           storage as the service (schema.sql's tables and list indexes, WAL, synchronous=FULL)
  service  this service, one worker
  flask    Flask on gunicorn, one sync worker (bench/peers.py)
  fastapi  FastAPI on uvicorn, one process (bench/peers.py)

Flask and FastAPI are installed at the versions PEER_PACKAGES pins into a virtualenv in a temporary
directory, deleted at the end with everything else the run made. Each target serves a database of its own,
seeded with 1,000 people first; wrk reads random ids among them (read) or creates with the original form
PUT (create). The targets take turns, each started afresh, for R rounds (a second's
warm-up, then S seconds measured); the median req/s of each is printed with its ratio to the ceiling.

Direct (the default): each target serves 127.0.0.1:PORT pinned to CPU 0, wrk runs pinned to CPU 1; the
service runs with tokens off. --production runs the service as deploy/people.service does (tokens on,
PEOPLE_TRUSTED_PROXIES=127.0.0.1/32) and sends every target the same Authorization and X-Forwarded-For.
--stack is as deployed: make stack's nginx (deploy/nginx-people.conf over TLS, its rate limit raised out
of the way) on PORT + 1 (and PORT + 2, plain HTTP) in front of the target on PORT, the service with tokens
on; nothing is pinned (nginx, the target and wrk share both cores), and the CPU time the target and nginx
spent per request is added (from /proc/PID/stat before and after each run).
"""
import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile

import peers
import run  # bench/run.py: start, stop, wrk, the CPU counters, nginx

BENCH = os.path.dirname(os.path.abspath(__file__))
TARGETS = ('ceiling', 'service', 'flask', 'fastapi')
PEER_PACKAGES = ['Flask==3.1.3', 'gunicorn==27.0.1', 'fastapi==0.163.2', 'uvicorn==0.54.0', 'python-multipart==0.0.34',
                 'Werkzeug==3.1.9', 'Jinja2==3.1.6', 'MarkupSafe==3.0.4', 'itsdangerous==2.2.0', 'blinker==1.9.0',
                 'click==8.5.1', 'starlette==1.10.0', 'pydantic==2.14.4', 'pydantic_core==2.50.5', 'anyio==4.16.0',
                 'idna==3.21', 'h11==0.16.0', 'typing_extensions==4.16.0', 'typing-inspection==0.4.5',
                 'annotated-types==0.8.0', 'annotated-doc==0.0.7', 'opentelemetry-api==1.45.3']
WORKLOADS = {'read': 'read.lua', 'create': 'create_form.lua'}
SEEDED = 1000


def targets(port, tmp, service_env):
    """name -> (command, environment): what serves 127.0.0.1:port for each target."""
    venv = os.path.join(tmp, 'peers-venv', 'bin')
    return {
        'ceiling': ([run.PYTHON, os.path.join(BENCH, 'peers.py'), '127.0.0.1', str(port)], {}),
        'service': ([run.PYTHON, 'service.py', 'serve', '--port', str(port), '--workers', '1'], service_env),
        'flask': ([os.path.join(venv, 'gunicorn'), '-w', '1', '-b', f'127.0.0.1:{port}', '--chdir', BENCH,
                   'peers:flask_app()'], {}),
        'fastapi': ([os.path.join(venv, 'uvicorn'), '--host', '127.0.0.1', '--port', str(port), '--log-level',
                     'warning', '--app-dir', BENCH, '--factory', 'peers:fastapi_app'], {}),
    }


def install_peers(tmp):
    print(f'installing {", ".join(PEER_PACKAGES[:4])} into a throwaway virtualenv ...', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', os.path.join(tmp, 'peers-venv')], check=True)
    subprocess.run([os.path.join(tmp, 'peers-venv', 'bin', 'pip'), 'install', '-q', *PEER_PACKAGES], check=True)


def seed(path):
    """A database for one target, with SEEDED people: every target keeps the service's tables (schema.sql)."""
    conn = sqlite3.connect(path)
    with open(os.path.join(run.ROOT, 'schema.sql')) as f:
        conn.executescript(f.read())
    conn.executemany(peers.INSERT, [(f'person {i}', i % 100, 'NYC') for i in range(SEEDED)])
    conn.commit()
    conn.close()


def parse(argv, extra, description):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', default=','.join(TARGETS), metavar='NAME,...',
                        help=f'the targets, of: {", ".join([*TARGETS, *extra])} (default: %(default)s)')
    parser.add_argument('--workload', choices=WORKLOADS, default='read', help='(default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=3, help='turns each target takes (default: %(default)s)')
    parser.add_argument('--seconds', type=int, default=4, help='how long wrk measures a turn (default: %(default)s)')
    parser.add_argument('--conns', type=int, default=32, help="wrk's open connections (default: %(default)s)")
    parser.add_argument('--port', type=int, default=18700,
                        help='where each target serves; --stack adds nginx on PORT + 1 and + 2 (default: %(default)s)')
    way = parser.add_mutually_exclusive_group()
    way.add_argument('--production', action='store_true', help='direct, the service with its production settings')
    way.add_argument('--stack', action='store_true', help="through make stack's nginx over TLS, as deployed")
    args = parser.parse_args(argv)
    args.only = args.only.split(',')
    unknown = set(args.only) - {*TARGETS, *extra}
    if unknown:
        parser.error(f'no target named {", ".join(sorted(unknown))}')
    return args


def main(argv=None, extra_targets=lambda port, tmp, service_env: {}, description=__doc__):
    """`extra_targets` adds to targets() (bench/layers.py's layers)."""
    args = parse(argv, extra_targets(0, '', {}), description)
    if not shutil.which('wrk'):
        sys.exit('wrk is missing: apt-get install wrk')
    tmp = tempfile.mkdtemp(prefix='people-compare-')
    try:
        return compare(args, tmp, extra_targets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(args, tmp, extra_targets):
    run.PORT = args.port
    run.URL, run.PIN = f'http://127.0.0.1:{args.port}', ['taskset', '-c', '1']
    if {'flask', 'fastapi'} & set(args.only):
        install_peers(tmp)
    tokens_on = args.production or args.stack
    service_env = {'DATABASE_URL': f'sqlite:///{tmp}/service.db', 'PEOPLE_AUTH': 'on' if tokens_on else 'off',
                   **({'PEOPLE_TRUSTED_PROXIES': '127.0.0.1/32'} if tokens_on else {})}
    for name in args.only:
        seed(f'{tmp}/{name}.db')
    script_env = {'ROWS': str(SEEDED)}
    if tokens_on:  # one write token, sent to every target alike
        script_env['TOKEN'] = subprocess.run(
            [run.PYTHON, 'service.py', 'token', 'create', '--name', 'compare', '--scope', 'write', '--ttl', '1h'],
            cwd=run.ROOT, env={**os.environ, **service_env}, check=True, capture_output=True,
            text=True).stdout.splitlines()[-1]
    if args.production:  # as nginx would send it; the service then works the client out
        script_env['FORWARDED_FOR'] = '203.0.113.7'
    nginx = None
    if args.stack:
        https = args.port + 1
        conf = run.stack.prepare(f'{tmp}/stack', {'HTTPS_PORT': https, 'HTTP_PORT': args.port + 2,
                                                  'SERVICE_PORT': args.port, 'RATE': 1_000_000, 'BURST': 1_000_000})
        nginx = run.start_nginx(f'{tmp}/stack', conf, https)
        run.URL, run.PIN = f'https://127.0.0.1:{https}', []
    found = {**targets(args.port, tmp, service_env), **extra_targets(args.port, tmp, service_env)}
    results = {name: [] for name in args.only}
    try:
        for _ in range(args.rounds):
            for name in args.only:
                command, env = found[name]
                server = run.start(command, {'PEER_DB': f'{tmp}/{name}.db', **env}, '0,1' if args.stack else '0')
                try:
                    run.wrk(WORKLOADS[args.workload], 1, args.conns, script_env)  # warm-up, not counted
                    pids = [run.children(server.pid) or [server.pid], run.children(nginx.pid) if nginx else []]
                    before = [run.cpu_seconds(group) for group in pids]
                    result = run.wrk(WORKLOADS[args.workload], args.seconds, args.conns, script_env)
                    result['cpu'] = [(run.cpu_seconds(group) - spent) / result['requests'] * 1e6
                                     for group, spent in zip(pids, before)]
                    results[name].append(result)
                finally:
                    run.stop(server)
    finally:
        if nginx:
            run.stop(nginx, signal.SIGQUIT)
    report(args, results)
    return 1 if any(r['errors'] for runs in results.values() for r in runs) else 0


def report(args, results):
    way = ('through nginx over TLS, tokens on, nothing pinned' if args.stack else
           f'direct, target on CPU 0 and wrk on CPU 1, tokens {"on" if args.production else "off"}')
    print(f'\n{args.workload}, {way}; {args.rounds} rounds of {args.seconds} s, {args.conns} connections')
    print(f'{"target":22s} {"req/s":>8s} {"vs ceiling":>10s} {"p50 ms":>7s} {"p99 ms":>7s} {"errors":>6s}'
          f'{"  CPU us/req: target / nginx" if args.stack else ""}  rounds')
    ceiling = statistics.median(r['rps'] for r in results['ceiling']) if 'ceiling' in results else None
    for name, runs in results.items():
        rps = statistics.median(r['rps'] for r in runs)
        cpu = ''
        if args.stack:
            cpu = '  {:>14.1f} / {:5.1f}'.format(*(statistics.median(r['cpu'][i] for r in runs) for i in (0, 1)))
        print(f'{name:22s} {rps:8.0f} {f"{rps / ceiling:.2f}" if ceiling else "-":>10s} '
              f'{statistics.median(r["p50"] for r in runs):7.2f} {statistics.median(r["p99"] for r in runs):7.2f} '
              f'{sum(r["errors"] for r in runs):6d}{cpu}  {[round(r["rps"]) for r in runs]}')


if __name__ == '__main__':
    sys.exit(main())
