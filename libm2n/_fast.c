/* libm2n._fast: the per-message hot path of libm2n in C (optional; see libm2n/fastpath.py).
 *
 * Everything here has a pure-Python twin that stays the reference (libm2n/header.py for the
 * wire format, libm2n/fastpath.py for the rest); tests/m2n/test_m2n_fastpath.py checks that both
 * produce the same bytes, accept the same frames and raise the same errors with the same text.
 *
 *   pack(kind, sender_id, epoch, slot, seq, step, layer, micro_batch, rows, cols, dtype,
 *        payload_bytes, tag, trace_id, span_id) -> bytes            (header.pack_fields)
 *   unpack(data) -> fields                                         (header.unpack_fields)
 *   check(buf, off, sender_id|None, nslots, capacity) -> fields    (unpack + validate of
 *                                                                   buf[off:off+128])
 *   read_headers(fd, hbuf, got, sender_id|None, nslots, capacity)  (recv + check of a batch)
 *   payload(obj) -> (buffer, nbytes, rows, cols, dtype) | None     (as_payload, common cases)
 *   new_header(cls, names, fields) -> Header                       (header.new_header)
 *   shm_send(fd, mem, off, buffer, <the 15 pack fields>) -> None | bytes
 *                                                                  (copy + header + notify)
 *
 * ``fields`` is the 17-tuple in libm2n.header.Header field order. C code never trusts a length:
 * every buffer access is bounds-checked, garbage raises ProtocolError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define HEADER_SIZE 128
#define MAGIC 0x314E324Du
#define VERSION 1
#define MAX_ERROR_BYTES 4096
#define GIL_FREE_COPY 65536 /* copies at least this large run without the GIL */

enum { K_DATA = 1, K_CREDIT, K_ERROR, K_CLOSE, K_HELLO, K_WELCOME };
static const char *const KIND_NAMES[] = {"", "DATA", "CREDIT", "ERROR", "CLOSE", "HELLO",
                                         "WELCOME"};
/* DType code -> itemsize (0: unknown), same table as header.ITEMSIZE */
static const unsigned ITEMSIZE[] = {0, 1, 1, 2, 4, 8, 2, 2, 4, 8, 1};
#define NDTYPES 11

static PyObject *ProtocolError, *VersionMismatch;
static PyObject *ndarray_type; /* numpy.ndarray, set by set_ndarray() (NULL: not handled) */

/* ---- little-endian field access ------------------------------------------------------------ */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "libm2n._fast assumes a little-endian machine (the wire format is little endian)"
#endif
#define LD(T, p, off) ({ T v_; memcpy(&v_, (p) + (off), sizeof(T)); v_; })
#define ST(T, p, off, v) do { T v_ = (T)(v); memcpy((p) + (off), &v_, sizeof(T)); } while (0)

typedef struct {
    uint32_t magic, sender_id, slot, layer, micro_batch, rows, cols, pad;
    uint16_t version, kind, dtype, reserved;
    uint64_t epoch, seq, step, payload_bytes, tag;
} hdr_t;

static void decode(const uint8_t *p, hdr_t *h) {
    h->magic = LD(uint32_t, p, 0);
    h->version = LD(uint16_t, p, 4);
    h->kind = LD(uint16_t, p, 6);
    h->epoch = LD(uint64_t, p, 8);
    h->sender_id = LD(uint32_t, p, 16);
    h->slot = LD(uint32_t, p, 20);
    h->seq = LD(uint64_t, p, 24);
    h->step = LD(uint64_t, p, 32);
    h->layer = LD(uint32_t, p, 40);
    h->micro_batch = LD(uint32_t, p, 44);
    h->rows = LD(uint32_t, p, 48);
    h->cols = LD(uint32_t, p, 52);
    h->dtype = LD(uint16_t, p, 56);
    h->reserved = LD(uint16_t, p, 58);
    h->pad = LD(uint32_t, p, 60);
    h->payload_bytes = LD(uint64_t, p, 64);
    h->tag = LD(uint64_t, p, 72);
}

static PyObject *raise_fmt(PyObject *cls, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyErr_SetString(cls, msg);
    return NULL;
}

