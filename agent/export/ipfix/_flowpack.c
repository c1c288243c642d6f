/*
 * kipfix.agent.export.ipfix._flowpack: the data-record encoder of fields.py, in C.
 *
 * A Packer is built once per template and address family from a program of
 * (opcode, argument, length, kind) steps, one per element, that flowpack.py
 * derives from the element names. Calling it with a sequence of FlowRecords
 * returns one bytes object per record, exactly what the Python packer
 * compiled by fields.compile_flow_packer returns (tests/test_flowpack.py
 * compares the two element by element). It exists because the Python packer
 * tops out near 350,000 records/s for a 47-element template; this one reads
 * each record's slots once and writes the fields straight into a buffer.
 *
 * Semantics are fields.py's; the comments there say why each value is what
 * it is. Out-of-range values raise struct.error, as struct.pack does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* What a step writes. */
enum { KIND_INT = 0, KIND_BYTES = 1, KIND_VARLEN = 2 };

/* Integer values. */
enum {
    V_CONST = 0, V_PACKETS, V_OCTETS, V_TCP_FLAGS, V_TOS, V_DSCP, V_MIN_TTL, V_MAX_TTL,
    V_VLAN, V_INNER_VLAN, V_END_REASON, V_FRAGMENT,
    V_START_MS, V_END_MS, V_START_S, V_END_S, V_START_NTP, V_END_NTP, V_START_NTP_US, V_END_NTP_US,
    V_START_UPTIME, V_END_UPTIME,
    V_IP_VERSION, V_DIRECTION, V_PROTOCOL, V_INGRESS, V_EGRESS, V_SPORT, V_DPORT,
    V_ICMP4, V_ICMP6, V_FORWARDING, V_OBS_POINT,
    /* argument: the IP version they are filled for (0 for other records), or 0 for every record */
    V_SRC_PREFIX, V_DST_PREFIX,
    /* Byte values. */
    B_SRC = 64, B_DST, B_NEXT_HOP, /* argument as for V_SRC_PREFIX (zeros for other records) */
    B_ZERO, B_INTERFACE_NAME, B_NETNS,
    B_SRC_POD, B_DST_POD, /* argument: index in the pod tuple */
    OP_END
};

/* FlowRecord slots and FlowKey items that steps read. */
enum {
    R_KEY, R_PACKETS, R_OCTETS, R_START, R_END, R_END_REASON, R_TCP_FLAGS, R_MIN_TTL, R_MAX_TTL,
    R_TOS, R_VLAN, R_INNER_VLAN, R_FRAGMENT, R_OBS_POINT, R_INTERFACE_NAME, R_NETNS, R_COUNT
};
static const char *const record_slots[R_COUNT] = {
    "key", "packets", "octets", "start_ns", "end_ns", "end_reason", "tcp_flags", "min_ttl", "max_ttl",
    "tos", "vlan_id", "inner_vlan_id", "fragment_id", "observation_point_id", "interface_name", "netns",
};
enum { K_IFINDEX, K_DIRECTION, K_IP_VERSION, K_PROTOCOL, K_SRC, K_DST, K_SPORT, K_DPORT, K_COUNT };

#define INTEGER_SLOTS ((1u << R_PACKETS) | (1u << R_OCTETS) | (1u << R_START) | (1u << R_END) | \
                       (1u << R_END_REASON) | (1u << R_TCP_FLAGS) | (1u << R_MIN_TTL) | (1u << R_MAX_TTL) | \
                       (1u << R_TOS) | (1u << R_VLAN) | (1u << R_INNER_VLAN) | (1u << R_FRAGMENT) | \
                       (1u << R_OBS_POINT))

typedef struct {
    int op;
    unsigned long long arg;
    Py_ssize_t length;
    int kind;
} Step;

typedef struct {
    PyObject_HEAD
    Step *steps;
    Py_ssize_t nsteps;
    unsigned needs;          /* bit per R_* slot */
    int routes_src, routes_dst, pods_src, pods_dst;
    unsigned long long init_ms;
    PyTypeObject *record_type;             /* whose slot offsets are cached */
    Py_ssize_t offsets[R_COUNT];           /* -1: read with getattr */
    PyObject *slot_names[R_COUNT];
    PyObject *route, *route_cache, *pod_table, *pod_lookup, *no_pod, *struct_error;
} Packer;

