"""Where the read's time goes, layer by layer, side by side in one run (docs/performance.md):

    python bench/layers.py [--rounds R] [--seconds S] [--port PORT] [any other option of bench/compare.py]

  ceiling                the ceiling: a bare WSGI function on bjoern + sqlite3 (bench/peers.py)
  falcon_floor           Falcon with one resource: the same read through sqlite3, orjson into resp.data
  falcon_floor_forked    the same, served by a forked child, as the service's workers are
  service_no_middleware  this service with its middleware left out (no metrics, request ids, headers)
  service_headers_only   the same plus one middleware that only sets the three headers the real
                         middleware sets (X-Request-ID, X-Content-Type-Options, Cache-Control)
  service                this service as it ships

It runs bench/compare.py (same pinning, rounds and seeding) with the four middle layers added, which
this file also serves: python bench/layers.py --serve floor|forked|bare|headers HOST PORT.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ('ceiling', 'falcon_floor', 'falcon_floor_forked', 'service_no_middleware', 'service_headers_only',
          'service')


def serve_floor(host, port, forked=False):
    import bjoern
    import falcon
    import orjson

    import peers  # the ceiling's storage and statements

    if forked and os.fork():  # the parent only waits, as the service's master does
        os.wait()
        return

    class Item:
        def on_get(self, req, resp, id):
            row = peers.db().execute(peers.SELECT, (int(id),)).fetchone()
            resp.data = orjson.dumps({'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]})

    app = falcon.App()
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


def layers(port, tmp, service_env):
    """compare.py's extra targets: the four middle layers, served by this file."""
    return {name: ([sys.executable, os.path.abspath(__file__), '--serve', mode, '127.0.0.1', str(port)],
                   {'DATABASE_URL': f'sqlite:///{tmp}/{name}.db', 'PEOPLE_AUTH': 'off'})
            for name, mode in (('falcon_floor', 'floor'), ('falcon_floor_forked', 'forked'),
                               ('service_no_middleware', 'bare'), ('service_headers_only', 'headers'))}


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        modes = {'floor': serve_floor, 'forked': lambda *a: serve_floor(*a, forked=True), 'bare': serve_bare,
                 'headers': lambda *a: serve_bare(*a, middleware=[Headers()])}
        modes[sys.argv[2]](*sys.argv[3:5])
    else:
        import compare
        sys.exit(compare.main(['--only', ','.join(LAYERS), *sys.argv[1:]], layers, __doc__))