/* header.unpack_fields's checks, in the same order and with the same messages. */
static int check_unpack(const uint8_t *p, Py_ssize_t len, hdr_t *h) {
    if (len != HEADER_SIZE) {
        raise_fmt(ProtocolError, "short header: %zd bytes, expected %d", len, HEADER_SIZE);
        return -1;
    }
    decode(p, h);
    if (h->magic != MAGIC) {
        raise_fmt(ProtocolError, "bad magic 0x%08x, expected 0x%08x", h->magic, MAGIC);
        return -1;
    }
    if (h->version != VERSION) {
        raise_fmt(VersionMismatch, "version mismatch: peer speaks header v%u, we speak v%d",
                  (unsigned)h->version, VERSION);
        return -1;
    }
    if (h->kind < K_DATA || h->kind > K_WELCOME) {
        raise_fmt(ProtocolError, "unknown frame kind %u", (unsigned)h->kind);
        return -1;
    }
    int nonzero = h->reserved || h->pad;
    for (int i = 104; i < HEADER_SIZE && !nonzero; i++) nonzero = p[i] != 0;
    if (nonzero) {
        raise_fmt(ProtocolError, "reserved header bytes are not zero");
        return -1;
    }
    return 0;
}

/* header.validate_fields. has_sender: 0 when the caller passed sender_id=None. */
static int check_validate(const hdr_t *h, int has_sender, unsigned long long sender_id,
                          unsigned long long nslots, unsigned long long capacity) {
    if (has_sender && h->sender_id != sender_id) {
        raise_fmt(ProtocolError, "sender id %u on a connection opened by %llu", h->sender_id,
                  sender_id);
        return -1;
    }
    if (h->kind == K_DATA) {
        unsigned itemsize = h->dtype < NDTYPES ? ITEMSIZE[h->dtype] : 0;
        if (!itemsize) {
            raise_fmt(ProtocolError, "unknown dtype code %u", (unsigned)h->dtype);
            return -1;
        }
        if (h->slot >= nslots) {
            raise_fmt(ProtocolError, "slot %u out of range (receiver granted %llu)", h->slot,
                      nslots);
            return -1;
        }
        /* u32 * u32 * 8 needs 67 bits: multiply in 128 */
        unsigned __int128 want = (unsigned __int128)h->rows * h->cols * itemsize;
        if (want != h->payload_bytes) {
            raise_fmt(ProtocolError, "rows*cols*itemsize = %u*%u*%u != payload_bytes %llu",
                      h->rows, h->cols, itemsize, (unsigned long long)h->payload_bytes);
            return -1;
        }
        if (h->payload_bytes > capacity) {
            raise_fmt(ProtocolError, "payload of %llu bytes exceeds the slot size %llu",
                      (unsigned long long)h->payload_bytes, capacity);
            return -1;
        }
    } else if (h->kind == K_CREDIT) {
        if (h->slot >= nslots) {
            raise_fmt(ProtocolError, "credit for slot %u out of range (%llu slots)", h->slot,
                      nslots);
            return -1;
        }
    } else if (h->kind == K_ERROR) {
        if (h->payload_bytes > MAX_ERROR_BYTES) {
            raise_fmt(ProtocolError, "error message of %llu bytes is too long",
                      (unsigned long long)h->payload_bytes);
            return -1;
        }
    } else if (h->payload_bytes != 0) {
        raise_fmt(ProtocolError, "%s frame with payload_bytes %llu", KIND_NAMES[h->kind],
                  (unsigned long long)h->payload_bytes);
        return -1;
    }
    return 0;
}

/* The 17-tuple in Header field order. */
static PyObject *fields_tuple(const uint8_t *p, const hdr_t *h) {
    return Py_BuildValue("(HIKIKKIIIIHKKy#y#HI)", h->kind, h->sender_id,
                         (unsigned long long)h->epoch, h->slot, (unsigned long long)h->seq,
                         (unsigned long long)h->step, h->layer, h->micro_batch, h->rows, h->cols,
                         h->dtype, (unsigned long long)h->payload_bytes,
                         (unsigned long long)h->tag, (const char *)p + 80, (Py_ssize_t)16,
                         (const char *)p + 96, (Py_ssize_t)8, h->version, h->magic);
}

