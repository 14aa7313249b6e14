"""HTTP in, HTTP out: the people resources, request bodies and parameters, and the one place
where every error becomes an RFC 9457 application/problem+json response."""
import traceback
from urllib.parse import parse_qs, urlencode

import falcon
import orjson
import peewee
from falcon.uri import parse_query_string

from models import FILTERS, MAX_ID, KeyReused, Person, StaleVersion, ValidationError, field_problem, validate

PREFIX = '/resources/data/'
CREATED = ('people_created',)  # the metric of people created, apart from the requests that did
MAX_BATCH = 500  # the most people one bulk create holds
MAX_BODY = 1024 * 1024  # MAX_BATCH people of any valid values fit, in UTF-8
FORM = 'application/x-www-form-urlencoded'
JSON_TYPES = ('application/json', 'application/merge-patch+json')
NO_ROUTE = f'No such route: people are at {PREFIX} and {PREFIX}{{id}}; GET /openapi.json lists every route.'
# Paging parameters of the list, in the same JSON Schema terms as models.FILTERS.
PAGING = {
    'after': {'type': 'integer', 'minimum': 0, 'maximum': MAX_ID, 'default': 0},
    'limit': {'type': 'integer', 'minimum': 1, 'maximum': 500, 'default': 50},
}
LIST_PARAMS = {**PAGING, **{name: rule for name, (rule, *_) in FILTERS.items()}}


class Collection:
    """/resources/data/: list people, and create one (PUT is the original contract; POST too), or many at once."""

    def __init__(self, people, counts):
        self.people, self.counts = people, counts

    def on_get(self, req, resp):
        params = list_params(req)
        items, after = self.people.find_page(**params)
        # NOTE: `next` may follow a short or even empty page: a filtered page examines a bounded number of rows.
        next_url = None if after is None else PREFIX + '?' + urlencode({**params, 'after': after})
        if next_url:
            resp.append_link(next_url, 'next')
        resp.data = orjson.dumps({'items': items, 'next': next_url})

    def on_put(self, req, resp):
        self.create_one(req, resp, read_person(req))

    def create_one(self, req, resp, body):
        person, is_new = self.people.create(validate(body), idempotency_key(req), req.context.caller)
        self.counts.add(CREATED, is_new)
        resp.status = falcon.HTTP_201
        resp.location = PREFIX + str(person['id'])
        send(resp, person, 1)

    def on_post(self, req, resp):
        body = read_person(req, (dict, list))
        if isinstance(body, dict):
            return self.create_one(req, resp, body)
        # An array is a bulk create: all of its people in one statement, or none.
        people, is_new = self.people.create(validate_many(body), idempotency_key(req), req.context.caller)
        self.counts.add(CREATED, len(people) * is_new)
        resp.status = falcon.HTTP_201
        resp.data = orjson.dumps({'items': people})

    on_head = on_get


class Item:
    """/resources/data/{id}: read, replace, change or delete one person, with ETag preconditions."""

    def __init__(self, people):
        self.people = people

    def on_get(self, req, resp, id):
        found = self.people.find(person_id(id))
        if found is None:
            raise falcon.HTTPNotFound(description='No person has this id.')
        person, version = found
        # NOTE: the raw header is checked first because parsing If-None-Match costs the hot path.
        tags = req.if_none_match if 'HTTP_IF_NONE_MATCH' in req.env else None  # None too when it is empty
        if tags and (is_wildcard(tags) or str(version) in tags):
            resp.status = falcon.HTTP_304
            resp.set_header('ETag', f'"{version}"')
            return
        send(resp, person, version)

    def on_put(self, req, resp, id):
        send(resp, *self.people.update(person_id(id), validate(read_person(req)), if_match(req)))

    def on_patch(self, req, resp, id):
        send(resp, *self.people.update(person_id(id), validate(read_person(req), partial=True), if_match(req)))

    def on_delete(self, req, resp, id):
        person, _ = self.people.delete(person_id(id), if_match(req))
        resp.data = orjson.dumps(person)

    on_head = on_get


def send(resp, person, version):
    resp._headers['etag'] = f'"{version}"'  # what `resp.etag = ...` sends, for a fraction of its cost
    resp.data = orjson.dumps(person)


def person_id(text):
    """The id a URL names, or 404: only the canonical decimal form of 1 to MAX_ID names a person,
    so '00001', '0', '-1' and ids too large for the database are unknown, never a 500."""
    if text.isdigit() and text.isascii() and text[0] != '0' and len(text) <= 19 and int(text) <= MAX_ID:
        return int(text)
    raise falcon.HTTPNotFound(description='No person has this id.')


