"""The people service: configuration, the app factory, the command line, and serving on bjoern
with pre-forked workers that drain on SIGTERM or SIGINT.

    python service.py serve [--host H] [--port P] [--workers N]
    python service.py init-db
    python service.py seed --count N
"""
import argparse
import gc
import ipaddress
import os
import random
import shutil
import signal
import sys
import tempfile
import time

import falcon

import models
import telemetry
from openapi import OpenAPI
from resources import PREFIX, Collection, Item, add_error_handlers


VERSION = '1.0.0'


class Config:
    """Settings, read from the environment once, here and nowhere else."""
    DEFAULT_DATABASE_URL = 'sqlite:///people.db'
    DEFAULT_HOST = '127.0.0.1'
    DEFAULT_PORT = 8000
    DEFAULT_WORKERS = 1
    DEFAULT_DRAIN_SECONDS = 5
    DEFAULT_LOG_LEVEL = 'info'
    DEFAULT_METRICS_ALLOW = '127.0.0.0/8,::1'

    def __init__(self, environ=os.environ, **overrides):
        self.database_url = environ.get('DATABASE_URL', self.DEFAULT_DATABASE_URL)
        self.host = environ.get('HOST', self.DEFAULT_HOST)
        self.port = int(environ.get('PORT', self.DEFAULT_PORT))
        self.workers = int(environ.get('WORKERS', self.DEFAULT_WORKERS))
        self.drain_seconds = float(environ.get('DRAIN_SECONDS', self.DEFAULT_DRAIN_SECONDS))
        self.log_level = environ.get('LOG_LEVEL', self.DEFAULT_LOG_LEVEL)
        # Off by default: behind nginx its JSON access log, with the same X-Request-ID, is the
        # record of every request, and a line per request here costs ~7 us (bench/, README).
        self.access_log = environ.get('ACCESS_LOG', 'off') == 'on'
        # Where workers keep their metrics: a RuntimeDirectory under systemd, else a fresh temp dir.
        self.metrics_dir = environ.get('METRICS_DIR') or None
        self.metrics_allow = [ipaddress.ip_network(cidr.strip())
                              for cidr in environ.get('METRICS_ALLOW', self.DEFAULT_METRICS_ALLOW).split(',')]
        for name, value in overrides.items():
            setattr(self, name, value)


def create_app(config):
    db = models.open_database(config.database_url)
    people = models.People(db)
    log = telemetry.JsonLog(config.log_level)
    counts = telemetry.Counts(config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-'), log)
    app = falcon.App(media_type='application/json',
                     middleware=[telemetry.Telemetry(counts, log, config.access_log)])
    app.add_route(PREFIX, Collection(people))
    app.add_route(PREFIX + '{id}', Item(people))
    app.add_route('/openapi.json', OpenAPI())
    app.add_route('/livez', telemetry.Livez())
    app.add_route('/readyz', telemetry.Readyz(people))
    app.add_route('/metrics', telemetry.Metrics(counts, config.metrics_allow, VERSION))
    add_error_handlers(app, people, log, counts)
    return app


def serve(app, config):
    """Listen once, then fork the workers; replace any that dies; on SIGTERM or SIGINT ask each
    to drain and force-stop those still running after drain_seconds."""
    import bjoern  # imported here so that tests and the other commands do not need its C build

    log = telemetry.JsonLog(config.log_level)
    models.create_schema(models.database.obj)
    models.database.close()  # NOTE: a connection must never cross fork(); each worker opens its own
    telemetry.clear(config.metrics_dir)
    sock = bjoern.bind_and_listen(config.host, config.port)
    workers, stopping = set(), False

    def spawn():
        pid = os.fork()
        if pid == 0:
            # NOTE: bjoern dies at once on SIGTERM, mid-request, but on SIGINT it stops accepting,
            # finishes what is in flight and returns; so a worker turns SIGTERM into SIGINT.
            signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            # Everything loaded so far lives as long as the worker: keep it out of the garbage
            # collector's full passes, which otherwise rescan it every few thousand requests.
            gc.collect()
            gc.freeze()
            try:
                bjoern.server_run(sock, app)
            except KeyboardInterrupt:
                pass
            os._exit(0)
        workers.add(pid)

    def stop(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            log('info', 'draining', workers=len(workers), seconds=config.drain_seconds)
            for pid in workers:
                os.kill(pid, signal.SIGINT)
            # A drain waits for idle keep-alive connections without end: cut it short.
            signal.setitimer(signal.ITIMER_REAL, config.drain_seconds)

    def force_stop(signum, frame):
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGALRM, force_stop)
    for _ in range(config.workers):
        spawn()
    log('info', 'serving', url=f'http://{config.host}:{config.port}/', workers=config.workers, pid=os.getpid())
    while workers:
        pid, status = os.wait()
        workers.discard(pid)
        telemetry.retire(config.metrics_dir, pid)  # its counts stay in the totals; its file goes
        if not stopping:
            log('warning', 'worker ended; starting another', worker=pid, wait_status=status)
            time.sleep(0.2)  # a worker that dies at start must not make this a busy loop
            spawn()
    log('info', 'stopped')


def seed(people, count, batch=5000, out=sys.stderr):
    """Insert `count` generated people in batches, with a progress bar on a terminal."""
    rng = random.Random(count)  # the same count always gives the same people
    names = ['ann', 'bob', 'cleo', 'dev', 'eva', 'finn', 'gus', 'hana', 'ivo', 'june', 'kai', 'lea']
    locales = ['NYC', 'LA', 'SF', 'CHI', 'BER', 'PAR', 'TOK', 'SYD']
    done = 0
    while done < count:
        size = min(batch, count - done)
        people.create_many([(f'{rng.choice(names)} {rng.randrange(10**6)}', rng.randint(0, 150), rng.choice(locales))
                            for _ in range(size)])
        done += size
        if out.isatty():
            filled = 30 * done // count
            print(f'\r[{"#" * filled}{"." * (30 - filled)}] {done}/{count}', end='', file=out, flush=True)
    if out.isatty():
        print(file=out)


def main(argv=None):
    config = Config()
    parser = argparse.ArgumentParser(prog='service.py', description='The people REST service.')
    commands = parser.add_subparsers(dest='command', required=True)
    serve_cmd = commands.add_parser('serve', help='serve HTTP on bjoern')
    serve_cmd.add_argument('--host', default=config.host)
    serve_cmd.add_argument('--port', type=int, default=config.port)
    serve_cmd.add_argument('--workers', type=int, default=config.workers)
    commands.add_parser('init-db', help='create the tables that are missing (never drops data)')
    seed_cmd = commands.add_parser('seed', help='insert generated people, for benchmarks and trials')
    seed_cmd.add_argument('--count', type=int, required=True)
    args = parser.parse_args(argv)

    if args.command in ('init-db', 'seed'):
        db = models.open_database(config.database_url)
        models.create_schema(db)
        if args.command == 'seed':
            seed(models.People(db), args.count)
        print(f'{args.command}: done in the {config.database_url.split("://")[0]} database', file=sys.stderr)
    elif args.command == 'serve':
        config.host, config.port, config.workers = args.host, args.port, max(1, args.workers)
        temporary = config.metrics_dir is None
        config.metrics_dir = config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-')
        serve(create_app(config), config)
        if temporary:
            shutil.rmtree(config.metrics_dir, ignore_errors=True)


if __name__ == '__main__':
    main()
