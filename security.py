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
CACHE_SIZE = 10_000  # entries in each cache (tokens, addresses): a flood of made-up values clears it


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
        self.tokens, self.clients = {}, {}  # what each worker has already worked out (see remember)

    def client(self, peer, forwarded):
        """(the client's address, whether the allow-list admits it). The client is the peer, or the
        nearest untrusted address in X-Forwarded-For when the peer is a trusted proxy (nginx on
        loopback; bjoern reports a unix-socket peer as 0.0.0.0)."""
        # NOTE: parsing an address costs ~6 us (two or three a request behind nginx, more than the
        # rest of a read), so each distinct peer and header is worked out once (process_request reads the cache).
        known = self.clients.get((peer, forwarded))
        if known is None:
            client = peer
            if forwarded and is_in(peer, self.trusted):
                # From the nearest hop back, while each is a trusted proxy: the first untrusted one is the client.
                # Only the last MAX_HOPS count, and a hop that is no address is 'unknown', in no network: a
                # client may write anything there, which must reach neither the log nor the allow-list.
                for hop in reversed(forwarded.split(',')[-MAX_HOPS:]):
                    client = hop.strip() if address(hop.strip()) is not None else 'unknown'
                    if not is_in(client, self.trusted):
                        break
            known = (client, not self.allow or is_in(client, self.allow))
            if len(forwarded or '') <= 256:  # longer ones are worked out each time: the cache stays < 4 MB
                remember(self.clients, (peer, forwarded), known)
        return known

    def process_request(self, req, resp):
        # Set first, so that every response carries them, errors included (Falcon keeps the headers
        # set before an error); set here, the Guard needs no process_response hook at all.
        # NOTE: the hot path of every request, so it is written for few bytecodes: headers go into Falcon's
        # dict at once (as Falcon does itself; set_header() costs ~1,200 instructions a header), and the
        # caches of client() and scope() are read here, their methods called only when an entry is missing
        # or stale (a call costs ~1,000 instructions: bench/instructions.py, docs/performance.md).
        resp._headers.update(EVERY_RESPONSE)
        env, context = req.env, req.context
        # The header counts only when proxies are trusted: else it is no part of the answer, or the key.
        forwarded = env.get('HTTP_X_FORWARDED_FOR') if self.trusted else None
        peer = env.get('REMOTE_ADDR') or '127.0.0.1'  # what req.remote_addr gives
        context.client, is_allowed = self.clients.get((peer, forwarded)) or self.client(peer, forwarded)
        # Who owns an Idempotency-Key: the token (below), else the address, or, behind a trusted proxy, the
        # whole header: two clients whose hops are no address ('unknown') must not share keys.
        context.caller = forwarded or context.client
        if req.path in OPEN:
            return
        if not is_allowed:
            raise falcon.HTTPForbidden(description='This address may not call the service.')
        # CORS preflights carry no token; nor does what /docs loads, no more than the document it shows
        if not self.auth or req.path in NO_TOKEN or req.path.startswith('/docs/') or req.method == 'OPTIONS':
            return
        authorization = env.get('HTTP_AUTHORIZATION')
        token = self.tokens.get(authorization)  # (scope, until, caller, name): see scope()
        scope, context.caller, context.token = (token[0], token[2], token[3]) if token and time.time() < token[1] \
            else self.scope(authorization)
        if scope is None:
            raise falcon.HTTPUnauthorized(
                description='Send a valid, unexpired token: Authorization: Bearer <token>.',
                challenges=['Bearer realm="people"'])
        if scope != 'write' and req.method not in READ_METHODS:
            raise falcon.HTTPForbidden(description=f'A {scope} token may not {req.method}; this needs a write token.')

    def scope(self, authorization):
        """(the scope of the bearer token, or None; its identity: its secret's SHA-256; its name), each answer
        cached for CACHE_SECONDS. The database is searched by that hash, so no comparison there ever meets a secret."""
        # NOTE: the cache is keyed by the header itself: a SHA-256 costs ~0.5 us a request. A dict compares
        # two keys only when their hashes, keyed at random at start, are equal: a guess never meets a secret.
        if not authorization or len(authorization) > 256:  # no token is that long: the cache stays < 4 MB
            return None, None, None
        now = time.time()
        cached = self.tokens.get(authorization)
        if cached is None or now >= cached[1]:
            cached = (None, now + CACHE_SECONDS, None, None)
            if authorization[:7].lower() == 'bearer ':
                secret_hash = models.hash_secret(authorization[7:].strip())
                found = self.lookup(secret_hash)  # (scope, expires_at, name): trusted until the sooner end
                if found and found[1] > now:
                    cached = (found[0], min(now + CACHE_SECONDS, found[1]), secret_hash, found[2])
            remember(self.tokens, authorization, cached)
        return cached[0], cached[2], cached[3]


def remember(cache, key, value):
    if len(cache) >= CACHE_SIZE:  # a flood of made-up tokens or addresses must not grow memory
        cache.clear()
    cache[key] = value