def idempotency_key(req):
    """The Idempotency-Key of a create, or None; 400 when it is not 1-255 visible ASCII characters."""
    key = req.env.get('HTTP_IDEMPOTENCY_KEY')
    if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable() and ' ' not in key):
        raise falcon.HTTPBadRequest(description='Idempotency-Key must be 1-255 visible ASCII characters.')
    return key


def if_match(req):
    """The If-Match guard for a write: None (no header), or a test of the stored version."""
    tags = req.if_match
    if tags is None:
        # Falcon reads a present but empty list (`If-Match: ,`) as None too: it names no current
        # version, so it fails (RFC 9110 13.1.1) instead of turning the check off.
        return None if 'HTTP_IF_MATCH' not in req.env else lambda version: False
    if is_wildcard(tags):
        return lambda version: True
    strong = {str(tag) for tag in tags if not tag.is_weak}  # If-Match compares strongly (RFC 9110 13.1.1)
    return lambda version: str(version) in strong


def is_wildcard(tags):
    """Whether Falcon's parsed If-Match or If-None-Match is the bare `*`: it gives that as a plain str, and
    a quoted "*" as an ETag whose value is *, which is a tag like any other and names no version."""
    return not isinstance(tags[0], falcon.ETag)


def list_params(req):
    """The paging and filter parameters of a list request, parsed and checked, or 400."""
    errors = [(name, 'is not a parameter of this list') for name in req.params if name not in LIST_PARAMS]
    params = {name: rule['default'] for name, rule in LIST_PARAMS.items() if 'default' in rule}
    for name, rule in LIST_PARAMS.items():
        raw = req.params.get(name)
        if raw is None:
            continue
        if isinstance(raw, list):
            errors.append((name, 'may be given once'))
            continue
        value = raw
        if rule['type'] == 'integer' and raw.isascii() and raw.isdigit():
            # NOTE: int() refuses over 4,300 digits (ValueError); anything past 20 is out of range anyway.
            value = int(raw) if len(raw) <= 20 else rule['maximum'] + 1
        if problem := field_problem(value, rule):
            errors.append((name, problem))
        params[name] = value
    if errors:
        raise Invalid(falcon.HTTP_400, 'Invalid query parameters',
                      [{'parameter': name, 'detail': detail} for name, detail in errors])
    return params


def validate_many(bodies):
    """Each of 1 to MAX_BATCH `bodies` (a bulk create's) as models.validate() returns it, or ValidationError
    naming every bad field of every person by its place in the body (#/3/age)."""
    if not 1 <= len(bodies) <= MAX_BATCH:
        raise ValidationError([{'pointer': '#', 'detail': f'must hold 1 to {MAX_BATCH} people'}])
    people, errors = [], []
    for index, body in enumerate(bodies):
        try:
            if not isinstance(body, dict):
                raise ValidationError([{'pointer': '#', 'detail': 'must be a JSON object'}])
            people.append(validate(body))
        except ValidationError as error:
            errors += [{**e, 'pointer': f'#/{index}{e["pointer"][1:]}'} for e in error.errors]
    if errors:
        raise ValidationError(errors)
    return people


def read_person(req, kinds=dict):
    """The JSON object (or, given kinds=(dict, list), array) a write carries: a JSON body, or the original
    form field data=<JSON>."""
    media = (req.content_type or '').split(';', 1)[0].strip().lower()
    if media != FORM and media not in JSON_TYPES:
        raise falcon.HTTPUnsupportedMediaType(
            description='Send the person as application/json, or as a form whose "data" field holds it as JSON.')
    raw = read_body(req)
    if not raw:
        raise falcon.HTTPBadRequest(description='The request has no body.')
    if media == FORM:
        try:
            # NOTE: Falcon's form parser costs a tenth of parse_qs's (~0.7 us, not 7); it replaces escaped bytes
            # that are no UTF-8 with U+FFFD, so only a form holding U+FFFD is parsed again, strictly, to tell.
            form = parse_query_string(raw.decode(), keep_blank=True)
            if '\ufffd' in str(form):  # in any field, as parse_qs would refuse the form
                parse_qs(raw.decode(), errors='strict')
        except (UnicodeDecodeError, ValueError):
            raise falcon.HTTPBadRequest(description='The form is not valid UTF-8 form encoding.')
        raw = form.get('data')
        if not isinstance(raw, str):  # a list when repeated
            raise falcon.HTTPBadRequest(description='The form needs one "data" field holding the person as JSON.')
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise falcon.HTTPBadRequest(description='The body is not valid JSON.')
    if not isinstance(body, kinds):
        what = 'object' if kinds is dict else 'object or array'
        raise falcon.HTTPBadRequest(description=f'The body must be a JSON {what}.')
    return body


