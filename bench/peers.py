"""The servers bench/compare.py runs beside the service, each serving the original contract (PUT
/resources/data/ with a form field data=JSON; GET /resources/data/{id}) from the service's own storage:
the tables of schema.sql, list indexes included, in WAL mode with synchronous=FULL, so that a create costs
each of them what it costs the service. PEER_DB names the SQLite file.

    python bench/peers.py HOST PORT                       the ceiling: a bare WSGI function on bjoern
    gunicorn -w 1 --chdir bench 'peers:flask_app()'       Flask, as its user would write it
    uvicorn --app-dir bench --factory peers:fastapi_app   FastAPI, as its user would write it

The ceiling runs in the project's virtualenv (bjoern); Flask and FastAPI in compare.py's throwaway one.
"""
import json
import os
import sqlite3
import sys
import threading
from urllib.parse import parse_qs

SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'schema.sql')
INSERT = 'INSERT INTO people (name, age, locale) VALUES (?, ?, ?)'
SELECT = 'SELECT id, name, age, locale FROM people WHERE id = ?'
local = threading.local()  # one connection a thread: gunicorn's and uvicorn's workers may use several


def db():
    if getattr(local, 'conn', None) is None:
        local.conn = sqlite3.connect(os.environ.get('PEER_DB', 'peer.db'), isolation_level=None,
                                     check_same_thread=False)
        local.conn.execute('PRAGMA journal_mode=WAL')
        local.conn.execute('PRAGMA synchronous=FULL')
        local.conn.execute('PRAGMA busy_timeout=5000')
        with open(SCHEMA) as f:
            local.conn.executescript(f.read())
    return local.conn


def person(row):
    return {'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]}


def create(person_json):
    data = json.loads(person_json)
    cursor = db().execute(INSERT, (data['name'], data['age'], data['locale']))
    return {'id': cursor.lastrowid, 'name': data['name'], 'age': data['age'], 'locale': data['locale']}


def ceiling(environ, start_response):
    """No framework, no ORM: the fastest Python can answer on bjoern."""
    path, method, prefix = environ['PATH_INFO'], environ['REQUEST_METHOD'], '/resources/data/'
    status, answer = '404 Not Found', {'title': 'Not Found'}
    if method == 'GET' and path.startswith(prefix) and path[len(prefix):].isdigit():
        row = db().execute(SELECT, (int(path[len(prefix):]),)).fetchone()
        if row:
            status, answer = '200 OK', person(row)
    elif method == 'PUT' and path == prefix:
        body = environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0)).decode()
        status, answer = '201 Created', create(parse_qs(body)['data'][0])
    body = json.dumps(answer).encode()
    start_response(status, [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
    return [body]


def flask_app():
    from flask import Flask, abort, request

    app = Flask(__name__)

    @app.put('/resources/data/')
    def put():
        return create(request.form['data']), 201

    @app.get('/resources/data/<int:person_id>')
    def get(person_id):
        row = db().execute(SELECT, (person_id,)).fetchone()
        return person(row) if row else abort(404)
    return app


def fastapi_app():
    from fastapi import FastAPI, Form, HTTPException

    app = FastAPI()

    @app.put('/resources/data/', status_code=201)
    def put(data: str = Form()):
        return create(data)

    @app.get('/resources/data/{person_id}')
    def get(person_id: int):
        row = db().execute(SELECT, (person_id,)).fetchone()
        if row is None:
            raise HTTPException(404)
        return person(row)
    return app


if __name__ == '__main__':
    import bjoern
    bjoern.run(ceiling, sys.argv[1], int(sys.argv[2]))
