"""GET /docs, the API page: Swagger UI from the pinned package's files, needing no token (as
/openapi.json, which it shows), each file cached and revalidated, no path reaching any other file;
and in headless Chromium every operation of the document rendered, straight from bjoern and
through nginx under the page's Content-Security-Policy."""
import json
import re
import shutil
import socket
import subprocess

import pytest
from bs4 import BeautifulSoup

from conftest import Server
from test_deploy import Stack, require

FILES = {'docs/swagger-ui.css': 'text/css; charset=utf-8', 'docs/swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
         'docs/start.js': 'text/javascript; charset=utf-8'}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def test_page_links_exactly_its_files_and_needs_no_token(secure):
    client = secure.make()  # production defaults: tokens on
    page = client.get('/docs', status=200)
    assert page.content_type == 'text/html'
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(links) == sorted(FILES)
    documented = client.get('/openapi.json').json['paths']['/docs/{asset}']['parameters'][0]['schema']['enum']
    assert sorted(f'docs/{name}' for name in documented) == sorted(FILES)
    for link, content_type in FILES.items():
        answer = client.get('/' + link, status=200)
        assert answer.headers['Content-Type'] == content_type and answer.body


def test_a_file_is_cached_for_a_day_and_revalidated_by_etag(client):
    first = client.get('/docs/swagger-ui-bundle.js', status=200)
    assert first.headers['Cache-Control'] == 'max-age=86400'
    assert first.headers['X-Content-Type-Options'] == 'nosniff'
    again = client.get('/docs/swagger-ui-bundle.js', headers={'If-None-Match': first.headers['ETag']}, status=304)
    assert again.body == b'' and again.headers['ETag'] == first.headers['ETag']
    stale = client.get('/docs/swagger-ui-bundle.js', headers={'If-None-Match': '"other"'}, status=200)
    assert stale.body == first.body


def test_the_page_itself_is_not_cached(client):
    assert client.get('/docs').headers['Cache-Control'] == 'no-store'  # it names the files: always the current ones


def test_unknown_file_gives_404_problem(client):
    problem = client.get('/docs/swagger-ui.js', status=404)
    assert problem.content_type == 'application/problem+json'
    assert 'swagger-ui-bundle.js' in problem.json['detail']


@pytest.mark.parametrize('path', ['/docs/../service.py', '/docs/..%2fservice.py', '/docs/%2e%2e%2fservice.py',
                                  '/docs/swagger-ui.css/../../service.py', '/docs/..%2f..%2f..%2f..%2fetc%2fpasswd',
                                  '/docs/%2fetc%2fpasswd', '/docs/.%2fstart.js', '/docs/start.js%00'])
def test_no_path_reaches_another_file(server, path):
    """Sent as is over a socket, as an attacker would (a client library would normalise the dots)."""
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
        reply = b''
        while chunk := s.recv(65536):
            reply += chunk
    head, body = reply.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 404') and b'application/problem+json' in head, reply[:300]
    assert json.loads(body)['status'] == 404


# -- in a browser ------------------------------------------------------------------------------------

def browse(tmp_path, url):
    """(the DOM after the page's scripts ran, Chromium's log: its console, CSP violations included)."""
    require('chromium', 'REQUIRE_CHROMIUM')
    result = subprocess.run(
        [shutil.which('chromium'), '--headless', '--no-sandbox', '--disable-gpu', f'--user-data-dir={tmp_path}/chromium',
         '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
         '--ignore-certificate-errors', '--enable-logging=stderr', '--v=0', '--virtual-time-budget=8000',
         '--dump-dom', url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def rendered_operations(dom):
    soup = BeautifulSoup(dom, 'html.parser')
    return sorted((block.select_one('.opblock-summary-method').text.lower(),
                   block.select_one('.opblock-summary-path')['data-path']) for block in soup.select('.opblock'))


def documented_operations(document):
    return sorted((method, path) for path, item in document['paths'].items() for method in item
                  if method != 'parameters')


def test_every_operation_is_rendered_in_chromium(tmp_path):
    server = Server(f'sqlite:///{tmp_path}/people.db', PEOPLE_AUTH='on')
    try:
        dom, _ = browse(tmp_path, f'{server.url}/docs')
    finally:
        server.stop()
    from openapi import document
    operations = documented_operations(document())
    assert len(operations) == 15 and rendered_operations(dom) == operations


def test_page_works_through_nginx_under_its_csp(tmp_path):
    stack = Stack(f'sqlite:///{tmp_path}/people.db', CLIENT_TIMEOUT='2s')
    try:
        status, headers, _ = stack.request('GET', '/docs', headers={'Authorization': ''})
        assert status == 200 and headers['Content-Security-Policy'] == PAGE_CSP
        status, headers, _ = stack.request('GET', '/resources/data/')
        assert status == 200 and headers['Content-Security-Policy'] == "frame-ancestors 'none'"  # the API's, as before
        status, headers, body = stack.request('GET', '/docs/swagger-ui-bundle.js', headers={'Accept-Encoding': 'gzip'})
        assert status == 200 and headers['Content-Encoding'] == 'gzip' and len(body) < 600_000
        document = json.loads(stack.request('GET', '/openapi.json')[2])
        dom, log = browse(tmp_path, f'https://127.0.0.1:{stack.https}/docs')
    finally:
        assert stack.stop() == 0
    assert rendered_operations(dom) == documented_operations(document)
    assert 'Content Security Policy' not in log, log  # Chromium logs every violation, even one that breaks nothing
