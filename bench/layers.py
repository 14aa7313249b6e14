"""Where the read's time goes, layer by layer, side by side in one run (docs/performance.md):

    python bench/layers.py [--rounds R] [--seconds S]

  raw_bjoern             the ceiling: a bare WSGI function on bjoern + sqlite3 (../shared/bench/peers)
  falcon_floor           Falcon with one resource: the same read through sqlite3, orjson into resp.data
  falcon_floor_forked    the same, served by a forked child, as the service's workers are
  service_no_middleware  this service with its middleware left out (no metrics, request ids, headers)
  service_headers_only   the same plus one middleware that only sets the three headers the real
                         middleware sets (X-Request-ID, X-Content-Type-Options, Cache-Control)
  project                this service as it ships

It drives ../shared/bench/compare.py (same pinning, rounds and seeding), adding the four middle
layers, which this file also serves: python bench/layers.py --serve floor|forked|bare|headers HOST PORT.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, '.venv', 'bin', 'python')
LAYERS = ('raw_bjoern', 'falcon_floor', 'falcon_floor_forked', 'service_no_middleware', 'service_headers_only',
          'project')


def serve_floor(host, port, forked=False):
    import sqlite3
    from urllib.parse import parse_qs

    import bjoern
    import falcon
    import orjson

    if forked and os.fork():  # the parent only waits, as the service's master does
        os.wait()
        return
    conn = sqlite3.connect(os.environ['PEER_DB'], isolation_level=None)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.execute('CREATE TABLE IF NOT EXISTS people(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,'
                 ' age INTEGER NOT NULL, locale TEXT NOT NULL)')

    class Item:
        def on_get(self, req, resp, id):
            row = conn.execute('SELECT id, name, age, locale FROM people WHERE id = ?', (int(id),)).fetchone()
            resp.data = orjson.dumps({'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]})

    class Collection:  # only for compare.py's seeding
        def on_put(self, req, resp):
            person = orjson.loads(parse_qs(req.bounded_stream.read().decode())['data'][0])
            conn.execute('INSERT INTO people(name, age, locale) VALUES (?, ?, ?)',
                         (person['name'], person['age'], person['locale']))
            resp.status = falcon.HTTP_201

    app = falcon.App()
    app.add_route('/resources/data/', Collection())
    app.add_route('/resources/data/{id}', Item())
    bjoern.run(app, host, int(port))


class Headers:
    def process_request(self, req, resp):
        resp.set_header('X-Request-ID', '5f0c2a9e41d7-1000')
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Cache-Control', 'no-store')


def serve_bare(host, port, middleware=()):
    import falcon
    app_class, kept = falcon.App, list(middleware)
    falcon.App = lambda middleware=None, **options: app_class(middleware=kept, **options)  # the service's left out
    sys.path.insert(0, ROOT)
    import service
    service.main(['serve', '--host', host, '--port', port, '--workers', '1'])


def main():
    sys.path.insert(0, os.path.join(ROOT, '..', 'shared', 'bench'))
    import compare

    def targets(project, port, db):
        found = original(project, port, db)
        env = {'DATABASE_URL': 'sqlite:///' + db, 'PEOPLE_AUTH': 'off', 'PEER_DB': db}
        for name, mode in (('falcon_floor', 'floor'), ('falcon_floor_forked', 'forked'),
                           ('service_no_middleware', 'bare'), ('service_headers_only', 'headers')):
            found[name] = ([PYTHON, os.path.abspath(__file__), '--serve', mode, '127.0.0.1', str(port)], ROOT, env)
        return found

    original, compare.targets = compare.targets, targets
    sys.argv = [sys.argv[0], '--project', ROOT, '--only', ','.join(LAYERS), *sys.argv[1:]]
    compare.main()


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        modes = {'floor': serve_floor, 'forked': lambda *a: serve_floor(*a, forked=True), 'bare': serve_bare,
                 'headers': lambda *a: serve_bare(*a, middleware=[Headers()])}
        modes[sys.argv[2]](*sys.argv[3:5])
    else:
        main()
