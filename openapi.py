"""GET /openapi.json: the OpenAPI 3.1 description of the service, built from the same field,
filter and paging rules that the resources enforce (tests/test_openapi.py checks it against the app);
GET /docs: the same for people, Swagger UI served from a pinned package's files (no CDN)."""
import hashlib

import falcon
import orjson
from openapi_ui_bundles.swagger_ui import static_path

from models import FIELDS
from resources import FORM, JSON_TYPES, LIST_PARAMS, MAX_BATCH, MAX_BODY, PREFIX

VERSION = '1.0.0'  # of the API; /metrics publishes it too (people_build_info)
DOCS = '/docs'
ASSET_TYPES = {'css': 'text/css; charset=utf-8', 'js': 'text/javascript; charset=utf-8'}
VENDORED = ('swagger-ui.css', 'swagger-ui-bundle.js')  # of the package's files, all the page loads
# Relative links, so that the page works under any prefix a proxy mounts it at. No inline script or
# style: the page works under nginx's CSP for it, which allows files from this origin only.
PAGE = (b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>People API</title><link rel="stylesheet"'
        b' href="docs/swagger-ui.css"></head><body><div id="swagger-ui"></div><script src="docs/swagger-ui-bundle.js">'
        b'</script><script src="docs/start.js"></script></body></html>\n')
START = b"SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui'});\n"
STRING = {'type': 'string'}


def ref(name):
    return {'$ref': f'#/components/schemas/{name}'}


def problem(description):
    return {'description': description, 'content': {'application/problem+json': {'schema': ref('Problem')}}}


def person_response(description, etag=True):
    answer = {'description': description, 'content': {'application/json': {'schema': ref('Person')}}}
    return {**answer, 'headers': {'ETag': {'schema': STRING}}} if etag else answer


def person_body(schema, held='The person'):
    form = {'type': 'object', 'required': ['data'],
            'properties': {'data': {**STRING, 'description': f'{held} as JSON (the original contract).'}}}
    return {'required': True, 'content': {**dict.fromkeys(JSON_TYPES, {'schema': schema}), FORM: {'schema': form}}}


def header(name, **more):
    return {'name': name, 'in': 'header', 'required': False, 'schema': STRING, **more}


def tokenless(summary, responses):  # security.NO_TOKEN: no token needed
    return {'get': {'security': [], 'summary': summary, 'responses': responses}}


AUTH_ERRORS = {'401': problem('No valid, unexpired bearer token (WWW-Authenticate: Bearer).'),
               '403': problem('The token lacks the write scope, or the address is not allowed.')}
BODY_ERRORS = {'400': problem('Malformed JSON, a form without "data", or a body that is not an object.'),
               '413': problem(f'The body is over {MAX_BODY} bytes.'),
               '415': problem('The body is neither JSON nor a form.'),
               '422': problem('Field errors or unknown fields ("errors" names each: #/3/age is the age of the '
                              f'4th person of an array), an array not of 1-{MAX_BATCH} people, or an '
                              'Idempotency-Key reused with a different body.')}
ITEM_ERRORS = {'404': problem('No person has this id.'),
               '412': problem('If-Match names a version that is no longer current.'), **AUTH_ERRORS}
IDEMPOTENCY_KEY = header('Idempotency-Key', schema={**STRING, 'minLength': 1, 'maxLength': 255},
                         description='Retry-safe creates: the same key and body within 24 h answer the first create again.')


