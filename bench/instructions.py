"""Instructions a request costs in process, counted by valgrind's callgrind (docs/performance.md):

    python bench/instructions.py [--requests N]

The machine is shared, so timings move by a third between runs; an instruction count does not (with the
hash seed fixed, two runs of 50 requests gave counts within 0.05% of each other here), so this is the
check that a change made a request cheaper or dearer. Each case runs the app as WSGI in one process,
with no server and no sockets, twice under callgrind: N requests more in the second run, so start-up
cancels out. Cases:

  read_production  GET by id with a write token and X-Forwarded-For, PEOPLE_TRUSTED_PROXIES set (as deployed)
  read_auth_off    the same read with tokens and trusted proxies off (as `make run` serves)
  create_form      the original contract's PUT with form field data=<JSON>, tokens on
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, '.venv', 'bin', 'python')
CASES = ('read_production', 'read_auth_off', 'create_form')


def drive(case, count):
    """In the child: build the app for `case` and answer `count` of its requests."""
    import io
    sys.path.insert(0, ROOT)
    import atexit
    import shutil
    directory = tempfile.mkdtemp(prefix='people-instr-')
    atexit.register(shutil.rmtree, directory, True)  # the database, gone when the count is done
    os.environ['DATABASE_URL'] = f'sqlite:///{directory}/people.db'
    os.environ['PEOPLE_TRUSTED_PROXIES'] = '' if case == 'read_auth_off' else '127.0.0.1/32'
    os.environ['PEOPLE_AUTH'] = 'off' if case == 'read_auth_off' else 'on'
    import models
    import service
    import storage
    db = storage.open_database(os.environ['DATABASE_URL'])
    storage.create_schema(db)
    models.People(db).seed(1, 1000)
    app = service.create_app(service.Config())
    body = b'data=' + b'{"name": "peter", "locale": "NYC", "age": 42}'.replace(b'"', b'%22').replace(b' ', b'+')
    environ = {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/resources/data/7', 'QUERY_STRING': '', 'SERVER_NAME': 'x',
               'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1', 'wsgi.url_scheme': 'http', 'wsgi.errors': sys.stderr,
               'REMOTE_ADDR': '127.0.0.1', 'HTTP_AUTHORIZATION': 'Bearer ' + models.create_token('b', 'write', 3600),
               'HTTP_X_FORWARDED_FOR': '203.0.113.7'}
    if case == 'create_form':
        environ.update(REQUEST_METHOD='PUT', PATH_INFO='/resources/data/', CONTENT_TYPE='application/x-www-form-urlencoded',
                       CONTENT_LENGTH=str(len(body)))
    statuses = set()
    import gc
    gc.collect()  # as a worker does before serving (server.Master.spawn): a full collection that falls in one
    gc.freeze()   # run and not the other once outweighed 50 requests, and a count came out negative
    for _ in range(count):
        b''.join(app({**environ, 'wsgi.input': io.BytesIO(body)}, lambda status, headers, exc=None: statuses.add(status)))
    assert statuses <= {'200 OK', '201 Created'}, statuses  # a count of error answers would measure the wrong thing


def instructions(case, count):
    # A fixed hash seed: with a random one, start-up alone varied by more than a few requests cost.
    result = subprocess.run(['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null', PYTHON, __file__,
                             '--drive', case, str(count)], capture_output=True, text=True,
                            env={**os.environ, 'PYTHONHASHSEED': '0'})
    found = re.search(r'Collected : (\d+)', result.stderr)
    if result.returncode != 0 or not found:
        sys.exit(f'{case}: valgrind failed:\n{result.stderr[-2000:]}')
    return int(found[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--requests', type=int, default=2000)
    parser.add_argument('--drive', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        return drive(args.drive[0], int(args.drive[1]))
    if not subprocess.run(['which', 'valgrind'], capture_output=True).stdout:
        sys.exit('valgrind is missing: apt-get install valgrind')
    warm = 200  # requests in both runs: the caches (tokens, addresses, compiled statements) are warm
    for case in CASES:
        per_request = (instructions(case, warm + args.requests) - instructions(case, warm)) / args.requests
        print(f'{case:16s} {per_request:10,.0f} instructions a request', flush=True)


if __name__ == '__main__':
    main()