static PyObject *fast_unpack(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    hdr_t h;
    PyObject *out = NULL;
    if (check_unpack(b.buf, b.len, &h) == 0) out = fields_tuple(b.buf, &h);
    PyBuffer_Release(&b);
    return out;
}

/* Non-negative Python int -> unsigned long long; -1 with an error set otherwise. */
static int as_ull(PyObject *o, unsigned long long *out, const char *what) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in 0..2**64-1", what);
        return -1;
    }
    return 0;
}

/* The (sender_id | None, nslots, capacity) arguments of check() and read_headers(). */
static int parse_limits(PyObject *const *a, int *has_sender, unsigned long long *sid,
                        unsigned long long *nslots, unsigned long long *cap) {
    *has_sender = a[0] != Py_None;
    *sid = 0;
    if ((*has_sender && as_ull(a[0], sid, "sender_id") < 0) ||
        as_ull(a[1], nslots, "nslots") < 0 || as_ull(a[2], cap, "capacity") < 0)
        return -1;
    return 0;
}

/* check(buf, off, sender_id | None, nslots, capacity) -> fields */
static PyObject *fast_check(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "check(buf, off, sender_id, nslots, capacity)");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred()) return NULL;
    unsigned long long sid, nslots, cap;
    int has_sender;
    if (parse_limits(args + 2, &has_sender, &sid, &nslots, &cap) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    /* same length rule as unpack(buf[off:off + 128]) */
    Py_ssize_t len = 0;
    if (off >= 0 && off < b.len) len = b.len - off < HEADER_SIZE ? b.len - off : HEADER_SIZE;
    const uint8_t *p = (const uint8_t *)b.buf + (len ? off : 0);
    hdr_t h;
    PyObject *out = NULL;
    if (off < 0)
        PyErr_SetString(PyExc_ValueError, "negative offset");
    else if (check_unpack(p, len, &h) == 0 &&
             check_validate(&h, has_sender, sid, nslots, cap) == 0)
        out = fields_tuple(p, &h);
    PyBuffer_Release(&b);
    return out;
}

/* read_headers(fd, hbuf, got, sender_id | None, nslots, capacity) -> None | (got, frames, error)
 *
 * One non-blocking recv() of header frames into hbuf[got:] (BlockingIOError: nothing waiting;
 * None: end of stream), then check() of every whole frame in order. Returns the bytes of a
 * partial frame now kept at the front of hbuf, the fields of the good frames, and the
 * exception of the first bad frame (None if all were good; frames after a bad one are not
 * parsed). */
static PyObject *fast_read_headers(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "read_headers(fd, hbuf, got, sender_id, nslots, capacity)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t got = PyLong_AsSsize_t(args[2]);
    if (got == -1 && PyErr_Occurred()) return NULL;
    unsigned long long sid, nslots, cap;
    int has_sender;
    if (parse_limits(args + 3, &has_sender, &sid, &nslots, &cap) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_WRITABLE) < 0) return NULL;
    if (fd < 0 || fd > INT32_MAX || got < 0 || got >= b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "read_headers: bad fd or fill level");
        return NULL;
    }
    uint8_t *buf = b.buf;
    ssize_t n = recv((int)fd, buf + got, b.len - got, MSG_DONTWAIT);
    if (n < 0) {
        PyBuffer_Release(&b);
        return PyErr_SetFromErrno(PyExc_OSError); /* EAGAIN -> BlockingIOError */
    }
    if (n == 0) {
        PyBuffer_Release(&b);
        Py_RETURN_NONE;
    }
    Py_ssize_t end = got + n, off = 0;
    PyObject *frames = PyList_New(0), *err = NULL;
    if (!frames) goto fail;
    while (end - off >= HEADER_SIZE) {
        hdr_t h;
        const uint8_t *p = buf + off;
        if (check_unpack(p, HEADER_SIZE, &h) < 0 ||
            check_validate(&h, has_sender, sid, nslots, cap) < 0) {
            PyObject *type, *tb;
            PyErr_Fetch(&type, &err, &tb);
            PyErr_NormalizeException(&type, &err, &tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            if (!err) goto fail;
            break;
        }
        PyObject *t = fields_tuple(p, &h);
        if (!t || PyList_Append(frames, t) < 0) {
            Py_XDECREF(t);
            goto fail;
        }
        Py_DECREF(t);
        off += HEADER_SIZE;
    }
    Py_ssize_t left = 0;
    if (!err) { /* keep the partial frame at the front */
        left = end - off;
        if (left && off) memmove(buf, buf + off, left);
    }
    PyBuffer_Release(&b);
    return Py_BuildValue("(nNN)", left, frames, err ? err : Py_NewRef(Py_None));
fail:
    PyBuffer_Release(&b);
    Py_XDECREF(frames);
    Py_XDECREF(err);
    return NULL;
}

