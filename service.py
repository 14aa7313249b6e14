"""The people service: configuration, the app factory, the command line, and serving on bjoern
with pre-forked workers that drain on SIGTERM or SIGINT.

    python service.py serve [--host H] [--port P] [--workers N]
    python service.py init-db
    python service.py seed --count N
    python service.py backup PATH | restore PATH [--force]
    python service.py token create --name NAME --scope read|write [--ttl 30d] | token list | token revoke NAME
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
import peewee

import backups
import models
import security
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
    DEFAULT_REQUEST_DEADLINE = 30
    DEFAULT_LOG_LEVEL = 'info'
    DEFAULT_METRICS_ALLOW = '127.0.0.0/8,::1'

    def __init__(self, environ=os.environ, **overrides):
        self.database_url = environ.get('DATABASE_URL', self.DEFAULT_DATABASE_URL)
        self.host = environ.get('HOST', self.DEFAULT_HOST)
        self.port = int(environ.get('PORT', self.DEFAULT_PORT))
        self.workers = int(environ.get('WORKERS', self.DEFAULT_WORKERS))
        self.drain_seconds = float(environ.get('DRAIN_SECONDS', self.DEFAULT_DRAIN_SECONDS))
        self.request_deadline = float(environ.get('REQUEST_DEADLINE', self.DEFAULT_REQUEST_DEADLINE))
        self.log_level = environ.get('LOG_LEVEL', self.DEFAULT_LOG_LEVEL)
        # Off by default: behind nginx its JSON access log, with the same X-Request-ID, is the
        # record of every request, and a line per request here costs ~7 us (bench/, README).
        self.access_log = environ.get('ACCESS_LOG', 'off') == 'on'
        # Where workers keep their metrics: a RuntimeDirectory under systemd, else a fresh temp dir.
        self.metrics_dir = environ.get('METRICS_DIR') or None
        self.backup_dir = environ.get('BACKUP_DIR') or None  # where the timer's backups go: their age is a metric
        self.metrics_allow = security.networks(environ.get('METRICS_ALLOW', self.DEFAULT_METRICS_ALLOW))
        self.auth = environ.get('PEOPLE_AUTH', 'on') != 'off'  # fail-safe: only an explicit "off" disables it
        self.allow = security.networks(environ.get('PEOPLE_ALLOW', ''))  # empty: every address may try
        self.trusted_proxies = security.networks(environ.get('PEOPLE_TRUSTED_PROXIES', ''))
        self.cors_origins = [o.strip() for o in environ.get('PEOPLE_CORS_ORIGINS', '').split(',') if o.strip()]
        for name, value in overrides.items():
            setattr(self, name, value)


def create_app(config, watch=None):
    db = models.open_database(config.database_url)
    people = models.People(db)
    log = telemetry.JsonLog(config.log_level)
    counts = telemetry.Counts(config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-'), log)
    middleware = [telemetry.Telemetry(counts, log, config.access_log, watch or telemetry.Watch(1)),
                  security.Guard(config.auth, config.allow, config.trusted_proxies)]
    if config.cors_origins:  # CORS is off unless origins are listed
        middleware.append(falcon.CORSMiddleware(allow_origins=config.cors_origins, expose_headers=['ETag', 'Location']))
    app = falcon.App(media_type='application/json', middleware=middleware)
    app.add_route(PREFIX, Collection(people))
    app.add_route(PREFIX + '{id}', Item(people))
    app.add_route('/openapi.json', OpenAPI())
    app.add_route('/livez', telemetry.Livez())
    app.add_route('/readyz', telemetry.Readyz(people))
    app.add_route('/metrics', telemetry.Metrics(counts, config.metrics_allow, VERSION, config.backup_dir))
    add_error_handlers(app, people, log, counts)
    return app


class Master:
    """Serve with pre-forked bjoern workers: replace any that dies or is stuck past the request
    deadline; on SIGTERM or SIGINT ask each to drain, and force-stop those still running after
    drain_seconds."""

    def __init__(self, app, config, watch):
        self.app, self.config, self.watch = app, config, watch
        self.log = telemetry.JsonLog(config.log_level)
        self.workers = {}  # pid -> slot in the watch
        self.stopping = False

    def run(self):
        import bjoern  # imported here so that tests and the other commands do not need its C build
        self.bjoern = bjoern
        models.create_schema(models.database.obj)
        models.database.close()  # NOTE: a connection must never cross fork(); each worker opens its own
        telemetry.clear(self.config.metrics_dir)
        # NOTE: each worker binds its own SO_REUSEPORT socket, so the kernel spreads connections
        # evenly; on one shared socket the first worker to wake accepts a whole burst of keep-alive
        # connections and keeps them (seen: 2 workers served no more than 1). The master binds once
        # only to fail here, early and clearly, when the port is taken; it holds no socket itself.
        bjoern.bind_and_listen(self.config.host, self.config.port, reuse_port=True).close()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGALRM, self.force_stop)
        for slot in range(self.config.workers):
            self.spawn(slot)
        self.log('info', 'serving', url=f'http://{self.config.host}:{self.config.port}/',
                 workers=self.config.workers, pid=os.getpid())
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                self.kill_stuck()
                time.sleep(0.25)
                continue
            slot = self.workers.pop(pid)
            telemetry.retire(self.config.metrics_dir, pid)  # its counts stay in the totals; its file goes
            self.watch.cells[slot] = 0.0
            if not self.stopping:
                self.log('warning', 'worker ended; starting another', worker=pid, wait_status=status)
                time.sleep(0.2)  # a worker that dies at start must not make this a busy loop
                self.spawn(slot)
        self.log('info', 'stopped')

    def spawn(self, slot):
        pid = os.fork()
        if pid:
            self.workers[pid] = slot
            return
        # NOTE: bjoern dies at once on SIGTERM, mid-request, but on SIGINT it stops accepting,
        # finishes what is in flight and returns; so a worker turns SIGTERM into SIGINT.
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        self.watch.slot = slot
        # Everything loaded so far lives as long as the worker: keep it out of the garbage
        # collector's full passes, which otherwise rescan it every few thousand requests.
        gc.collect()
        gc.freeze()
        try:
            sock = self.bjoern.bind_and_listen(self.config.host, self.config.port, reuse_port=True)
            self.bjoern.server_run(sock, self.app)
        except KeyboardInterrupt:
            pass
        os._exit(0)

    def kill_stuck(self):
        for pid, slot in self.workers.items():
            if self.watch.is_stuck(slot, self.config.request_deadline):
                self.log('error', 'worker stuck past the request deadline; killing it', worker=pid,
                         deadline=self.config.request_deadline)
                os.kill(pid, signal.SIGKILL)
                self.watch.cells[slot] = 0.0

    def stop(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            self.log('info', 'draining', workers=len(self.workers), seconds=self.config.drain_seconds)
            for pid in self.workers:
                os.kill(pid, signal.SIGINT)
            # A drain waits for idle keep-alive connections without end: cut it short.
            signal.setitimer(signal.ITIMER_REAL, self.config.drain_seconds)

    def force_stop(self, signum, frame):
        for pid in self.workers:
            os.kill(pid, signal.SIGKILL)


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


def is_loopback(host):
    try:
        return host == 'localhost' or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def manage_tokens(args):
    if args.action == 'create':
        try:
            secret = models.create_token(args.name, args.scope, args.ttl)
        except peewee.IntegrityError:
            sys.exit(f'a token named {args.name!r} exists (revoke it first), or the name is not 1-100 characters')
        print(f'token "{args.name}" ({args.scope}) expires in {args.ttl} s; it is shown only now:', file=sys.stderr)
        print(secret)
    elif args.action == 'list':
        now = time.time()
        for token in models.list_tokens():
            state = 'expired' if token['expires_at'] <= now else f"expires {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(token['expires_at']))}"
            print(f"{token['name']}\t{token['scope']}\t{state}")
    elif not models.revoke_token(args.name):
        sys.exit(f'no token is named {args.name!r}')
    return 0


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
    commands.add_parser('backup', help='write a consistent snapshot of the database to PATH').add_argument('path')
    restore_cmd = commands.add_parser('restore', help='load a backup into the empty database DATABASE_URL names')
    restore_cmd.add_argument('path')
    restore_cmd.add_argument('--force', action='store_true', help='replace the people the database holds')
    token_cmd = commands.add_parser('token', help='create, list or revoke API tokens')
    token_actions = token_cmd.add_subparsers(dest='action', required=True)
    create_cmd = token_actions.add_parser('create', help='print a new token (shown once) on the last line')
    create_cmd.add_argument('--name', required=True)
    create_cmd.add_argument('--scope', choices=models.SCOPES, required=True)
    create_cmd.add_argument('--ttl', type=security.parse_ttl, default='30d', help='seconds, or 30m, 12h, 30d')
    token_actions.add_parser('list', help='names, scopes and expiry; never secrets')
    token_actions.add_parser('revoke', help='delete a token').add_argument('name')
    args = parser.parse_args(argv)

    if args.command in ('init-db', 'seed', 'token'):
        db = models.open_database(config.database_url)
        models.create_schema(db)
        if args.command == 'seed':
            seed(models.People(db), args.count)
        elif args.command == 'token':
            return manage_tokens(args)
        print(f'{args.command}: done in the {config.database_url.split("://")[0]} database', file=sys.stderr)
    elif args.command in ('backup', 'restore'):
        db = models.open_database(config.database_url)
        try:
            done = backups.take(db, args.path) if args.command == 'backup' else backups.restore(db, args.path, args.force)
        except backups.Failed as error:
            sys.exit(f'{args.command} failed: {error}')
        print(f'{args.command}: {done}', file=sys.stderr)
    elif args.command == 'serve':
        config.host, config.port, config.workers = args.host, args.port, max(1, args.workers)
        if not config.auth and not is_loopback(config.host):
            sys.exit(f'refusing to serve {config.host} with PEOPLE_AUTH=off: without tokens anyone who can '
                     f'reach the port could read and change every person. Bind 127.0.0.1, or turn auth on.')
        temporary = config.metrics_dir is None
        config.metrics_dir = config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-')
        watch = telemetry.Watch(config.workers)
        Master(create_app(config, watch), config, watch).run()
        if temporary:
            shutil.rmtree(config.metrics_dir, ignore_errors=True)


if __name__ == '__main__':
    main()
