"""OWASP API8, security misconfiguration: no internals in errors, CORS denied by default,
protective headers on every response, no header naming the software."""
import pytest
import webtest

import security

from service import Config, create_app

INTERNALS = ['Traceback', 'peewee', 'sqlite', 'psycopg', 'SELECT', 'INSERT', '.py', '/work', 'File "',
             'OperationalError', 'IntegrityError']


def assert_no_internals(response):
    for word in INTERNALS:
        assert word not in response.text, (word, response.text)


@pytest.mark.parametrize('body', ['{"name": 1e999, "age": 1, "locale": "x"}', '{"name": "\\ud800", "age": 1, "locale": "x"}',
                                  '[' * 50000, '{"name": "x", "age": 99999999999999999999999, "locale": "x"}',
                                  '{"name": "\'; DROP TABLE people; --", "age": "1", "locale": "x"}'])
def test_odd_json_errors_carry_no_internals(client, body):
    response = client.post('/resources/data/', body, content_type='application/json', status='*')
    assert response.status_int in (400, 422)
    assert_no_internals(response)


@pytest.mark.parametrize('url', ['sqlite:////nonexistent/dir/people.db', 'postgresql://postgres@127.0.0.1:1/test'])
def test_database_errors_carry_no_internals(url, tmp_path):
    client = webtest.TestApp(create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=url,
                                               metrics_dir=str(tmp_path))))
    response = client.get('/resources/data/1', status=503, expect_errors=True)
    assert_no_internals(response)
    assert '127.0.0.1' not in response.text and 'nonexistent' not in response.text


def test_unexpected_failure_is_a_plain_500(client, monkeypatch):
    import models
    monkeypatch.setattr(models.People, 'find', lambda self, person_id: 1 / 0)
    response = client.get('/resources/data/1', status=500, expect_errors=True)
    assert response.content_type == 'application/problem+json'
    assert_no_internals(response)
    assert 'ZeroDivision' not in response.text


@pytest.mark.parametrize('path, status', [('/resources/data/', 200), ('/resources/data/9', 404), ('/nope', 404),
                                          ('/livez', 200)])
def test_protective_headers_on_every_response(client, path, status):
    response = client.get(path, status=status)
    assert response.headers['X-Content-Type-Options'] == 'nosniff'
    assert response.headers['Cache-Control'] == 'no-store'
    assert 'Server' not in response.headers and 'X-Powered-By' not in response.headers


def test_protective_headers_on_refusals(secure):
    response = secure.make().get('/resources/data/', status=401)
    assert response.headers['X-Content-Type-Options'] == 'nosniff'


def test_cors_is_off_by_default(client):
    response = client.get('/resources/data/', headers={'Origin': 'https://evil.example'})
    assert 'Access-Control-Allow-Origin' not in response.headers
    preflight = client.options('/resources/data/', headers={
        'Origin': 'https://evil.example', 'Access-Control-Request-Method': 'DELETE'}, status='*')
    assert 'Access-Control-Allow-Origin' not in preflight.headers


def test_cors_allows_only_listed_origins(secure):
    client = secure.make(PEOPLE_CORS_ORIGINS='https://app.example')
    allowed = client.get('/resources/data/', headers={'Origin': 'https://app.example', **secure.auth('read')})
    assert allowed.headers['Access-Control-Allow-Origin'] == 'https://app.example'
    other = client.get('/resources/data/', headers={'Origin': 'https://evil.example', **secure.auth('read')})
    assert 'Access-Control-Allow-Origin' not in other.headers
    preflight = client.options('/resources/data/', headers={
        'Origin': 'https://app.example', 'Access-Control-Request-Method': 'POST'})  # no token on a preflight
    assert preflight.headers['Access-Control-Allow-Origin'] == 'https://app.example'


def test_allow_list_refuses_other_addresses(secure):
    client = secure.make(PEOPLE_ALLOW='10.1.0.0/16,2001:db8::/32')
    client.get('/resources/data/', headers=secure.auth('read'), extra_environ={'REMOTE_ADDR': '10.1.2.3'}, status=200)
    client.get('/resources/data/', headers=secure.auth('read'), extra_environ={'REMOTE_ADDR': '2001:db8::7'},
               status=200)
    response = client.get('/resources/data/', headers=secure.auth('read'), extra_environ={'REMOTE_ADDR': '10.2.0.1'},
                          status=403)
    assert response.content_type == 'application/problem+json'
    client.get('/livez', extra_environ={'REMOTE_ADDR': '10.2.0.1'}, status=200)  # probes stay open


def test_a_refused_address_never_reaches_the_database_nor_counts_as_a_tokens_use():
    """The allow-list comes first: a token from an address it refuses is not looked up, so neither guesses nor
    a database outage change the 403, and the request is no use of the token it names."""
    guard = security.Guard(auth=True, allow=security.networks('10.1.0.0/16'), trusted_proxies=[],
                           lookup=lambda digest: pytest.fail('looked up'))
    client, is_allowed, scope, caller, token, _ = guard.identify('192.0.2.7', None, 'Bearer people_guess')
    assert (client, is_allowed, scope, caller, token) == ('192.0.2.7', False, None, '192.0.2.7', None)