/* ---- pack ------------------------------------------------------------------------------------ */
static const char *const FIELD_NAMES[] = {"kind", "sender_id", "epoch", "slot", "seq", "step",
                                          "layer", "micro_batch", "rows", "cols", "dtype",
                                          "payload_bytes", "tag"};
/* wire width of each of the 13 integer fields (bytes) and its offset */
static const int FIELD_WIDTH[] = {2, 4, 8, 4, 8, 8, 4, 4, 4, 4, 2, 8, 8};
static const int FIELD_OFF[] = {6, 16, 8, 20, 24, 32, 40, 44, 48, 52, 56, 64, 72};

static int put_bytes(uint8_t *dst, PyObject *o, Py_ssize_t size, const char *what) {
    Py_buffer b;
    if (PyObject_GetBuffer(o, &b, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        raise_fmt(ProtocolError, "header field out of range: %s must be bytes", what);
        return -1;
    }
    /* struct's "Ns": truncate or zero-pad to N bytes */
    memset(dst, 0, size);
    memcpy(dst, b.buf, b.len < size ? b.len : size);
    PyBuffer_Release(&b);
    return 0;
}

/* Encode the 15 pack_fields arguments (ints[13] are the integer fields in FIELD_NAMES order). */
static int encode(uint8_t *out, PyObject *const *ints, PyObject *trace, PyObject *span) {
    memset(out, 0, HEADER_SIZE);
    ST(uint32_t, out, 0, MAGIC);
    ST(uint16_t, out, 4, VERSION);
    for (int i = 0; i < 13; i++) {
        PyObject *o = ints[i];
        unsigned long long v;
        if (!PyLong_Check(o)) {
            raise_fmt(ProtocolError, "header field out of range: %s is not an integer",
                      FIELD_NAMES[i]);
            return -1;
        }
        v = PyLong_AsUnsignedLongLong(o);
        int bad = v == (unsigned long long)-1 && PyErr_Occurred();
        if (bad) PyErr_Clear();
        int w = FIELD_WIDTH[i];
        if (bad || (w < 8 && v >> (8 * w))) {
            raise_fmt(ProtocolError, "header field out of range: %s must fit in %d bytes",
                      FIELD_NAMES[i], w);
            return -1;
        }
        uint8_t *q = out + FIELD_OFF[i];
        if (w == 2) ST(uint16_t, q, 0, v);
        else if (w == 4) ST(uint32_t, q, 0, v);
        else ST(uint64_t, q, 0, v);
    }
    if (put_bytes(out + 80, trace, 16, "trace_id") < 0) return -1;
    if (put_bytes(out + 96, span, 8, "span_id") < 0) return -1;
    return 0;
}

static PyObject *fast_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "pack() takes the 15 header fields");
        return NULL;
    }
    uint8_t out[HEADER_SIZE];
    if (encode(out, args, args[13], args[14]) < 0) return NULL;
    return PyBytes_FromStringAndSize((const char *)out, HEADER_SIZE);
}

