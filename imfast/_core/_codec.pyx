"""Envelope codec, Cython twin of :mod:`imfast._core.codec_py`.

Same API, results and errors (type, ``code``, ``field``, message) as the
pure-Python module, whose docstring states the guarantees; the parity tests
(``tests/unit/test_core_parity.py``) check it.  What is different is only how:

* the validation table is :data:`codec_py.CLIENT_TYPES` itself, compiled at
  import into per-type tuples of (name, kind number, required) so the hot loop
  switches on a C int instead of comparing kind strings;
* the id / conversation-id regexes are hand-written loops over the string's
  1-byte storage (an id is ASCII, so any wider string is rejected at once);
* WebSocket framing allocates the result once and ``memcpy``s into it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.unicode cimport (
    Py_UNICODE_ISPRINTABLE,
    PyUnicode_1BYTE_DATA,
    PyUnicode_1BYTE_KIND,
    PyUnicode_DATA,
    PyUnicode_GET_LENGTH,
    PyUnicode_KIND,
    PyUnicode_READ,
)
from libc.string cimport memcmp, memcpy

import orjson

from imfast._core import codec_py
from imfast.protocol.codes import ProtocolError

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const Py_ssize_t PY_SSIZE_T_MAX

__all__ = [
    "CLIENT_TYPES",
    "decode_client_frame",
    "encode",
    "ws_text_frame",
    "ws_frames",
]

# One table for both twins: the limits and the frame table are read from the
# Python module, so changing them there changes both.
CLIENT_TYPES = codec_py.CLIENT_TYPES
_ROLES = codec_py._ROLES
cdef long long MAX_SEQ = codec_py._MAX_SEQ
cdef Py_ssize_t MAX_TOKEN = codec_py._MAX_TOKEN
cdef Py_ssize_t MAX_CMID = codec_py._MAX_CMID
cdef Py_ssize_t MAX_LIST = codec_py._MAX_LIST
cdef Py_ssize_t MAX_TEXT = codec_py._MAX_TEXT
cdef Py_ssize_t MAX_ID = 64  # the {1,64} of codec_py._ID / _CONV

_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError

# Field kinds as C ints (codec_py._check compares strings instead).
cdef enum:
    K_ID, K_CONV, K_SEQ, K_LIMIT, K_CMID, K_TOKEN, K_BODY, K_TEXT, K_IDS, K_ROLE, K_BOOL

_KINDS = {"id": K_ID, "conv": K_CONV, "seq": K_SEQ, "limit": K_LIMIT, "cmid": K_CMID,
          "token": K_TOKEN, "body": K_BODY, "text": K_TEXT, "ids": K_IDS, "role": K_ROLE,
          "bool": K_BOOL}


cdef dict _compile(dict table):
    cdef dict specs = {}
    for ftype, fields in table.items():
        compiled = []
        for name, (kind, required) in fields.items():
            if kind not in _KINDS:
                # ImportError, so the loader falls back to the twin (and
                # test_expected_core_loaded says why) instead of failing to start.
                raise ImportError(f"imfast._core._codec does not know the field kind {kind!r} "
                                  f"of {ftype}.{name}: update _codec.pyx and rebuild")
            compiled.append((name, _KINDS[kind], bool(required)))
        specs[ftype] = tuple(compiled)
    return specs


cdef dict _SPECS = _compile(CLIENT_TYPES)

# [A-Za-z0-9_.@-] as a lookup table.
cdef unsigned char _ID_CHAR[256]


cdef void _init_id_chars() noexcept:
    cdef const unsigned char* chars = (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-")
    cdef int i
    for i in range(256):
        _ID_CHAR[i] = 0
    i = 0
    while chars[i]:
        _ID_CHAR[chars[i]] = 1
        i += 1


_init_id_chars()


cdef inline bint _id_span(const unsigned char* p, Py_ssize_t start, Py_ssize_t end) noexcept:
    """p[start:end] matches [A-Za-z0-9_.@-]{1,64}."""
    cdef Py_ssize_t i
    if end - start < 1 or end - start > MAX_ID:
        return False
    for i in range(start, end):
        if not _ID_CHAR[p[i]]:
            return False
    return True


cdef inline bint _is_id(object value):
    if not isinstance(value, str):
        return False
    if PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND:
        return False  # holds a character > U+00FF: not an id character
    return _id_span(PyUnicode_1BYTE_DATA(value), 0, PyUnicode_GET_LENGTH(value))


cdef int _conv_form(object value):
    """0: not a conversation id; 1: ``g:<id>``; 2: ``p:<a>:<b>`` with a <= b; 3: a > b."""
    cdef Py_ssize_t n, i, colon, la, lb
    cdef const unsigned char* p
    cdef int c
    if not isinstance(value, str) or PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND:
        return 0
    n = PyUnicode_GET_LENGTH(value)
    p = PyUnicode_1BYTE_DATA(value)
    if n < 3 or p[1] != b':':
        return 0
    if p[0] == b'g':
        return 1 if _id_span(p, 2, n) else 0
    if p[0] != b'p':
        return 0
    colon = -1
    for i in range(2, n):
        if p[i] == b':':
            colon = i
            break
    # An id has no ':', so the first one after "p:" is the only valid split.
    if colon < 0 or not _id_span(p, 2, colon) or not _id_span(p, colon + 1, n):
        return 0
    la = colon - 2
    lb = n - colon - 1
    # Code-point order of two Latin-1 strings is their byte order.
    c = memcmp(p + 2, p + colon + 1, <size_t>(la if la < lb else lb))
    if c > 0 or (c == 0 and la > lb):
        return 3
    return 2


cdef inline bint _int_between(object value, long long lo, long long hi):
    """``type(value) is int and lo <= value <= hi`` without a Python comparison."""
    cdef int overflow = 0
    cdef long long v
    if type(value) is not int:
        return False
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    return overflow == 0 and lo <= v <= hi  # lo >= 0 and hi < 2**63 for every caller


cdef bint _printable(object value):
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void* data = PyUnicode_DATA(value)
    for i in range(n):
        if not Py_UNICODE_ISPRINTABLE(PyUnicode_READ(kind, data, i)):
            return False
    return True


cdef Py_ssize_t _utf8_len(object value):
    """len(value.encode("utf-8", "surrogatepass")) without encoding."""
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(value), total
    cdef int kind
    cdef void* data
    cdef Py_UCS4 ch
    if PyUnicode_IS_ASCII(value):
        return n
    kind = PyUnicode_KIND(value)
    data = PyUnicode_DATA(value)
    total = n
    for i in range(n):
        ch = PyUnicode_READ(kind, data, i)
        if ch >= 0x80:
            total += 1 if ch < 0x800 else (2 if ch < 0x10000 else 3)
    return total


cdef int _check(int kind, str name, object value, object max_body, Py_ssize_t max_body_c,
                bint max_body_fast) except -1:
    cdef Py_ssize_t n
    cdef int form
    if kind == K_ID:
        if not _is_id(value):
            raise ProtocolError(f"`{name}` must be an id of 1-64 characters [A-Za-z0-9_.@-]",
                                field=name)
    elif kind == K_CONV:
        form = _conv_form(value)
        if form == 0:
            raise ProtocolError(f"`{name}` must be a conversation id (p:<a>:<b> or g:<group>)",
                                field=name)
        if form == 3:
            raise ProtocolError(f"`{name}`: private conversation ids list users sorted",
                                field=name)
    elif kind == K_SEQ:
        if not _int_between(value, 0, MAX_SEQ):
            raise ProtocolError(f"`{name}` must be a whole number >= 0", field=name)
    elif kind == K_LIMIT:
        if not _int_between(value, 1, MAX_SEQ):
            raise ProtocolError(f"`{name}` must be a whole number >= 1", field=name)
    elif kind == K_CMID:
        if (not isinstance(value, str) or not 1 <= PyUnicode_GET_LENGTH(value) <= MAX_CMID
                or not _printable(value)):
            raise ProtocolError(f"`{name}` must be a printable string of 1-{MAX_CMID} characters",
                                field=name)
    elif kind == K_TOKEN:
        if not isinstance(value, str) or not 1 <= PyUnicode_GET_LENGTH(value) <= MAX_TOKEN:
            raise ProtocolError(f"`{name}` must be a token string", field=name)
    elif kind == K_BODY:
        if not isinstance(value, str):
            raise ProtocolError(f"`{name}` must be a string", field=name)
        if max_body_fast:
            n = PyUnicode_GET_LENGTH(value)
            if n > max_body_c or _utf8_len(value) > max_body_c:
                raise ProtocolError(f"`{name}` is too large (max {max_body} bytes)",
                                    field=name, code="too_large")
        elif len(value) > max_body or len(value.encode("utf-8", "surrogatepass")) > max_body:
            # max_body is not a plain int in C range: compare exactly as the twin does.
            raise ProtocolError(f"`{name}` is too large (max {max_body} bytes)",
                                field=name, code="too_large")
    elif kind == K_TEXT:
        if not isinstance(value, str) or PyUnicode_GET_LENGTH(value) > MAX_TEXT:
            raise ProtocolError(f"`{name}` must be a string of at most {MAX_TEXT} characters",
                                field=name)
    elif kind == K_IDS:
        if not isinstance(value, list) or len(<list>value) > MAX_LIST:
            raise ProtocolError(f"`{name}` must be a list of at most {MAX_LIST} ids", field=name)
        for item in <list>value:
            if not _is_id(item):
                raise ProtocolError(f"`{name}` must contain only ids", field=name)
    elif kind == K_ROLE:
        if value not in _ROLES:
            raise ProtocolError(f"`{name}` must be one of {', '.join(_ROLES)}", field=name)
    elif kind == K_BOOL:
        if value is not True and value is not False:
            raise ProtocolError(f"`{name}` must be true or false", field=name)
    return 0


def decode_client_frame(data, max_body):
    """Parse and validate one client frame (see :mod:`imfast._core.codec_py`)."""
    cdef dict obj
    cdef tuple spec
    cdef tuple field
    cdef str name
    cdef Py_ssize_t max_body_c = 0
    cdef bint max_body_fast = False
    cdef int overflow = 0
    cdef long long mb
    try:
        parsed = _loads(data)
    except _JSONDecodeError as exc:
        # orjson says where and why ("depth limit exceeded: line 1 column 1026").
        raise ProtocolError(f"frame is not valid JSON: {exc}", code="bad_json") from None
    if type(parsed) is not dict:
        raise ProtocolError("frame must be a JSON object", code="bad_json")
    obj = <dict>parsed
    ftype = obj.get("type")
    if type(ftype) is not str:
        raise ProtocolError("`type` is required and must be a string", field="type")
    found = _SPECS.get(ftype)
    if found is None:
        raise ProtocolError(f"unknown frame type {ftype[:32]!r}", field="type",
                            code="unknown_type")
    spec = <tuple>found
    rid = obj.get("id")
    if rid is not None and not (
        (type(rid) is str and PyUnicode_GET_LENGTH(rid) <= 64) or _int_between(rid, 0, MAX_SEQ)
    ):
        obj.pop("id")
        raise ProtocolError("`id` must be a string of at most 64 characters or an integer",
                            field="id")
    if type(max_body) is int:
        mb = PyLong_AsLongLongAndOverflow(max_body, &overflow)
        if overflow == 0 and 0 <= mb <= PY_SSIZE_T_MAX:
            max_body_c = <Py_ssize_t>mb
            max_body_fast = True
    for field in spec:
        name = <str>field[0]
        value = obj.get(name)
        if value is None:
            if <bint>field[2]:
                raise ProtocolError(f"`{name}` is required for {ftype}", field=name)
            continue
        _check(<int>field[1], name, value, max_body, max_body_c, max_body_fast)
    if ftype == "send" and ((obj.get("to") is None) == (obj.get("group") is None)):
        raise ProtocolError("send needs exactly one of `to` (user) or `group`", field="to")
    return obj


def encode(obj):
    """Serialise a server frame to JSON bytes."""
    return _dumps(obj)


# ------------------------------------------------------------------ framing
cdef Py_ssize_t ws_header_size(Py_ssize_t n) noexcept nogil:
    if n < 126:
        return 2
    if n < 65536:
        return 4
    return 10


cdef Py_ssize_t ws_write_header(unsigned char* out, Py_ssize_t n) noexcept nogil:
    """Write the header of a final, unmasked text frame of n bytes; returns its size."""
    cdef int i
    out[0] = 0x81
    if n < 126:
        out[1] = <unsigned char>n
        return 2
    if n < 65536:
        out[1] = 126
        out[2] = <unsigned char>(n >> 8)
        out[3] = <unsigned char>(n & 0xFF)
        return 4
    out[1] = 127
    for i in range(8):
        out[2 + i] = <unsigned char>((<unsigned long long>n >> (8 * (7 - i))) & 0xFF)
    return 10


cdef bytes ws_frame_from(const unsigned char* data, Py_ssize_t n):
    cdef Py_ssize_t h = ws_header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    ws_write_header(p, n)
    if n:
        memcpy(p + h, data, <size_t>n)
    return out


cpdef bytes ws_text_frame(object payload):
    """One final, unmasked WebSocket text frame carrying ``payload``."""
    cdef Py_buffer view
    if PyBytes_Check(payload):
        return ws_frame_from(<const unsigned char*>PyBytes_AS_STRING(payload),
                             PyBytes_GET_SIZE(payload))
    # Any other bytes-like object (bytearray, memoryview): TypeError otherwise.
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        return ws_frame_from(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cpdef bytes ws_frames(object payloads):
    """Several text frames back to back, ready for a single write."""
    cdef Py_ssize_t i, count, n, total = 0
    cdef PyObject* item
    cdef bytes out
    cdef unsigned char* p
    seq = PySequence_Fast(payloads, "payloads must be iterable")
    count = PySequence_Fast_GET_SIZE(seq)
    for i in range(count):
        item = PySequence_Fast_GET_ITEM(seq, i)
        if not PyBytes_Check(<object>item):
            # Rare: other bytes-like objects go through ws_text_frame.
            return b"".join([ws_text_frame(x) for x in seq])
        n = PyBytes_GET_SIZE(<object>item)
        total += ws_header_size(n) + n
    # One allocation for the whole batch: that is the point of this function.
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(count):
        item = PySequence_Fast_GET_ITEM(seq, i)
        n = PyBytes_GET_SIZE(<object>item)
        p += ws_write_header(p, n)
        if n:
            memcpy(p, PyBytes_AS_STRING(<object>item), <size_t>n)
            p += n
    return out
