"""OWASP API1 (object level) and API5 (function level) authorization: what each scope may do.
Every person is shared data here, so object-level rights follow the token's scope."""
import pytest

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


@pytest.fixture
def client(secure):
    client = secure.make()
    client.post_json('/resources/data/', PETER, headers=secure.auth('write'))
    return client


def test_read_token_reads(client, secure):
    assert client.get('/resources/data/1', headers=secure.auth('read')).json['name'] == 'peter'
    client.get('/resources/data/', headers=secure.auth('read'), status=200)
    client.head('/resources/data/1', headers=secure.auth('read'), status=200)


@pytest.mark.parametrize('method, path', [('post', '/resources/data/'), ('put', '/resources/data/'),
                                          ('put', '/resources/data/1'), ('patch', '/resources/data/1')])
def test_read_token_cannot_write(client, secure, method, path):
    response = getattr(client, method + '_json')(path, PETER, headers=secure.auth('read'), status=403)
    assert response.content_type == 'application/problem+json' and 'write token' in response.json['detail']
    assert client.get('/resources/data/', headers=secure.auth('read')).json['items'] == [{'id': 1, **PETER}]


def test_read_token_cannot_delete(client, secure):
    client.delete('/resources/data/1', headers=secure.auth('read'), status=403)
    client.get('/resources/data/1', headers=secure.auth('read'), status=200)


def test_write_token_does_everything(client, secure):
    headers = secure.auth('write')
    client.patch_json('/resources/data/1', {'age': 7}, headers=headers, status=200)
    client.put_json('/resources/data/1', PETER, headers=headers, status=200)
    client.delete('/resources/data/1', headers=headers, status=200)
    client.get('/resources/data/1', headers=headers, status=404)