def read_body(req):
    """The raw body, at most MAX_BODY bytes."""
    # NOTE: bjoern passes a chunked body on de-chunked and marks it with wsgi.input_terminated; Falcon's
    # bounded stream goes by Content-Length, which a chunked body lacks or must not be read by (RFC 9112 6.3).
    chunked = req.env.get('wsgi.input_terminated')
    if req.content_length is None and not chunked:
        if 'chunked' in (req.get_header('Transfer-Encoding') or '').lower():
            raise falcon.HTTPLengthRequired(description='Send the body with a Content-Length.')
        return b''
    # bjoern holds the whole body in memory already: reading one byte past the limit costs nothing
    body = (req.stream if chunked else req.bounded_stream).read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f'A request body may be at most {MAX_BODY} bytes.')
    return body


class Invalid(falcon.HTTPError):
    """An error with RFC 9457 `errors` entries, one per bad field or parameter."""

    def __init__(self, status, title, errors):
        count = f'{len(errors)} problem{"s" * (len(errors) > 1)}'
        super().__init__(status, title=title, description=f'{count}, each named in "errors".')
        self.errors = errors


def serialize_problem(req, resp, error):
    """Every error response, from ours to Falcon's own 404/405/500, as application/problem+json."""
    # With type about:blank, RFC 9457 wants the title to be the status phrase: 'Not Found'.
    title = error.title.split(' ', 1)[1] if error.title[:3].isdigit() else error.title
    detail = error.description or (NO_ROUTE if isinstance(error, falcon.HTTPRouteNotFound) else title)
    problem = {'type': 'about:blank', 'title': title, 'status': error.status_code, 'detail': detail}
    if isinstance(error, Invalid):
        problem['errors'] = error.errors
    resp.data = orjson.dumps(problem)
    resp.content_type = 'application/problem+json'


def add_error_handlers(app, people, log, counts):
    """Turn the model's exceptions into HTTP errors, in one place; log what the client cannot fix."""

    def request_id(req):
        return getattr(req.context, 'request_id', None)

    def invalid(req, resp, ex, params):
        raise Invalid(falcon.HTTP_422, 'Invalid person', ex.errors)

    def answer(error, description):  # a model exception the client caused: an HTTP error, no log
        def handler(req, resp, ex, params):
            raise error(description=description)
        return handler

    def refused(req, resp, ex, params):
        # The database's CHECKs repeat the field rules, so this means a rule the API missed.
        log('error', 'database refused a write', request_id=request_id(req), cause=repr(ex))
        counts.add(('database_errors', 'refused'))
        raise falcon.HTTPUnprocessableEntity(description='The database refused these values.')

    def unavailable(req, resp, ex, params):
        log('error', 'database unavailable', request_id=request_id(req), cause=repr(ex))
        counts.add(('database_errors', 'unavailable'))
        people.discard_connection()
        raise falcon.HTTPServiceUnavailable(description='The database is not answering; try again shortly.',
                                            retry_after=1)

    def unexpected(req, resp, ex, params):  # Falcon's own HTTP errors have a handler of their own
        log('error', 'unhandled exception', request_id=request_id(req), cause=repr(ex),
            traceback=traceback.format_exc())
        raise falcon.HTTPInternalServerError(description='The server failed; the request id is in the log.')

    app.set_error_serializer(serialize_problem)
    app.add_error_handler(Exception, unexpected)
    app.add_error_handler(ValidationError, invalid)
    app.add_error_handler(Person.DoesNotExist, answer(falcon.HTTPNotFound, 'No person has this id.'))
    app.add_error_handler(StaleVersion, answer(falcon.HTTPPreconditionFailed,
                                               'The person has changed since the ETag in If-Match.'))
    app.add_error_handler(KeyReused, answer(falcon.HTTPUnprocessableEntity, 'This Idempotency-Key was used for a '
                                            'different person; use a new key for a new create.'))
    app.add_error_handler((peewee.IntegrityError, peewee.DataError), refused)
    # ProgrammingError: a database that lost its tables (dropped and made again) until init-db runs.
    app.add_error_handler((peewee.OperationalError, peewee.InterfaceError, peewee.ProgrammingError), unavailable)
