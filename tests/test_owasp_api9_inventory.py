"""OWASP API9, improper inventory management: the OpenAPI document lists every route the router
serves and nothing else, with the same methods."""
from falcon.inspect import inspect_app


def test_document_is_the_inventory(app, client):
    document = client.get('/openapi.json').json
    served = {route.path: {m.method.lower() for m in route.methods if not m.internal}
              for route in inspect_app(app).routes}
    documented = {path: set(item) - {'parameters'} for path, item in document['paths'].items()}
    assert documented == served


def test_document_declares_bearer_auth(client):
    document = client.get('/openapi.json').json
    assert document['components']['securitySchemes']['bearer'] == {'type': 'http', 'scheme': 'bearer'}
    assert document['security'] == [{'bearer': []}]
    for path in ('/livez', '/readyz', '/openapi.json', '/metrics'):
        assert document['paths'][path]['get']['security'] == []