/* The record being written; one per call, since lookups run Python code that may call us again. */
typedef struct {
    char *data;
    Py_ssize_t used, capacity;
} Buffer;

/* One record's inputs, read once. */
typedef struct {
    PyObject *slot[R_COUNT];                /* owned: lookups run Python code, and getattr may compute */
    unsigned long long value[R_COUNT];      /* integer slots */
    unsigned long long key[K_COUNT];        /* integer key items */
    const char *src, *dst;
    Py_ssize_t src_len, dst_len;
    PyObject *src_route, *dst_route;        /* owned */
    PyObject *src_pod, *dst_pod;            /* owned */
} Inputs;

static int
step_uses(int op, unsigned *needs, int *rs, int *rd, int *ps, int *pd)
{
    *needs |= 1u << R_KEY;  /* most steps look at the key; reading it is cheap */
    switch (op) {
    case V_CONST: break;
    case V_PACKETS: *needs |= 1u << R_PACKETS; break;
    case V_OCTETS: *needs |= 1u << R_OCTETS; break;
    case V_TCP_FLAGS: *needs |= 1u << R_TCP_FLAGS; break;
    case V_TOS: case V_DSCP: *needs |= 1u << R_TOS; break;
    case V_MIN_TTL: *needs |= 1u << R_MIN_TTL; break;
    case V_MAX_TTL: *needs |= 1u << R_MAX_TTL; break;
    case V_VLAN: *needs |= 1u << R_VLAN; break;
    case V_INNER_VLAN: *needs |= 1u << R_INNER_VLAN; break;
    case V_END_REASON: *needs |= 1u << R_END_REASON; break;
    case V_FRAGMENT: *needs |= 1u << R_FRAGMENT; break;
    case V_OBS_POINT: *needs |= 1u << R_OBS_POINT; break;
    case V_START_MS: case V_START_S: case V_START_NTP: case V_START_NTP_US: case V_START_UPTIME:
        *needs |= 1u << R_START; break;
    case V_END_MS: case V_END_S: case V_END_NTP: case V_END_NTP_US: case V_END_UPTIME:
        *needs |= 1u << R_END; break;
    case V_IP_VERSION: case V_DIRECTION: case V_PROTOCOL: case V_INGRESS: case V_EGRESS:
    case V_SPORT: case V_DPORT: case V_ICMP4: case V_ICMP6: case V_FORWARDING:
    case B_SRC: case B_DST: case B_ZERO:
        break;
    case V_SRC_PREFIX: *needs |= 1u << R_NETNS; *rs = 1; break;
    case V_DST_PREFIX: case B_NEXT_HOP: *needs |= 1u << R_NETNS; *rd = 1; break;
    case B_INTERFACE_NAME: *needs |= 1u << R_INTERFACE_NAME; break;
    case B_NETNS: *needs |= 1u << R_NETNS; break;
    case B_SRC_POD: *needs |= 1u << R_END; *ps = 1; break;  /* an IP's owner depends on when */
    case B_DST_POD: *needs |= 1u << R_END; *pd = 1; break;
    default: return -1;
    }
    return 0;
}

