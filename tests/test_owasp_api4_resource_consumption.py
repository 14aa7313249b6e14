"""OWASP API4, unrestricted resource consumption: bodies, pages and the per-worker caches are capped here; request
rates are limited by nginx in front (tested with deploy/)."""
import json

import time

import pytest

import security
from resources import MAX_BODY, PAGING


def test_body_cap_is_enforced_before_parsing(client):
    body = json.dumps({'name': 'x' * MAX_BODY, 'age': 1, 'locale': 'x'})
    assert client.post('/resources/data/', body, content_type='application/json', status=413).json['status'] == 413


def test_body_just_under_the_cap_is_parsed(client):
    padding = MAX_BODY - len(json.dumps({'name': '', 'age': 1, 'locale': 'x'}))
    response = client.post('/resources/data/', json.dumps({'name': 'x' * padding, 'age': 1, 'locale': 'x'}),
                           content_type='application/json', status=422)  # parsed, then refused by the field rule
    assert response.json['errors'][0]['pointer'] == '#/name'


def test_page_size_is_capped(client):
    maximum = PAGING['limit']['maximum']
    client.get(f'/resources/data/?limit={maximum}', status=200)
    client.get(f'/resources/data/?limit={maximum + 1}', status=400)


def test_a_page_never_returns_more_than_its_limit(client):
    for _ in range(12):
        client.post_json('/resources/data/', {'name': 'p', 'age': 1, 'locale': 'x'})
    assert len(client.get('/resources/data/?limit=5').json['items']) == 5
    assert len(client.get('/resources/data/').json['items']) == 12  # under the default of 50


def test_made_up_forwarded_addresses_cannot_grow_the_cache():
    guard = security.Guard(auth=False, allow=[], trusted_proxies=security.networks('127.0.0.1/32'))
    for n in range(2 * security.CACHE_SIZE):
        assert guard.identify('127.0.0.1', f'198.51.{n // 256 % 256}.{n % 256}, 10.0.{n // 256}.{n % 256}', None)[0] \
            == f'10.0.{n // 256}.{n % 256}'
        assert len(guard.known) <= security.CACHE_SIZE


def test_a_long_forwarded_chain_is_answered_but_not_cached():
    guard = security.Guard(auth=False, allow=[], trusted_proxies=security.networks('127.0.0.1/32'))
    chain = ', '.join(['192.0.2.1'] * 1000 + ['127.0.0.1'])  # 10 KB: 10,000 of them would hold 100 MB
    assert guard.identify('127.0.0.1', chain, None)[:2] == ('192.0.2.1', True)
    assert guard.known == {}


def test_made_up_tokens_cannot_grow_the_caches_or_reach_the_database_twice():
    looked_up = []
    guard = security.Guard(auth=True, allow=[], trusted_proxies=[], lookup=lambda digest: looked_up.append(digest))
    for n in range(2 * security.CACHE_SIZE):
        assert guard.identify('127.0.0.1', None, f'Bearer made-up-{n}')[2:5] == (None, '127.0.0.1', None)
        assert len(guard.known) <= security.CACHE_SIZE and len(guard.tokens) <= security.CACHE_SIZE
    assert guard.identify('127.0.0.1', None, f'Bearer made-up-{2 * security.CACHE_SIZE - 1}')[2] is None  # cached
    assert len(looked_up) == 2 * security.CACHE_SIZE


def test_a_token_longer_than_any_real_one_is_refused_without_a_look_up_or_caching():
    guard = security.Guard(auth=True, allow=[], trusted_proxies=[], lookup=lambda digest: pytest.fail('looked up'))
    assert guard.identify('127.0.0.1', None, 'Bearer ' + 'x' * 5000)[2] is None
    assert guard.known == {} and guard.tokens == {}


def test_a_token_is_looked_up_once_whatever_x_forwarded_for_comes_with_it():
    """X-Forwarded-For is the client's to write (nginx appends to it): new values, or one too long to cache,
    must not make a valid token a database query a request."""
    looked_up = []
    guard = security.Guard(auth=True, allow=[], trusted_proxies=security.networks('127.0.0.1/32'),
                           lookup=lambda digest: looked_up.append(digest) or ('write', time.time() + 3600, 'tok'))
    chains = [f'192.0.2.{n}' for n in range(5)] + ['198.51.100.1, ' * 30 + '192.0.2.9'] * 3
    assert {guard.identify('127.0.0.1', chain, 'Bearer good')[2] for chain in chains} == {'write'}
    for _ in range(2 * security.CACHE_SIZE):  # a flood of made-up addresses on a path that needs no token
        guard.identify('127.0.0.1', f'10.9.{_ // 256 % 256}.{_ % 256}', None)
    assert guard.identify('127.0.0.1', '192.0.2.1', 'Bearer good')[2] == 'write'
    assert len(looked_up) == 1
