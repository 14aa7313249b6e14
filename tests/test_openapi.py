"""/openapi.json describes the app as it is: the same routes and methods, and the rules it enforces."""
import jsonschema
import pytest

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


@pytest.fixture
def document(client):
    doc = client.get('/openapi.json').json
    assert doc['openapi'] == '3.1.0'
    return doc


def schema(document, name):
    """A component schema with its $refs resolvable by jsonschema."""
    return {**document['components']['schemas'][name], 'components': document['components']}


def test_person_responses_match_the_document(client, document):
    created = client.post_json('/resources/data/', PETER).json
    jsonschema.validate(created, schema(document, 'Person'))
    page = client.get('/resources/data/?limit=1').json
    jsonschema.validate(page, schema(document, 'Page'))


def test_problem_responses_match_the_document(client, document):
    problem = client.post_json('/resources/data/', {'age': 'x'}, status=422).json
    jsonschema.validate(problem, schema(document, 'Problem'))


@pytest.mark.parametrize('body', [
    PETER, {**PETER, 'age': True}, {**PETER, 'age': 151}, {**PETER, 'name': ''}, {**PETER, 'name': 'x' * 201},
    {**PETER, 'locale': 'l' * 65}, {**PETER, 'id': 3}, {'name': 'peter'}, {**PETER, 'name': 'a\u0000b'},
    [PETER], [PETER, {**PETER, 'age': 151}], [], [PETER] * 501, [PETER, 'peter'], 'peter',
])
def test_document_and_app_agree_on_which_bodies_are_valid(client, document, body):
    create = document['paths']['/resources/data/']['post']['requestBody']['content']['application/json']['schema']
    document_says_valid = jsonschema.Draft202012Validator(create).is_valid(body)
    response = client.post_json('/resources/data/', body, status='*')
    assert (response.status_int == 201) == document_says_valid, response.json


def test_documented_errors_cover_the_body_errors(document):
    for path, method in [('/resources/data/', 'put'), ('/resources/data/', 'post'), ('/resources/data/{id}', 'put'),
                         ('/resources/data/{id}', 'patch')]:
        assert {'400', '413', '415', '422'} <= set(document['paths'][path][method]['responses'])
