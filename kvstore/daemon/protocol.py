"""The store daemon's wire protocol (version 1), shared by the daemon and its client.

Transport: ZeroMQ, the daemon binds a ROUTER socket and clients connect
DEALER sockets. One request is one multipart message:

    [header, payload_0, payload_1, ...]

and its reply is one multipart message of the same shape. The header is a
msgpack map (`Request` / `Reply` below); payloads are raw bytes, never
encoded, so they travel zero-copy on both sides. Objects are opaque to the
daemon: the client encodes and verifies them (kvstore.block_format), so a
damaged or foreign object is the client's miss, never a wrong answer.

Ops, each batched over `keys`:
  exists  -> found[i]                       (no payload)
  get     -> parts[i] payload frames per key, 0 for a miss; the frames follow
             in key order
  put     -> request carries parts[i] payload frames per key (the object is
             their concatenation); reply stored[i] (False: already held,
             refused: see `refused`)
  delete  -> nothing but ok
  stats   -> stats (a map of counters and usage)
  health  -> ok
See docs/store-protocol.md for the full description, limits and errors.
"""
from __future__ import annotations

import re

import msgspec

VERSION = 1
OPS = ("exists", "get", "put", "delete", "stats", "health")

# Error codes in Reply.code.
BAD_REQUEST = "bad_request"  # malformed header, wrong counts, a key out of bounds
BAD_VERSION = "bad_version"
UNAUTHORIZED = "unauthorized"
TOO_LARGE = "too_large"  # a request past the daemon's limits
INTERNAL = "internal"

# Why a put of one key was refused (Reply.refused[i]; "" when stored or held).
NO_ROOM = "no_room"  # everything evictable was leased or pinned
QUOTA = "quota"  # the namespace's quota cannot hold it
OBJECT_TOO_LARGE = "object_too_large"

MAX_KEY_BYTES = 512
# The names kvstore.keys.make_key makes: safe segments joined by "/". Keys name
# files under the daemon's fs root, so nothing else (no "..", no leading dot
# or slash) is accepted.
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


class Request(msgspec.Struct, omit_defaults=True):
    v: int
    id: int
    op: str
    token: str = ""
    keys: list[str] = []
    parts: list[int] = []  # put: payload frames per key


class Reply(msgspec.Struct, omit_defaults=True):
    v: int
    id: int
    ok: bool = True
    code: str = ""
    error: str = ""
    found: list[bool] = []  # exists
    parts: list[int] = []  # get: payload frames per key (0: miss)
    stored: list[bool] = []  # put
    refused: list[str] = []  # put: per key, "" or why it was refused
    stats: dict = {}


_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode(message: Request | Reply) -> bytes:
    return _encoder.encode(message)


def decode_request(header, max_header_bytes: int) -> Request:
    """A validated request header; ProtocolError says what is wrong with it."""
    if len(header) > max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"header of {len(header)} bytes, limit {max_header_bytes}")
    try:
        request = _request_decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ProtocolError(BAD_REQUEST, f"malformed header: {error}") from None
    if request.v != VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {request.v}; this daemon speaks {VERSION}")
    if request.op not in OPS:
        raise ProtocolError(BAD_REQUEST, f"unknown op {request.op!r}; ops: {', '.join(OPS)}")
    for key in request.keys:
        if len(key) > MAX_KEY_BYTES or not _KEY.fullmatch(key):
            raise ProtocolError(BAD_REQUEST, f"a key is 1 to {MAX_KEY_BYTES} characters of [A-Za-z0-9._-] "
                                "in segments split by '/', none starting with '.'")
    return request


def decode_reply(header) -> Reply:
    try:
        return _reply_decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ProtocolError(BAD_REQUEST, f"malformed reply: {error}") from None


def namespace_of(key: str) -> str:
    """The tenant a key belongs to: its first segment (kvstore.keys.make_key)."""
    return key.split("/", 1)[0]
