"""Who may call: bearer tokens with scopes, source-address allow-lists, and the headers every
response carries. Deny by default: authentication is on unless PEOPLE_AUTH=off."""
import ipaddress
import time

import falcon

import models

OPEN = {'/livez', '/readyz'}  # probes: no token, no allow-list
NO_TOKEN = OPEN | {'/openapi.json', '/docs', '/metrics'}  # /metrics has METRICS_ALLOW instead; /docs/* too
READ_METHODS = {'GET', 'HEAD'}
CACHE_SECONDS = 10  # how long a worker trusts what it read of a token: the revocation delay
LOOPBACK = '127.0.0.0/8,::1'  # what METRICS_ALLOW is by default, and where PEOPLE_AUTH=off may serve
MAX_HOPS = 8  # X-Forwarded-For hops looked at, nearest first: more proxies than this in front is no deployment
EVERY_RESPONSE = {'x-content-type-options': 'nosniff', 'cache-control': 'no-store'}  # lower case, as Falcon keeps names
CACHE_SIZE = 10_000  # entries in each of the Guard's caches: a flood of made-up values clears it


def networks(text):
    return [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in text.split(',') if cidr.strip()]


def address(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None  # not an address at all: in no network, so never allowed


def is_in(text, nets):
    ip = address(text)
    return ip is not None and any(ip in net for net in nets)


class Guard:
    """Middleware: the headers every response carries, errors included; then the client's address,
    the allow-list, the token and its scope, in that order."""

    def __init__(self, auth, allow, trusted_proxies, lookup=None):  # lookup: People.find_token, with auth
        self.auth, self.allow, self.trusted, self.lookup = auth, allow, trusted_proxies, lookup
        self.known = {}  # (peer, X-Forwarded-For, Authorization) -> what they mean: see identify()
        self.tokens = {}  # Authorization -> what the database said of its token: see token()

    def process_request(self, req, resp):
        # Set first, so that every response carries them, errors included (Falcon keeps the headers
        # set before an error); set here, the Guard needs no process_response hook at all.
        # NOTE: the hot path of every request, so it is written for few bytecodes: headers go into Falcon's
        # dict at once (as Falcon does itself; set_header() costs ~1,200 instructions a header), and what a
        # request's address and token mean is one look-up in a cache, identify() called only when it misses
        # or is stale (bench/instructions.py, docs/performance.md).
        resp._headers.update(EVERY_RESPONSE)
        env, context, path = req.env, req.context, req.path
        # A path that needs no token never looks one up: a probe must not fail with the database.
        needs_token = self.auth and not (path in NO_TOKEN or path.startswith('/docs/') or req.method == 'OPTIONS')
        # X-Forwarded-For counts only when proxies are trusted: else it is no part of the answer, or the key.
        key = (env.get('REMOTE_ADDR') or '127.0.0.1', env.get('HTTP_X_FORWARDED_FOR') if self.trusted else None,
               env.get('HTTP_AUTHORIZATION') if needs_token else None)
        known = self.known.get(key)
        if known is None or 0 < known[5] <= time.time():  # time is read only when a token was looked up
            known = self.identify(*key)
        context.client, is_allowed, scope, context.caller, context.token, _ = known
        if path in OPEN:
            return
        if not is_allowed:
            raise falcon.HTTPForbidden(description='This address may not call the service.')
        if not needs_token:  # CORS preflights carry no token; nor does what /docs loads
            return
        if scope is None:
            raise falcon.HTTPUnauthorized(
                description='Send a valid, unexpired token: Authorization: Bearer <token>.',
                challenges=['Bearer realm="people"'])
        if scope != 'write' and req.method not in READ_METHODS:
            raise falcon.HTTPForbidden(description=f'A {scope} token may not {req.method}; this needs a write token.')

    def identify(self, peer, forwarded, authorization):
        """(the client's address, whether the allow-list admits it, the scope of the bearer token or None,
        the caller, the token's name, until when this holds: 0 for ever, when no token was looked up), worked
        out once, and again every CACHE_SECONDS for a token (so that a revocation is seen).
        The caller owns Idempotency-Keys: the token's identity (its secret's SHA-256), else the address, or
        behind a trusted proxy the whole header (two clients whose hops are no address must not share keys)."""
        # NOTE: parsing an address costs ~6 us (two or three a request behind nginx, more than the rest of a
        # read), so it is worked out once for each peer, header and token that come together.
        now = time.time()
        known = self.known.get((peer, forwarded, authorization))
        if known is not None and not 0 < known[5] <= now:
            return known
        client, is_allowed = self.client(peer, forwarded)
        scope, caller, name, until = None, forwarded or client, None, 0
        if authorization and is_allowed:  # a refused address never reaches the database
            scope, secret_hash, name, until = self.token(authorization, now)
            caller = secret_hash or caller
        known = (client, is_allowed, scope, caller, name, until)
        # Longer headers than any real token or proxy chain are worked out each time: the cache stays ~10 MB.
        if len(forwarded or '') <= 256 and len(authorization or '') <= 256:
            remember(self.known, (peer, forwarded, authorization), known)
        return known

    def token(self, authorization, now):
        """(the scope of the bearer token or None, its identity: its secret's SHA-256, its name, until when
        this holds), looked up in the database at most once per CACHE_SECONDS, whatever address sends it."""
        # NOTE: cached by the header itself, so a SHA-256 (~0.5 us) is made once. A dict compares two keys only
        # when their hashes, keyed at random at start, are equal: a guessed token never meets a secret here, nor
        # in the database, which is searched by the hash.
        cached = self.tokens.get(authorization)
        if cached is None or cached[3] <= now:
            cached = (None, None, None, now + CACHE_SECONDS)
            if len(authorization) <= 256 and authorization[:7].lower() == 'bearer ':  # no token is longer
                secret_hash = models.hash_secret(authorization[7:].strip())
                found = self.lookup(secret_hash)  # (scope, expires_at, name): trusted until the sooner end
                if found and found[1] > now:
                    cached = (found[0], secret_hash, found[2], min(now + CACHE_SECONDS, found[1]))
                remember(self.tokens, authorization, cached)
        return cached

    def client(self, peer, forwarded):
        """(the client's address, whether the allow-list admits it). The client is the peer, or the
        nearest untrusted address in X-Forwarded-For when the peer is a trusted proxy (nginx on
        loopback; bjoern reports a unix-socket peer as 0.0.0.0)."""
        client = peer
        if forwarded and is_in(peer, self.trusted):
            # From the nearest hop back, while each is a trusted proxy: the first untrusted one is the client.
            # Only the last MAX_HOPS count, and a hop that is no address is 'unknown', in no network: a
            # client may write anything there, which must reach neither the log nor the allow-list.
            for hop in reversed(forwarded.split(',')[-MAX_HOPS:]):
                client = hop.strip() if address(hop.strip()) is not None else 'unknown'
                if not is_in(client, self.trusted):
                    break
        return client, not self.allow or is_in(client, self.allow)


def remember(cache, key, value):
    if len(cache) >= CACHE_SIZE:  # a flood of made-up tokens or addresses must not grow memory
        cache.clear()
    cache[key] = value