def test_forwarded_for_is_believed_only_from_trusted_proxies(secure):
    client = secure.make(PEOPLE_ALLOW='10.1.0.0/16', PEOPLE_TRUSTED_PROXIES='127.0.0.1/32,0.0.0.0/32')
    auth = secure.auth('read')
    via_proxy = {'REMOTE_ADDR': '127.0.0.1'}
    client.get('/resources/data/', headers={**auth, 'X-Forwarded-For': '10.1.0.9'}, extra_environ=via_proxy,
               status=200)
    client.get('/resources/data/', headers={**auth, 'X-Forwarded-For': '10.1.0.9, 192.0.2.1'}, extra_environ=via_proxy,
               status=403)  # the nearest untrusted hop is the client
    client.get('/resources/data/', headers={**auth, 'X-Forwarded-For': '10.1.0.9'},
               extra_environ={'REMOTE_ADDR': '0.0.0.0'}, status=200)  # nginx over a unix socket
    client.get('/resources/data/', headers={**auth, 'X-Forwarded-For': 'garbage'}, extra_environ=via_proxy,
               status=403)
    client.get('/resources/data/', headers={**auth, 'X-Forwarded-For': '10.1.0.9'},
               extra_environ={'REMOTE_ADDR': '192.0.2.50'}, status=403)  # an untrusted peer's header is ignored



PROXY_CASES = [  # (peer, X-Forwarded-For, the client, whether PEOPLE_ALLOW admits it)
    ('127.0.0.1', '10.1.0.9', '10.1.0.9', True),
    ('127.0.0.1', '10.1.0.9, 192.0.2.1', '192.0.2.1', False),  # the nearest untrusted hop
    ('127.0.0.1', '10.1.0.9, 10.0.0.2, 127.0.0.1', '10.1.0.9', True),  # a chain: trusted proxies skipped
    ('127.0.0.1', '127.0.0.1, ::1', '127.0.0.1', False),  # every hop trusted: the farthest
    ('192.0.2.50', '10.1.0.9', '192.0.2.50', False),  # spoofed by an untrusted peer: ignored
    ('0.0.0.0', '10.1.0.9', '10.1.0.9', True),  # nginx over a unix socket
    ('::1', '2001:db8::5', '2001:db8::5', True),  # IPv6 proxy and client
    ('::1', '2001:db8::5, fd00::1', 'fd00::1', False),
    ('2001:db8::66', '192.0.2.1', '2001:db8::66', True),  # an untrusted IPv6 peer's header: ignored
    ('127.0.0.1', 'garbage', 'unknown', False),  # malformed: no address, in no network, never logged as sent
    ('127.0.0.1', '<script>, 10.0.0.2', 'unknown', False),
    ('127.0.0.1', '10.1.0.9,,', 'unknown', False),
    ('127.0.0.1', ' , 10.1.0.9 ', '10.1.0.9', True),
    ('127.0.0.1', '10.1.0.9:443', 'unknown', False),
    ('127.0.0.1', '[2001:db8::5]', 'unknown', False),
    ('127.0.0.1', 'x' * 20_000 + ', 10.1.0.9', '10.1.0.9', True),  # only the nearest MAX_HOPS hops are read
    ('127.0.0.1', '10.1.0.9, ' + '10.0.0.2, ' * 7 + '127.0.0.1', '10.0.0.2', False),  # past them: the farthest read
    ('127.0.0.1', '', '127.0.0.1', False),  # an empty header: the peer
    ('127.0.0.1', None, '127.0.0.1', False),
    ('garbage', '10.1.0.9', 'garbage', False),
]


@pytest.mark.parametrize('peer, forwarded, client, is_allowed', PROXY_CASES)
def test_client_address_behind_trusted_proxies(peer, forwarded, client, is_allowed):
    guard = security.Guard(auth=False, allow=security.networks('10.1.0.0/16,2001:db8::/32'),
                           trusted_proxies=security.networks('127.0.0.1/32,0.0.0.0/32,::1/128,10.0.0.2/32'))
    for _ in range(2):  # worked out, then from the cache
        assert guard.identify(peer, forwarded, None)[:2] == (client, is_allowed)


def test_a_cached_client_is_never_the_answer_for_another_peer(secure):
    client = secure.make(PEOPLE_ALLOW='10.1.0.0/16', PEOPLE_TRUSTED_PROXIES='127.0.0.1/32')
    headers = {**secure.auth('read'), 'X-Forwarded-For': '10.1.0.9'}
    client.get('/resources/data/', headers=headers, extra_environ={'REMOTE_ADDR': '127.0.0.1'}, status=200)
    client.get('/resources/data/', headers=headers, extra_environ={'REMOTE_ADDR': '192.0.2.50'}, status=403)
