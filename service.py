"""The people service: configuration, the app factory, the command line, and serving on bjoern
with pre-forked workers that drain on SIGTERM or SIGINT.

    python service.py serve [--host H] [--port P] [--workers N]
    python service.py init-db
"""
import argparse
import os
import signal
import sys
import time

import falcon

import models
from openapi import OpenAPI
from resources import PREFIX, Collection, Item, add_error_handlers


class Config:
    """Settings, read from the environment once, here and nowhere else."""
    DEFAULT_DATABASE_URL = 'sqlite:///people.db'
    DEFAULT_HOST = '127.0.0.1'
    DEFAULT_PORT = 8000
    DEFAULT_WORKERS = 1
    DEFAULT_DRAIN_SECONDS = 5

    def __init__(self, environ=os.environ, **overrides):
        self.database_url = environ.get('DATABASE_URL', self.DEFAULT_DATABASE_URL)
        self.host = environ.get('HOST', self.DEFAULT_HOST)
        self.port = int(environ.get('PORT', self.DEFAULT_PORT))
        self.workers = int(environ.get('WORKERS', self.DEFAULT_WORKERS))
        self.drain_seconds = float(environ.get('DRAIN_SECONDS', self.DEFAULT_DRAIN_SECONDS))
        for name, value in overrides.items():
            setattr(self, name, value)


def create_app(config):
    db = models.open_database(config.database_url)
    people = models.People(db)
    app = falcon.App(media_type='application/json')
    app.add_route(PREFIX, Collection(people))
    app.add_route(PREFIX + '{id}', Item(people))
    app.add_route('/openapi.json', OpenAPI())
    add_error_handlers(app, people)
    return app


def log(message):
    print(f'people[{os.getpid()}]: {message}', file=sys.stderr, flush=True)


def serve(app, config):
    """Listen once, then fork the workers; replace any that dies; on SIGTERM or SIGINT ask each
    to drain and force-stop those still running after drain_seconds."""
    import bjoern  # imported here so that tests and the other commands do not need its C build

    models.create_schema(models.database.obj)
    models.database.close()  # NOTE: a connection must never cross fork(); each worker opens its own
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
            log(f'draining {len(workers)} worker(s), at most {config.drain_seconds:g}s')
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
    log(f'serving http://{config.host}:{config.port}/ with {config.workers} worker(s)')
    while workers:
        pid, status = os.wait()
        workers.discard(pid)
        if not stopping:
            log(f'worker {pid} ended ({status}); starting another')
            time.sleep(0.2)  # a worker that dies at start must not make this a busy loop
            spawn()
    log('stopped')


def main(argv=None):
    config = Config()
    parser = argparse.ArgumentParser(prog='service.py', description='The people REST service.')
    commands = parser.add_subparsers(dest='command', required=True)
    serve_cmd = commands.add_parser('serve', help='serve HTTP on bjoern')
    serve_cmd.add_argument('--host', default=config.host)
    serve_cmd.add_argument('--port', type=int, default=config.port)
    serve_cmd.add_argument('--workers', type=int, default=config.workers)
    commands.add_parser('init-db', help='create the tables that are missing (never drops data)')
    args = parser.parse_args(argv)

    if args.command == 'init-db':
        models.create_schema(models.open_database(config.database_url))
        log(f'schema ready in {config.database_url.split("://")[0]} database')
    elif args.command == 'serve':
        config.host, config.port, config.workers = args.host, args.port, max(1, args.workers)
        serve(create_app(config), config)


if __name__ == '__main__':
    main()