def document():
    person_input = {'type': 'object', 'additionalProperties': False, 'properties': FIELDS}
    whole_person = {**person_input, 'required': list(FIELDS)}
    whole = person_body(whole_person)
    create = {'summary': 'Create a person', 'parameters': [IDEMPOTENCY_KEY], 'requestBody': whole,
              'responses': {'201': person_response('Created; Location names the new person.'), **BODY_ERRORS,
                            **AUTH_ERRORS}}
    batch = {'type': 'array', 'minItems': 1, 'maxItems': MAX_BATCH, 'items': whole_person}
    created = {'description': 'Created; a person, or for an array {"items": [...]}: the people in the order sent.',
               'content': {'application/json': {'schema': {'oneOf': [ref('Person'), ref('Created')]}}}}
    bulk = {**create, 'summary': f'Create a person, or 1-{MAX_BATCH} people (an array): all of them or none',
            'requestBody': person_body({'oneOf': [whole_person, batch]}, 'The person (or an array of people)'),
            'responses': {**create['responses'], '201': created}}
    page = {'summary': 'List people by id, a page at a time',
            'parameters': [{'name': name, 'in': 'query', 'required': False, 'schema': rule}
                           for name, rule in LIST_PARAMS.items()],
            'responses': {'200': {'description': 'A page. Follow "next" (and Link rel=next) until null: a filtered '
                                                 'page may be short or empty.',
                                  'content': {'application/json': {'schema': ref('Page')}}},
                          '400': problem('A parameter is unknown, repeated or out of range.'), **AUTH_ERRORS}}
    read = {'summary': 'Read a person', 'parameters': [header('If-None-Match')],
            'responses': {'200': person_response('The person.'), '304': {'description': 'If-None-Match matched.'},
                          '404': ITEM_ERRORS['404'], **AUTH_ERRORS}}
    return {
        'openapi': '3.1.0',
        'info': {'title': 'People', 'version': VERSION},
        'paths': {
            PREFIX: {'get': page, 'head': page, 'put': {**create, 'operationId': 'createPersonPut'},
                     'post': {**bulk, 'operationId': 'createPersonPost'}},
            PREFIX + '{id}': {
                'parameters': [{'name': 'id', 'in': 'path', 'required': True, 'schema': {'type': 'integer', 'minimum': 1}}],
                'get': read, 'head': read,
                'put': {'summary': 'Replace a person', 'parameters': [header('If-Match')], 'requestBody': whole,
                        'responses': {'200': person_response('The replaced person.'), **BODY_ERRORS, **ITEM_ERRORS}},
                'patch': {'summary': 'Change some fields of a person', 'parameters': [header('If-Match')],
                          'requestBody': person_body(person_input),
                          'responses': {'200': person_response('The changed person.'), **BODY_ERRORS, **ITEM_ERRORS}},
                'delete': {'summary': 'Delete a person', 'parameters': [header('If-Match')],
                           'responses': {'200': person_response('The deleted person.', etag=False), **ITEM_ERRORS}},
            },
            '/openapi.json': tokenless('This document', {'200': {'description': 'OpenAPI 3.1'}}),
            DOCS: tokenless('This document as a page (Swagger UI)', {'200': {'description': 'The page.',
                                                                            'content': {'text/html': {}}}}),
            DOCS + '/{asset}': {'parameters': [{'name': 'asset', 'in': 'path', 'required': True,
                                                'schema': {'enum': [*VENDORED, 'start.js']}}],
                                **tokenless('A file the page loads', {'304': {'description': 'If-None-Match matched.'},
                                    '200': {'description': 'The file; ETag, cached for a day.',
                                            'content': dict.fromkeys(ASSET_TYPES.values(), {})},
                                    '404': problem('The page loads no such file.')})},
            '/livez': tokenless('Liveness: the process serves; nothing else is checked', {'200': {'description': 'Alive.'}}),
            '/readyz': tokenless('Readiness: the database answers', {'200': {'description': 'Ready.'},
                                                                     '503': problem('The database does not answer.')}),
            '/metrics': tokenless('Prometheus metrics, summed over all workers', {
                '200': {'description': 'Prometheus text format 0.0.4.', 'content': {'text/plain': {'schema': STRING}}},
                '403': problem('The client is not in METRICS_ALLOW.')}),
        },
        'security': [{'bearer': []}],
        'components': {'securitySchemes': {'bearer': {'type': 'http', 'scheme': 'bearer'}}, 'schemas': {
            'Person': {'type': 'object', 'required': ['id', *FIELDS], 'additionalProperties': False,
                       'properties': {'id': {'type': 'integer', 'minimum': 1}, **FIELDS}},
            'Created': {'type': 'object', 'required': ['items'], 'additionalProperties': False, 'properties': {
                'items': {'type': 'array', 'items': ref('Person')}}},
            'Page': {'type': 'object', 'required': ['items', 'next'], 'properties': {
                'items': {'type': 'array', 'items': ref('Person')}, 'next': {'type': ['string', 'null']}}},
            'Problem': {'type': 'object', 'required': ['type', 'title', 'status'], 'properties': {
                'type': STRING, 'title': STRING, 'status': {'type': 'integer'}, 'detail': STRING,
                'errors': {'type': 'array', 'items': {'type': 'object'}}}},
        }},
    }


class OpenAPI:
    def __init__(self):
        self.body = orjson.dumps(document())  # built once: it depends on nothing per request

    def on_get(self, req, resp):
        resp.data = self.body


class Docs:
    def __init__(self):
        # NOTE: read once (1.6 MB) before the workers fork, so they share it; a name not in this dict
        # is a 404, never a path: no request can reach another file.
        files = {name: (static_path / name).read_bytes() for name in VENDORED}
        self.assets = {name: (body, ASSET_TYPES[name.rpartition('.')[2]], hashlib.sha256(body).hexdigest()[:20])
                       for name, body in {**files, 'start.js': START}.items()}

    def on_get(self, req, resp):
        resp.content_type, resp.data = falcon.MEDIA_HTML, PAGE

    def on_get_asset(self, req, resp, asset):
        if asset not in self.assets:
            raise falcon.HTTPNotFound(description=f'{DOCS} loads {", ".join(sorted(self.assets))}, nothing else.')
        body, content_type, resp.etag = self.assets[asset]
        resp.cache_control = ['max-age=86400']  # instead of the Guard's no-store: these change only with the pin
        if req.get_header('If-None-Match') == resp.etag:
            raise falcon.HTTPStatus(falcon.HTTP_304)  # the headers set so far go with it
        resp.content_type, resp.data = content_type, body