/* ---- payload --------------------------------------------------------------------------------- */
/* numpy buffer format -> DType code (0: not a type we send) */
static int format_code(const char *f, Py_ssize_t itemsize) {
    if (!f || !f[0] || f[1]) return 0; /* native single-character formats only */
    switch (f[0]) {
    case 'B': return 1;
    case 'b': return 2;
    case 'h': return 3;
    case 'i': return itemsize == 4 ? 4 : 0;
    case 'l': case 'q': return itemsize == 8 ? 5 : 0;
    case 'e': return 6;
    case 'f': return 8;
    case 'd': return 9;
    case '?': return 10;
    default: return 0;
    }
}

/* A read-only byte buffer over memory owned by another object (a CPU torch tensor): keeps the
 * owner alive for as long as the buffer (or any memoryview of it) lives. */
typedef struct {
    PyObject_HEAD
    PyObject *owner;
    void *ptr;
    Py_ssize_t len;
} Span;

static int span_getbuffer(PyObject *o, Py_buffer *view, int flags) {
    Span *s = (Span *)o;
    return PyBuffer_FillInfo(view, o, s->ptr, s->len, 1, flags);
}

static void span_dealloc(PyObject *o) {
    Py_XDECREF(((Span *)o)->owner);
    Py_TYPE(o)->tp_free(o);
}

static PyBufferProcs span_as_buffer = {span_getbuffer, NULL};

static PyTypeObject SpanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "libm2n._fast.Span",
    .tp_basicsize = sizeof(Span),
    .tp_dealloc = span_dealloc,
    .tp_as_buffer = &span_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "read-only bytes of a CPU tensor (keeps the tensor alive)",
};

static PyObject *tensor_type;  /* torch.Tensor, set by set_torch() */
static PyObject *tensor_codes; /* {torch.dtype: DType code} */

/* Call obj.name() (call=1) or read obj.name; NULL with an error set on failure. */
static PyObject *attr(PyObject *obj, const char *name, int call) {
    return call ? PyObject_CallMethod(obj, name, NULL) : PyObject_GetAttrString(obj, name);
}

/* payload() of an exact CPU, contiguous, non-empty torch.Tensor of a sendable dtype; None for
 * anything else (or on any error: the Python path then decides). */
static PyObject *tensor_payload(PyObject *obj) {
    PyObject *v = NULL, *shape = NULL, *out = NULL;
    long long rows = 1, cols = 1, nbytes, ptr;
    int code;
    if (!(v = attr(obj, "is_cpu", 0))) goto fallback;
    int ok = v == Py_True;
    Py_CLEAR(v);
    if (!ok) goto fallback;
    if (!(v = attr(obj, "is_contiguous", 1))) goto fallback;
    ok = v == Py_True;
    Py_CLEAR(v);
    if (!ok) goto fallback;
    if (!(v = attr(obj, "dtype", 0))) goto fallback;
    PyObject *c = PyDict_GetItemWithError(tensor_codes, v); /* borrowed */
    Py_CLEAR(v);
    if (!c) goto fallback;
    code = (int)PyLong_AsLong(c);
    if (!(v = attr(obj, "nbytes", 0))) goto fallback;
    nbytes = PyLong_AsLongLong(v);
    Py_CLEAR(v);
    if (nbytes <= 0) goto fallback;
    if (!(shape = attr(obj, "shape", 0)) || !PyTuple_Check(shape)) goto fallback;
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    for (Py_ssize_t i = 0; i < nd; i++) {
        long long d = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        if (d < 0) goto fallback;
        if (i < nd - 1) rows *= d;
        else cols = d;
    }
    if (!(v = attr(obj, "data_ptr", 1))) goto fallback;
    ptr = PyLong_AsLongLong(v);
    Py_CLEAR(v);
    if (ptr == 0 || PyErr_Occurred()) goto fallback;
    Span *span = PyObject_New(Span, &SpanType);
    if (!span) goto fallback;
    span->owner = Py_NewRef(obj);
    span->ptr = (void *)(intptr_t)ptr;
    span->len = (Py_ssize_t)nbytes;
    out = Py_BuildValue("(NLLLi)", (PyObject *)span, nbytes, rows, cols, code);
    Py_XDECREF(shape);
    return out;
fallback:
    PyErr_Clear();
    Py_XDECREF(v);
    Py_XDECREF(shape);
    Py_RETURN_NONE;
}

