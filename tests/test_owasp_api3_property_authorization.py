"""OWASP API3, broken object property level authorization: a body cannot set what the client
does not own (the id, the internal version) and responses show nothing beyond the person."""
import pytest

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


@pytest.mark.parametrize('extra', [{'id': 999}, {'version': 50}, {'is_admin': True}, {'secret_hash': 'x'}])
def test_create_cannot_set_other_properties(client, extra):
    response = client.post_json('/resources/data/', {**PETER, **extra}, status=422)
    assert [e['pointer'] for e in response.json['errors']] == ['#/' + next(iter(extra))]
    assert client.get('/resources/data/').json['items'] == []


@pytest.mark.parametrize('extra', [{'id': 999}, {'version': 50}])
def test_update_cannot_set_other_properties(client, person, extra):
    client.patch_json(f"/resources/data/{person['id']}", extra, status=422)
    client.put_json(f"/resources/data/{person['id']}", {**PETER, **extra}, status=422)
    response = client.get(f"/resources/data/{person['id']}")
    assert response.json == person and response.headers['ETag'] == '"1"'


def test_responses_expose_only_the_person(client, person):
    assert set(client.get(f"/resources/data/{person['id']}").json) == {'id', 'name', 'age', 'locale'}
    assert all(set(p) == {'id', 'name', 'age', 'locale'} for p in client.get('/resources/data/').json['items'])