static void
Packer_dealloc(Packer *self)
{
    PyMem_Free(self->steps);
    for (int i = 0; i < R_COUNT; i++)
        Py_XDECREF(self->slot_names[i]);
    Py_XDECREF(self->record_type);
    Py_XDECREF(self->route);
    Py_XDECREF(self->route_cache);
    Py_XDECREF(self->pod_table);
    Py_XDECREF(self->pod_lookup);
    Py_XDECREF(self->no_pod);
    Py_XDECREF(self->struct_error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Packer(program, record_type, init_ms, route, route_cache, pod_table, pod_lookup, no_pod, struct_error) */
static int
Packer_init(Packer *self, PyObject *args, PyObject *kwds)
{
    PyObject *program, *record_type, *route, *route_cache, *pod_table, *pod_lookup, *no_pod, *struct_error;
    unsigned long long init_ms;
    if (!PyArg_ParseTuple(args, "OOKOOOOOO:Packer", &program, &record_type, &init_ms, &route, &route_cache,
                          &pod_table, &pod_lookup, &no_pod, &struct_error))
        return -1;
    if (self->steps != NULL) {
        PyErr_SetString(PyExc_TypeError, "Packer is initialised once");
        return -1;
    }
    if (!PyType_Check(record_type) || !PyDict_Check(route_cache) ||
        (pod_table == Py_None ? !PyCallable_Check(pod_lookup) : !PyDict_Check(pod_table)) ||
        !PyTuple_Check(no_pod) || PyTuple_GET_SIZE(no_pod) != 5) {
        PyErr_SetString(PyExc_TypeError, "Packer: record_type must be a type, route_cache a dict, "
                                         "pod_table a dict (or None and pod_lookup a function), no_pod a 5-tuple");
        return -1;
    }
    PyObject *fast = PySequence_Fast(program, "Packer: program must be a sequence of steps");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    self->steps = PyMem_Calloc(n ? n : 1, sizeof(Step));
    if (self->steps == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    self->nsteps = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        Step *s = &self->steps[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iKni:step", &s->op, &s->arg, &s->length, &s->kind)) {
            Py_DECREF(fast);
            return -1;
        }
        int is_bytes = s->op >= B_SRC;
        if (step_uses(s->op, &self->needs, &self->routes_src, &self->routes_dst, &self->pods_src,
                      &self->pods_dst) < 0 ||
            (s->kind == KIND_INT && (is_bytes || !(s->length == 1 || s->length == 2 || s->length == 4 ||
                                                   s->length == 8))) ||
            (s->kind == KIND_BYTES && (!is_bytes || s->length < 0 || s->length > 65535)) ||
            (s->kind == KIND_VARLEN && !is_bytes) || s->kind < KIND_INT || s->kind > KIND_VARLEN ||
            ((s->op == B_SRC_POD || s->op == B_DST_POD) && s->arg > 4)) {
            PyErr_Format(PyExc_ValueError, "Packer: step %zd (op %d, kind %d, length %zd) is not valid",
                         i, s->op, s->kind, s->length);
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    self->init_ms = init_ms;
    Py_INCREF(record_type);
    self->record_type = (PyTypeObject *)record_type;
    for (int i = 0; i < R_COUNT; i++) {
        self->offsets[i] = -1;
        self->slot_names[i] = PyUnicode_InternFromString(record_slots[i]);
        if (self->slot_names[i] == NULL)
            return -1;
        /* A __slots__ member holding an object: read it at its offset, not through getattr. */
        PyObject *descr = PyObject_GetAttr(record_type, self->slot_names[i]);
        if (descr == NULL) {
            PyErr_Clear();
            continue;
        }
        if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED))
                self->offsets[i] = member->offset;
        }
        Py_DECREF(descr);
    }
    Py_INCREF(route); self->route = route;
    Py_INCREF(route_cache); self->route_cache = route_cache;
    Py_INCREF(pod_table); self->pod_table = pod_table;
    Py_INCREF(pod_lookup); self->pod_lookup = pod_lookup;
    Py_INCREF(no_pod); self->no_pod = no_pod;
    Py_INCREF(struct_error); self->struct_error = struct_error;
    if ((self->routes_src || self->routes_dst) && route == Py_None) {
        PyErr_SetString(PyExc_ValueError, "Packer: the template needs routing lookups but no route was given");
        return -1;
    }
    return 0;
}

/* A new reference to the record's slot ``i``: read at its offset when the record is of the cached type. */
static PyObject *
read_slot(Packer *self, PyObject *record, int i)
{
    if (self->offsets[i] >= 0 && Py_TYPE(record) == self->record_type) {
        PyObject *value = *(PyObject **)((char *)record + self->offsets[i]);
        if (value == NULL)
            PyErr_Format(PyExc_AttributeError, "record has no %s", record_slots[i]);
        Py_XINCREF(value);
        return value;
    }
    return PyObject_GetAttr(record, self->slot_names[i]);
}

static int
as_u64(Packer *self, PyObject *value, const char *what, unsigned long long *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(self->struct_error, "%s: required argument is not an integer", what);
        return -1;
    }
    /* unsigned long: 64 bits here (LP64), and on 3.11 cheaper than the long long form for multi-digit ints */
    *out = sizeof(unsigned long) == 8 ? PyLong_AsUnsignedLong(value) : PyLong_AsUnsignedLongLong(value);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(self->struct_error, "%s: argument out of range", what);
        return -1;
    }
    return 0;
}