static PyObject *fast_set_torch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_torch(torch.Tensor, {dtype: code})");
        return NULL;
    }
    Py_XSETREF(tensor_type, Py_NewRef(args[0]));
    Py_XSETREF(tensor_codes, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

/* payload(obj) -> (buffer, nbytes, rows, cols, dtype) or None (the caller falls back to the
 * Python as_payload): exact numpy.ndarray (C-contiguous, native sendable dtype, non-empty),
 * exact torch.Tensor (CPU, contiguous, non-empty; ``buffer`` is a Span over its memory),
 * bytes, bytearray, or a 1-D byte memoryview (``buffer`` is obj itself). */
static PyObject *fast_payload(PyObject *self, PyObject *obj) {
    Py_buffer b;
    if (ndarray_type && Py_TYPE(obj) == (PyTypeObject *)ndarray_type) {
        if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        int code = format_code(b.format, b.itemsize);
        long long rows = 1, cols = 1;
        if (b.ndim > 0) {
            for (int i = 0; i < b.ndim - 1; i++) rows *= b.shape[i];
            cols = b.shape[b.ndim - 1];
        }
        Py_ssize_t n = b.len;
        PyBuffer_Release(&b);
        if (!code || n == 0) Py_RETURN_NONE;
        return Py_BuildValue("(OnLLi)", obj, n, rows, cols, code);
    }
    if (tensor_type && Py_TYPE(obj) == (PyTypeObject *)tensor_type) return tensor_payload(obj);
    if (PyBytes_CheckExact(obj) || PyByteArray_CheckExact(obj) ||
        Py_IS_TYPE(obj, &PyMemoryView_Type)) {
        if (Py_IS_TYPE(obj, &PyMemoryView_Type)) {
            Py_buffer *v = PyMemoryView_GET_BUFFER(obj);
            if (v->ndim != 1 || v->itemsize != 1 || !v->format || strcmp(v->format, "B") != 0 ||
                !PyBuffer_IsContiguous(v, 'C'))
                Py_RETURN_NONE;
        }
        if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        Py_ssize_t n = b.len;
        PyBuffer_Release(&b);
        return Py_BuildValue("(Onnni)", obj, n, (Py_ssize_t)1, n, 1);
    }
    Py_RETURN_NONE;
}

static PyObject *fast_set_ndarray(PyObject *self, PyObject *t) {
    if (!PyType_Check(t)) {
        PyErr_SetString(PyExc_TypeError, "set_ndarray expects a type");
        return NULL;
    }
    Py_XSETREF(ndarray_type, Py_NewRef(t));
    Py_RETURN_NONE;
}

/* ---- shm send -------------------------------------------------------------------------------- */
/* shm_send(fd, mem, off, buffer, kind, sender_id, epoch, slot, seq, step, layer, micro_batch,
 *          rows, cols, dtype, payload_bytes, tag, trace_id, span_id) -> None | bytes
 *
 * The 15 header fields are pack()'s. Packs the DATA header, copies ``payload_bytes`` bytes of
 * ``buffer`` (which must hold exactly that many) to ``mem[off:]`` (without the GIL when large)
 * and writes the header to socket ``fd`` without blocking. Returns None when the whole header
 * went out, else the unsent tail (the caller finishes it with a blocking sendall). */
static PyObject *fast_shm_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 19) {
        PyErr_SetString(PyExc_TypeError, "shm_send() takes 19 arguments");
        return NULL;
    }
    long fdl = PyLong_AsLong(args[0]);
    if (fdl == -1 && PyErr_Occurred()) return NULL;
    if (fdl < 0 || fdl > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "shm_send: bad file descriptor");
        return NULL;
    }
    int fd = (int)fdl;
    Py_ssize_t off = PyLong_AsSsize_t(args[2]);
    if (off == -1 && PyErr_Occurred()) return NULL;
    PyObject *const *f = args + 4; /* the 15 pack fields */
    uint8_t hdr[HEADER_SIZE];
    if (encode(hdr, f, f[13], f[14]) < 0) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(f[11]); /* in 0..2**64-1 after encode */
    if (n == -1 && PyErr_Occurred()) return NULL;

    Py_buffer mem, src;
    if (PyObject_GetBuffer(args[1], &mem, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[3], &src, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&mem);
        return NULL;
    }
    if (n < 0 || n != src.len || off < 0 || off > mem.len || n > mem.len - off) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&mem);
        PyErr_Format(PyExc_ValueError, "shm_send: %zd bytes at offset %zd do not fit the slot "
                     "memory (%zd bytes; buffer holds %zd)", n, off, mem.len, src.len);
        return NULL;
    }
    if (n >= GIL_FREE_COPY) {
        Py_BEGIN_ALLOW_THREADS
        memcpy((char *)mem.buf + off, src.buf, n);
        Py_END_ALLOW_THREADS
    } else if (n) {
        memcpy((char *)mem.buf + off, src.buf, n);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&mem);

    ssize_t sent = send(fd, hdr, HEADER_SIZE, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent == HEADER_SIZE) Py_RETURN_NONE;
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        sent = 0;
    }
    return PyBytes_FromStringAndSize((const char *)hdr + sent, HEADER_SIZE - sent);
}

