"""The PostgreSQL ceiling: a bare WSGI function on bjoern reading a person by id through psycopg2.
No framework, no ORM: what Python on bjoern can do against PostgreSQL on this machine.

Run: DATABASE_URL=postgresql://... python bench/raw_psycopg.py HOST PORT
"""
import json
import os
import sys

import bjoern
import psycopg2

conn = psycopg2.connect(os.environ['DATABASE_URL'].replace('postgresql+pool://', 'postgresql://'))
conn.autocommit = True
cursor = conn.cursor()
PREFIX = '/resources/data/'


def app(environ, start_response):
    path = environ['PATH_INFO']
    if environ['REQUEST_METHOD'] == 'GET' and path.startswith(PREFIX) and path[len(PREFIX):].isdigit():
        cursor.execute('SELECT id, name, age, locale FROM people WHERE id = %s', (int(path[len(PREFIX):]),))
        row = cursor.fetchone()
        if row:
            body = json.dumps({'id': row[0], 'name': row[1], 'age': row[2], 'locale': row[3]}).encode()
            start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
            return [body]
    start_response('404 Not Found', [('Content-Type', 'application/json'), ('Content-Length', '2')])
    return [b'{}']


if __name__ == '__main__':
    bjoern.run(app, sys.argv[1], int(sys.argv[2]))