/* rcache.get((netns, address)) or route(netns, address): (prefix length, next hop). */
static PyObject *
lookup_route(Packer *self, PyObject *netns, PyObject *address)
{
    PyObject *key = PyTuple_Pack(2, netns, address);
    if (key == NULL)
        return NULL;
    PyObject *hit = PyDict_GetItemWithError(self->route_cache, key);
    Py_DECREF(key);
    if (hit == NULL && PyErr_Occurred())
        return NULL;
    if (hit != NULL) {
        int truth = PyObject_IsTrue(hit);
        if (truth < 0)
            return NULL;
        if (truth) {
            Py_INCREF(hit);
            return hit;
        }
    }
    return PyObject_CallFunctionObjArgs(self->route, netns, address, NULL);
}

/* The five encoded values of the pod owning ``address`` when the flow ended: pod_table.get(address,
 * NOPOD), or pod_lookup(address) when there is no table; a value that is no tuple (an IP's recent
 * owners, podmeta.Succession) is called with ``end_ns``. */
static PyObject *
lookup_pod(Packer *self, PyObject *address, PyObject *end_ns)
{
    PyObject *pod;
    if (self->pod_table != Py_None) {
        pod = PyDict_GetItemWithError(self->pod_table, address);
        if (pod == NULL) {
            if (PyErr_Occurred())
                return NULL;
            pod = self->no_pod;
        }
        Py_INCREF(pod);
    } else {
        pod = PyObject_CallOneArg(self->pod_lookup, address);
    }
    if (pod == NULL || PyTuple_CheckExact(pod))
        return pod;
    PyObject *owner = PyObject_CallOneArg(pod, end_ns);
    Py_DECREF(pod);
    return owner;
}

static void
release(Inputs *in)
{
    for (int i = 0; i < R_COUNT; i++)
        Py_CLEAR(in->slot[i]);
    Py_CLEAR(in->src_route);
    Py_CLEAR(in->dst_route);
    Py_CLEAR(in->src_pod);
    Py_CLEAR(in->dst_pod);
}

static int
read_inputs(Packer *self, PyObject *record, Inputs *in)
{
    for (int i = 0; i < R_COUNT; i++) {
        if (!(self->needs & (1u << i)))
            continue;
        PyObject *value = read_slot(self, record, i);
        if (value == NULL)
            return -1;
        in->slot[i] = value;
        if ((INTEGER_SLOTS & (1u << i)) && as_u64(self, value, record_slots[i], &in->value[i]) < 0)
            return -1;
    }
    PyObject *key = in->slot[R_KEY];
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != K_COUNT) {
        PyErr_SetString(PyExc_TypeError, "record key must be a FlowKey");
        return -1;
    }
    static const char *const key_names[K_COUNT] = {"ifindex", "direction", "ip_version", "protocol", "src",
                                                   "dst", "sport", "dport"};
    for (int i = 0; i < K_COUNT; i++) {
        if (i == K_SRC || i == K_DST)
            continue;
        if (as_u64(self, PyTuple_GET_ITEM(key, i), key_names[i], &in->key[i]) < 0)
            return -1;
    }
    if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(key, K_SRC), (char **)&in->src, &in->src_len) < 0 ||
        PyBytes_AsStringAndSize(PyTuple_GET_ITEM(key, K_DST), (char **)&in->dst, &in->dst_len) < 0)
        return -1;
    if (self->routes_src &&
        !(in->src_route = lookup_route(self, in->slot[R_NETNS], PyTuple_GET_ITEM(key, K_SRC))))
        return -1;
    if (self->routes_dst &&
        !(in->dst_route = lookup_route(self, in->slot[R_NETNS], PyTuple_GET_ITEM(key, K_DST))))
        return -1;
    if (self->pods_src && !(in->src_pod = lookup_pod(self, PyTuple_GET_ITEM(key, K_SRC), in->slot[R_END])))
        return -1;
    if (self->pods_dst && !(in->dst_pod = lookup_pod(self, PyTuple_GET_ITEM(key, K_DST), in->slot[R_END])))
        return -1;
    return 0;
}