/* new_header(cls, names, fields) -> cls instance with attribute names[i] = fields[i], set
 * through the slot descriptors (a frozen dataclass's __setattr__ refuses; this is what
 * header.new_header does in Python, ~5x cheaper). */
static PyObject *fast_new_header(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) ||
        !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[1]) != PyTuple_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "new_header(cls, names, fields): tuples of one length");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    PyObject *obj = cls->tp_alloc(cls, 0);
    if (!obj) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[1]); i++) {
        if (PyObject_GenericSetAttr(obj, PyTuple_GET_ITEM(args[1], i),
                                    PyTuple_GET_ITEM(args[2], i)) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    return obj;
}

static PyMethodDef methods[] = {
    {"new_header", (PyCFunction)(void (*)(void))fast_new_header, METH_FASTCALL,
     "new_header(cls, names, fields) -> instance (header.new_header)"},
    {"pack", (PyCFunction)(void (*)(void))fast_pack, METH_FASTCALL,
     "pack(15 header fields) -> 128-byte header (header.pack_fields)"},
    {"unpack", fast_unpack, METH_O, "unpack(data) -> fields tuple (header.unpack_fields)"},
    {"check", (PyCFunction)(void (*)(void))fast_check, METH_FASTCALL,
     "check(buf, off, sender_id, nslots, capacity) -> fields (unpack + validate)"},
    {"read_headers", (PyCFunction)(void (*)(void))fast_read_headers, METH_FASTCALL,
     "read_headers(fd, hbuf, got, sender_id, nslots, capacity) -> None | (got, frames, error)"},
    {"payload", fast_payload, METH_O,
     "payload(obj) -> (buffer, nbytes, rows, cols, dtype) or None"},
    {"set_ndarray", fast_set_ndarray, METH_O, "register numpy.ndarray for payload()"},
    {"set_torch", (PyCFunction)(void (*)(void))fast_set_torch, METH_FASTCALL,
     "set_torch(torch.Tensor, {torch dtype: DType code}): register torch for payload()"},
    {"shm_send", (PyCFunction)(void (*)(void))fast_shm_send, METH_FASTCALL,
     "shm_send(fd, mem, off, buffer, 15 header fields) -> None | unsent header tail"},
    {NULL, NULL, 0, NULL},
};

static int fast_exec(PyObject *m) {
    PyObject *errors = PyImport_ImportModule("libm2n.errors");
    if (!errors) return -1;
    ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
    VersionMismatch = PyObject_GetAttrString(errors, "VersionMismatch");
    Py_DECREF(errors);
    if (!ProtocolError || !VersionMismatch) return -1;
    if (PyType_Ready(&SpanType) < 0) return -1;
    /* bumped on any change of a function's contract; fastpath.py refuses a stale build */
    if (PyModule_AddIntConstant(m, "API_VERSION", 1) < 0) return -1;
    return PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE);
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, fast_exec}, {0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "libm2n._fast", "libm2n's per-message hot path in C", 0, methods,
    slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void) { return PyModuleDef_Init(&module); }