/* item ``index`` of a route or pod tuple (any sequence), as a new reference */
static PyObject *
item(PyObject *sequence, Py_ssize_t index)
{
    if (PyTuple_Check(sequence) && index < PyTuple_GET_SIZE(sequence)) {
        PyObject *value = PyTuple_GET_ITEM(sequence, index);
        Py_INCREF(value);
        return value;
    }
    return PySequence_GetItem(sequence, index);
}

/* Room for ``more`` octets after what is used. */
static int
ensure(Buffer *out, Py_ssize_t more)
{
    if (out->used + more <= out->capacity)
        return 0;
    Py_ssize_t capacity = out->capacity ? out->capacity : 1024;
    while (capacity < out->used + more)
        capacity *= 2;
    char *data = PyMem_Realloc(out->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->capacity = capacity;
    return 0;
}

#define IS_ICMP(in) ((in)->key[K_PROTOCOL] == 1 || (in)->key[K_PROTOCOL] == 58)
#define NTP_SECONDS(ns) ((((ns) / 1000000000ULL + 2208988800ULL) & 0xFFFFFFFFULL) << 32)

static int
integer_value(Packer *self, const Step *s, Inputs *in, unsigned long long *out)
{
    unsigned long long start = in->value[R_START], end = in->value[R_END], rest;
    PyObject *route, *prefix;
    switch (s->op) {
    case V_CONST: *out = s->arg; return 0;
    case V_PACKETS: *out = in->value[R_PACKETS]; return 0;
    case V_OCTETS: *out = in->value[R_OCTETS]; return 0;
    case V_TCP_FLAGS: *out = in->value[R_TCP_FLAGS]; return 0;
    case V_TOS: *out = in->value[R_TOS]; return 0;
    case V_DSCP: *out = in->value[R_TOS] >> 2; return 0;
    case V_MIN_TTL: *out = in->value[R_MIN_TTL]; return 0;
    case V_MAX_TTL: *out = in->value[R_MAX_TTL]; return 0;
    case V_VLAN: *out = in->value[R_VLAN]; return 0;
    case V_INNER_VLAN: *out = in->value[R_INNER_VLAN]; return 0;
    case V_END_REASON: *out = in->value[R_END_REASON]; return 0;
    case V_FRAGMENT: *out = in->value[R_FRAGMENT]; return 0;
    case V_OBS_POINT: *out = in->value[R_OBS_POINT]; return 0;
    case V_START_MS: *out = start / 1000000ULL; return 0;
    case V_END_MS: *out = end / 1000000ULL; return 0;
    case V_START_S: *out = start / 1000000000ULL; return 0;
    case V_END_S: *out = end / 1000000000ULL; return 0;
    case V_START_NTP: case V_END_NTP:
        start = s->op == V_START_NTP ? start : end;
        *out = NTP_SECONDS(start) | (((start % 1000000000ULL) << 32) / 1000000000ULL);
        return 0;
    case V_START_NTP_US: case V_END_NTP_US:
        start = s->op == V_START_NTP_US ? start : end;
        rest = start % 1000000000ULL;
        *out = NTP_SECONDS(start) | ((((rest - rest % 1000) << 32) / 1000000000ULL) & 0xFFFFF800ULL);
        return 0;
    case V_START_UPTIME: *out = (start / 1000000ULL - self->init_ms) & 0xFFFFFFFFULL; return 0;
    case V_END_UPTIME: *out = (end / 1000000ULL - self->init_ms) & 0xFFFFFFFFULL; return 0;
    case V_IP_VERSION: *out = in->key[K_IP_VERSION]; return 0;
    case V_DIRECTION: *out = in->key[K_DIRECTION]; return 0;
    case V_PROTOCOL: *out = in->key[K_PROTOCOL]; return 0;
    case V_INGRESS: *out = in->key[K_DIRECTION] ? 0 : in->key[K_IFINDEX]; return 0;
    case V_EGRESS: *out = in->key[K_DIRECTION] ? in->key[K_IFINDEX] : 0; return 0;
    case V_SPORT: *out = IS_ICMP(in) ? 0 : in->key[K_SPORT]; return 0;
    case V_DPORT: *out = IS_ICMP(in) ? 0 : in->key[K_DPORT]; return 0;
    case V_ICMP4: *out = in->key[K_PROTOCOL] == 1 ? in->key[K_DPORT] : 0; return 0;
    case V_ICMP6: *out = in->key[K_PROTOCOL] == 58 ? in->key[K_DPORT] : 0; return 0;
    case V_FORWARDING: *out = in->key[K_DIRECTION] ? 64 : 0; return 0;
    case V_SRC_PREFIX: case V_DST_PREFIX:
        if (s->arg && in->key[K_IP_VERSION] != s->arg) {
            *out = 0;
            return 0;
        }
        route = s->op == V_SRC_PREFIX ? in->src_route : in->dst_route;
        if ((prefix = item(route, 0)) == NULL)
            return -1;
        int rc = as_u64(self, prefix, "prefix length", out);
        Py_DECREF(prefix);
        return rc;
    }
    PyErr_Format(PyExc_SystemError, "Packer: op %d has no integer value", s->op);
    return -1;
}

/* Bytes of a byte step: borrowed pointer and length; *owner (if set) must be released by the caller. */
static int
bytes_value(Packer *self, const Step *s, Inputs *in, const char **data, Py_ssize_t *size, PyObject **owner)
{
    PyObject *value = NULL;
    *owner = NULL;
    switch (s->op) {
    case B_ZERO:
        *data = "", *size = 0;
        return 0;
    case B_SRC: case B_DST:
        if (s->arg && in->key[K_IP_VERSION] != s->arg) {
            *data = "", *size = 0;
        } else if (s->op == B_SRC) {
            *data = in->src, *size = in->src_len;
        } else {
            *data = in->dst, *size = in->dst_len;
        }
        return 0;
    case B_NEXT_HOP:
        if (s->arg && in->key[K_IP_VERSION] != s->arg) {
            *data = "", *size = 0;
            return 0;
        }
        value = item(in->dst_route, 1);
        break;
    case B_INTERFACE_NAME: case B_NETNS:
        *data = PyUnicode_AsUTF8AndSize(in->slot[s->op == B_NETNS ? R_NETNS : R_INTERFACE_NAME], size);
        return *data == NULL ? -1 : 0;
    case B_SRC_POD: case B_DST_POD:
        value = item(s->op == B_SRC_POD ? in->src_pod : in->dst_pod, (Py_ssize_t)s->arg);
        break;
    default:
        PyErr_Format(PyExc_SystemError, "Packer: op %d has no bytes value", s->op);
        return -1;
    }
    if (value == NULL)
        return -1;
    *owner = value;
    if (!PyBytes_Check(value)) {
        PyErr_SetString(self->struct_error, "argument for 's' must be a bytes object");
        return -1;
    }
    *data = PyBytes_AS_STRING(value);
    *size = PyBytes_GET_SIZE(value);
    return 0;
}

static PyObject *
pack_record(Packer *self, Inputs *in, Buffer *buffer)
{
    buffer->used = 0;
    for (Py_ssize_t i = 0; i < self->nsteps; i++) {
        const Step *s = &self->steps[i];
        if (s->kind == KIND_INT) {
            unsigned long long value;
            if (integer_value(self, s, in, &value) < 0)
                return NULL;
            if (s->length < 8 && value >> (8 * s->length)) {
                PyErr_Format(self->struct_error, "step %zd: value %llu does not fit %zd octets", i, value, s->length);
                return NULL;
            }
            if (ensure(buffer, 8) < 0)
                return NULL;
            unsigned char *out = (unsigned char *)buffer->data + buffer->used;
            for (Py_ssize_t b = s->length - 1; b >= 0; b--, value >>= 8)
                out[b] = (unsigned char)value;
            buffer->used += s->length;
            continue;
        }
        const char *data;
        Py_ssize_t size;
        PyObject *owner;
        if (bytes_value(self, s, in, &data, &size, &owner) < 0) {
            Py_XDECREF(owner);
            return NULL;
        }
        if (s->kind == KIND_BYTES) {  /* struct's "Ns": truncated or padded with zeros */
            if (ensure(buffer, s->length) < 0) {
                Py_XDECREF(owner);
                return NULL;
            }
            Py_ssize_t copy = size < s->length ? size : s->length;
            memcpy(buffer->data + buffer->used, data, copy);
            memset(buffer->data + buffer->used + copy, 0, s->length - copy);
            buffer->used += s->length;
        } else {  /* RFC 7011 7: 1-octet length below 255, else 255 and a 2-octet length */
            if (size > 65535)
                size = 65535;
            if (ensure(buffer, 3 + size) < 0) {
                Py_XDECREF(owner);
                return NULL;
            }
            unsigned char *out = (unsigned char *)buffer->data + buffer->used;
            if (size < 255) {
                *out = (unsigned char)size;
                buffer->used += 1;
            } else {
                out[0] = 255, out[1] = (unsigned char)(size >> 8), out[2] = (unsigned char)size;
                buffer->used += 3;
            }
            memcpy(buffer->data + buffer->used, data, size);
            buffer->used += size;
        }
        Py_XDECREF(owner);
    }
    return PyBytes_FromStringAndSize(buffer->data, buffer->used);
}

static PyObject *
Packer_call(Packer *self, PyObject *args, PyObject *kwds)
{
    PyObject *items;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Packer takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:Packer", &items))
        return NULL;
    PyObject *fast = PySequence_Fast(items, "Packer: records must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *result = PyList_New(n);
    if (result == NULL) {
        Py_DECREF(fast);
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        Inputs in;
        memset(&in, 0, sizeof in);
        PyObject *packed = NULL;
        if (read_inputs(self, PySequence_Fast_GET_ITEM(fast, i), &in) == 0)
            packed = pack_record(self, &in, &buffer);
        release(&in);
        if (packed == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, packed);
    }
    PyMem_Free(buffer.data);
    Py_DECREF(fast);
    return result;
}

static PyTypeObject PackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kipfix.agent.export.ipfix._flowpack.Packer",
    .tp_doc = "Packer(program, record_type, init_ms, route, route_cache, pod_table, pod_lookup, no_pod, "
              "struct_error)(records) -> [record bytes]",
    .tp_basicsize = sizeof(Packer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Packer_init,
    .tp_dealloc = (destructor)Packer_dealloc,
    .tp_call = (ternaryfunc)Packer_call,
};

/* Opcodes and kinds by name, for flowpack.py (module constants of the same names). */
#define CONSTANT(name) {#name, name}
static const struct { const char *name; int value; } constants[] = {
    CONSTANT(V_CONST), CONSTANT(V_PACKETS), CONSTANT(V_OCTETS), CONSTANT(V_TCP_FLAGS), CONSTANT(V_TOS),
    CONSTANT(V_DSCP), CONSTANT(V_MIN_TTL), CONSTANT(V_MAX_TTL), CONSTANT(V_VLAN), CONSTANT(V_INNER_VLAN),
    CONSTANT(V_END_REASON), CONSTANT(V_FRAGMENT), CONSTANT(V_START_MS), CONSTANT(V_END_MS),
    CONSTANT(V_START_S), CONSTANT(V_END_S), CONSTANT(V_START_NTP), CONSTANT(V_END_NTP),
    CONSTANT(V_START_NTP_US), CONSTANT(V_END_NTP_US), CONSTANT(V_START_UPTIME), CONSTANT(V_END_UPTIME),
    CONSTANT(V_IP_VERSION), CONSTANT(V_DIRECTION), CONSTANT(V_PROTOCOL), CONSTANT(V_INGRESS),
    CONSTANT(V_EGRESS), CONSTANT(V_SPORT), CONSTANT(V_DPORT), CONSTANT(V_ICMP4), CONSTANT(V_ICMP6),
    CONSTANT(V_FORWARDING), CONSTANT(V_OBS_POINT), CONSTANT(V_SRC_PREFIX), CONSTANT(V_DST_PREFIX), CONSTANT(B_SRC), CONSTANT(B_DST),
    CONSTANT(B_NEXT_HOP), CONSTANT(B_ZERO), CONSTANT(B_INTERFACE_NAME), CONSTANT(B_NETNS),
    CONSTANT(B_SRC_POD), CONSTANT(B_DST_POD), CONSTANT(KIND_INT), CONSTANT(KIND_BYTES), CONSTANT(KIND_VARLEN),
};
#undef CONSTANT

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_flowpack", "IPFIX data-record encoder (see flowpack.py).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__flowpack(void)
{
    if (PyType_Ready(&PackerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PackerType);
    if (PyModule_AddObject(m, "Packer", (PyObject *)&PackerType) < 0) {
        Py_DECREF(&PackerType);
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
