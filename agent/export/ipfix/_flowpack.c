/*
 * kipfix.agent.export.ipfix._flowpack: the data-record encoder, in C.
 *
 * It knows no element. flowpack.py translates each element's value from the
 * element table (a source and transforms, values.py) into a step: where the
 * value comes from (a constant, a record attribute, a key item, an item of a
 * per-record lookup), the key items it is kept for (guards), integer
 * operations, the wire format, and the length and kind written. A Packer is
 * built once per template and address family from those steps; called with a
 * sequence of records it returns one bytes object per record, exactly what
 * the Python packer (pypack.py, the reference) returns; tests/test_flowpack.py
 * and tests/test_element_table.py compare the two for every element.
 *
 * It exists because the Python packer tops out near 350,000 records/s for a
 * 47-element template; this one reads each record's attributes once and
 * writes the fields straight into a buffer. Out-of-range values raise
 * struct.error, as struct.pack does, except in a reduced-size field
 * (RFC 7011 6.2), where a value too large is sent as the largest the field
 * holds and counted (Packer.saturated).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* What a step writes. */
enum { KIND_INT = 0, KIND_BYTES = 1, KIND_VARLEN = 2 };
/* Where its value comes from. S_CONST: ``constant`` for integers, no octets for byte kinds. */
enum { S_CONST = 0, S_SLOT, S_KEY, S_LOOKUP };
/* Integer operations, in order; then the wire format of the element's type. */
enum { OP_DIV = 1, OP_SHR, OP_SUB, OP_AND };
enum { F_PLAIN = 0, F_NTP_US, F_NTP };
/* Per-record lookups: (netns, address) -> route, address -> pod (at the flow's end), record -> anything. */
enum { L_ROUTE = 0, L_POD, L_CALL };

#define MAX_SLOTS 32
#define MAX_KEY 16
#define MAX_LOOKUPS 8
#define MAX_GUARDS 2
#define MAX_GUARD_VALUES 4
#define MAX_OPS 4

typedef struct {
    int item, negate, nvalues;
    unsigned long long values[MAX_GUARD_VALUES];
} Guard;

typedef struct {
    int op;
    unsigned long long arg;
} Operation;

typedef struct {
    /* what every record reads first: one cache line */
    int kind, source, index;           /* index: of the slot, key item or lookup */
    int nguards, nops, format, saturate;
    Py_ssize_t length;
    Py_ssize_t item;                   /* item of the lookup's result */
    unsigned long long constant;
    unsigned long long limit;          /* the largest value ``length`` octets hold */
    /* then what few steps have */
    unsigned long long saturated;      /* values sent as ``limit`` because they were larger */
    Guard guards[MAX_GUARDS];
    Operation ops[MAX_OPS];
} Step;

typedef struct {
    int kind, key_item, slot;          /* slot: netns (route) or end_ns (pod) */
    PyObject *function, *table;        /* table: the route cache, or the pod dict (None: call function) */
} Lookup;

typedef struct {
    PyObject_HEAD
    Step *steps;
    Py_ssize_t nsteps;
    Py_ssize_t fixed_size;             /* octets of a record without variable-length content */
    int nslots, nlookups, key_size;
    unsigned int_slots;                /* bit per slot read as an integer */
    unsigned key_ints, key_octets;     /* bit per key item read as an integer, as octets */
    PyObject *slot_names[MAX_SLOTS];   /* slot 0 is the record's key */
    const char *slot_text[MAX_SLOTS];  /* the same, for messages */
    Py_ssize_t offsets[MAX_SLOTS];     /* -1: read with getattr */
    Lookup lookups[MAX_LOOKUPS];
    PyTypeObject *record_type;         /* whose slot offsets are cached */
    PyObject *no_pod, *struct_error;
} Packer;

/* The record being written; one per call, since lookups run Python code that may call us again. */
typedef struct {
    char *data;
    Py_ssize_t used, capacity;
} Buffer;

/* One record's inputs, read once. Object references are owned: lookups run Python code meanwhile,
 * and getattr may compute a value afresh at every read. */
typedef struct {
    PyObject *slot[MAX_SLOTS];
    unsigned long long value[MAX_SLOTS];
    unsigned long long key[MAX_KEY];
    const char *key_data[MAX_KEY];
    Py_ssize_t key_length[MAX_KEY];
    PyObject *lookup[MAX_LOOKUPS];
} Inputs;

static void
Packer_dealloc(Packer *self)
{
    PyMem_Free(self->steps);
    for (int i = 0; i < self->nslots; i++)
        Py_XDECREF(self->slot_names[i]);
    for (int i = 0; i < self->nlookups; i++) {
        Py_XDECREF(self->lookups[i].function);
        Py_XDECREF(self->lookups[i].table);
    }
    Py_XDECREF(self->record_type);
    Py_XDECREF(self->no_pod);
    Py_XDECREF(self->struct_error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
invalid(const char *what, Py_ssize_t index)
{
    PyErr_Format(PyExc_ValueError, "Packer: %s %zd is not valid", what, index);
    return -1;
}

/* step: (source, index, item, constant, guards, ops, format, length, kind, saturate),
 * guards: ((key item, negate, (values...)), ...), ops: ((op, argument), ...) */
static int
parse_step(Packer *self, PyObject *tuple, Step *s, Py_ssize_t i)
{
    PyObject *guards, *ops;
    if (!PyArg_ParseTuple(tuple, "iinKOOinip:step", &s->source, &s->index, &s->item, &s->constant, &guards,
                          &ops, &s->format, &s->length, &s->kind, &s->saturate))
        return -1;
    if (!PyTuple_Check(guards) || PyTuple_GET_SIZE(guards) > MAX_GUARDS || !PyTuple_Check(ops) ||
        PyTuple_GET_SIZE(ops) > MAX_OPS)
        return invalid("step", i);
    s->nguards = (int)PyTuple_GET_SIZE(guards);
    for (int g = 0; g < s->nguards; g++) {
        Guard *guard = &s->guards[g];
        PyObject *values;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(guards, g), "iiO!:guard", &guard->item, &guard->negate,
                              &PyTuple_Type, &values))
            return -1;
        guard->nvalues = (int)PyTuple_GET_SIZE(values);
        if (guard->item < 0 || guard->item >= MAX_KEY || guard->nvalues > MAX_GUARD_VALUES)
            return invalid("step", i);
        for (int v = 0; v < guard->nvalues; v++) {
            guard->values[v] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(values, v));
            if (PyErr_Occurred())
                return -1;
        }
        self->key_ints |= 1u << guard->item;
    }
    s->nops = (int)PyTuple_GET_SIZE(ops);
    for (int o = 0; o < s->nops; o++) {
        Operation *op = &s->ops[o];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(ops, o), "iK:operation", &op->op, &op->arg))
            return -1;
        if (op->op < OP_DIV || op->op > OP_AND || (op->op == OP_DIV && op->arg == 0) ||
            (op->op == OP_SHR && op->arg > 63))
            return invalid("step", i);
    }
    int integer = s->kind == KIND_INT;
    if (s->kind < KIND_INT || s->kind > KIND_VARLEN || s->format < F_PLAIN || s->format > F_NTP ||
        (integer ? s->length < 1 || s->length > 8 : s->length < 0 || s->length > 65535) ||
        ((s->nops || s->format) && !integer) || (s->saturate && !integer))
        return invalid("step", i);
    s->limit = s->length >= 8 ? ~0ULL : (1ULL << (8 * s->length)) - 1;
    switch (s->source) {
    case S_CONST:
        break;
    case S_SLOT:
        if (s->index < 1 || s->index >= self->nslots)
            return invalid("step", i);
        if (integer)
            self->int_slots |= 1u << s->index;
        break;
    case S_KEY:
        if (s->index < 0 || s->index >= MAX_KEY)
            return invalid("step", i);
        if (integer)
            self->key_ints |= 1u << s->index;
        else
            self->key_octets |= 1u << s->index;
        break;
    case S_LOOKUP:
        if (s->index < 0 || s->index >= self->nlookups || s->item < 0)
            return invalid("step", i);
        break;
    default:
        return invalid("step", i);
    }
    return 0;
}

/* lookup: (kind, function, table, key item, slot) */
static int
parse_lookup(Packer *self, PyObject *tuple, Lookup *l, Py_ssize_t i)
{
    PyObject *function, *table;
    if (!PyArg_ParseTuple(tuple, "iOOii:lookup", &l->kind, &function, &table, &l->key_item, &l->slot))
        return -1;
    int sided = l->kind == L_ROUTE || l->kind == L_POD;
    if (l->kind < L_ROUTE || l->kind > L_CALL ||
        (sided && (l->key_item < 0 || l->key_item >= MAX_KEY || l->slot < 1 || l->slot >= self->nslots)) ||
        (l->kind == L_ROUTE && (!PyCallable_Check(function) || !PyDict_Check(table))) ||
        (l->kind == L_POD && (table == Py_None ? !PyCallable_Check(function) : !PyDict_Check(table))) ||
        (l->kind == L_CALL && !PyCallable_Check(function)))
        return invalid("lookup", i);
    Py_INCREF(function);
    l->function = function;
    Py_INCREF(table);
    l->table = table;
    return 0;
}

/* Packer(steps, slots, lookups, record_type, no_pod, struct_error); slots[0] must be "key". */
static int
Packer_init(Packer *self, PyObject *args, PyObject *kwds)
{
    PyObject *steps, *slots, *lookups, *record_type, *no_pod, *struct_error;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O:Packer", &PyTuple_Type, &steps, &PyTuple_Type, &slots, &PyTuple_Type,
                          &lookups, &PyType_Type, &record_type, &PyTuple_Type, &no_pod, &struct_error))
        return -1;
    if (self->record_type != NULL) {
        PyErr_SetString(PyExc_TypeError, "Packer is initialised once");
        return -1;
    }
    Py_INCREF(record_type);
    self->record_type = (PyTypeObject *)record_type;
    Py_INCREF(no_pod);
    self->no_pod = no_pod;
    Py_INCREF(struct_error);
    self->struct_error = struct_error;
    if (PyTuple_GET_SIZE(slots) < 1 || PyTuple_GET_SIZE(slots) > MAX_SLOTS ||
        PyTuple_GET_SIZE(lookups) > MAX_LOOKUPS) {
        PyErr_SetString(PyExc_ValueError, "Packer: too many slots or lookups");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        PyObject *name = PyTuple_GET_ITEM(slots, i);
        if (!PyUnicode_Check(name) || (i == 0 && PyUnicode_CompareWithASCIIString(name, "key") != 0))
            return invalid("slot", i);
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        self->slot_names[self->nslots++] = name;
        if ((self->slot_text[i] = PyUnicode_AsUTF8(name)) == NULL)
            return -1;
        /* A __slots__ member holding an object: read it at its offset, not through getattr. */
        self->offsets[i] = -1;
        PyObject *descr = PyObject_GetAttr(record_type, name);
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
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lookups); i++) {
        if (parse_lookup(self, PyTuple_GET_ITEM(lookups, i), &self->lookups[self->nlookups], i) < 0)
            return -1;
        self->nlookups++;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(steps);
    self->steps = PyMem_Calloc(n ? n : 1, sizeof(Step));
    if (self->steps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nsteps = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_step(self, PyTuple_GET_ITEM(steps, i), &self->steps[i], i) < 0)
            return -1;
        self->fixed_size += self->steps[i].kind == KIND_VARLEN ? 3 : self->steps[i].length;
    }
    for (int k = MAX_KEY - 1; k >= 0; k--)
        if (((self->key_ints | self->key_octets) >> k) & 1) {
            self->key_size = k + 1;
            break;
        }
    for (int l = 0; l < self->nlookups; l++)
        if (self->lookups[l].kind != L_CALL && self->lookups[l].key_item >= self->key_size)
            self->key_size = self->lookups[l].key_item + 1;
    return 0;
}

/* A new reference to the record's slot ``i``: read at its offset when the record is of the cached type. */
static PyObject *
read_slot(Packer *self, PyObject *record, int i)
{
    if (self->offsets[i] >= 0 && Py_TYPE(record) == self->record_type) {
        PyObject *value = *(PyObject **)((char *)record + self->offsets[i]);
        if (value == NULL)
            PyErr_Format(PyExc_AttributeError, "record has no %U", self->slot_names[i]);
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
lookup_route(const Lookup *l, PyObject *netns, PyObject *address)
{
    PyObject *key = PyTuple_Pack(2, netns, address);
    if (key == NULL)
        return NULL;
    PyObject *hit = PyDict_GetItemWithError(l->table, key);
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
    return PyObject_CallFunctionObjArgs(l->function, netns, address, NULL);
}

/* The encoded values of the pod owning ``address`` when the flow ended: table.get(address, NOPOD), or
 * function(address) when there is no table; a value that is no tuple (an IP's recent owners,
 * podmeta.Succession) is called with ``end_ns``. */
static PyObject *
lookup_pod(Packer *self, const Lookup *l, PyObject *address, PyObject *end_ns)
{
    PyObject *pod;
    if (l->table != Py_None) {
        pod = PyDict_GetItemWithError(l->table, address);
        if (pod == NULL) {
            if (PyErr_Occurred())
                return NULL;
            pod = self->no_pod;
        }
        Py_INCREF(pod);
    } else {
        pod = PyObject_CallOneArg(l->function, address);
    }
    if (pod == NULL || PyTuple_CheckExact(pod))
        return pod;
    PyObject *owner = PyObject_CallOneArg(pod, end_ns);
    Py_DECREF(pod);
    return owner;
}

static void
release(Packer *self, Inputs *in)
{
    for (int i = 0; i < self->nslots; i++)
        Py_CLEAR(in->slot[i]);
    for (int i = 0; i < self->nlookups; i++)
        Py_CLEAR(in->lookup[i]);
}

static int
read_inputs(Packer *self, PyObject *record, Inputs *in)
{
    for (int i = 0; i < self->nslots; i++) {
        PyObject *value = read_slot(self, record, i);
        if (value == NULL)
            return -1;
        in->slot[i] = value;
        if (((self->int_slots >> i) & 1) &&
            as_u64(self, value, self->slot_text[i], &in->value[i]) < 0)
            return -1;
    }
    PyObject *key = in->slot[0];
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) < self->key_size) {
        PyErr_SetString(PyExc_TypeError, "record key must be a FlowKey");
        return -1;
    }
    for (int k = 0; k < self->key_size; k++) {
        if (((self->key_ints >> k) & 1) && as_u64(self, PyTuple_GET_ITEM(key, k), "key item", &in->key[k]) < 0)
            return -1;
        if (((self->key_octets >> k) & 1) &&
            PyBytes_AsStringAndSize(PyTuple_GET_ITEM(key, k), (char **)&in->key_data[k], &in->key_length[k]) < 0)
            return -1;
    }
    for (int i = 0; i < self->nlookups; i++) {
        const Lookup *l = &self->lookups[i];
        if (l->kind == L_ROUTE)
            in->lookup[i] = lookup_route(l, in->slot[l->slot], PyTuple_GET_ITEM(key, l->key_item));
        else if (l->kind == L_POD)
            in->lookup[i] = lookup_pod(self, l, PyTuple_GET_ITEM(key, l->key_item), in->slot[l->slot]);
        else
            in->lookup[i] = PyObject_CallOneArg(l->function, record);
        if (in->lookup[i] == NULL)
            return -1;
    }
    return 0;
}

/* item ``index`` of a lookup's result (any sequence), as a new reference */
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

static inline int
guards_hold(const Step *s, const Inputs *in)
{
    for (int g = 0; g < s->nguards; g++) {
        const Guard *guard = &s->guards[g];
        unsigned long long value = in->key[guard->item];
        int found = 0;
        for (int v = 0; v < guard->nvalues; v++)
            found |= value == guard->values[v];
        if (found == guard->negate)
            return 0;
    }
    return 1;
}

static int
integer_value(Packer *self, const Step *s, Inputs *in, unsigned long long *out)
{
    unsigned long long value = 0;
    if (guards_hold(s, in)) {
        switch (s->source) {
        case S_CONST: value = s->constant; break;
        case S_SLOT: value = in->value[s->index]; break;
        case S_KEY: value = in->key[s->index]; break;
        case S_LOOKUP: {
            PyObject *got = item(in->lookup[s->index], s->item);
            if (got == NULL)
                return -1;
            int rc = as_u64(self, got, "lookup item", &value);
            Py_DECREF(got);
            if (rc < 0)
                return -1;
            break;
        }
        }
        for (int o = 0; o < s->nops; o++) {
            unsigned long long arg = s->ops[o].arg;
            switch (s->ops[o].op) {
            case OP_DIV: value /= arg; break;
            case OP_SHR: value >>= arg; break;
            case OP_SUB: value -= arg; break;  /* wraps like Python's negative & mask does */
            case OP_AND: value &= arg; break;
            }
        }
    }
    /* dateTimeMicroseconds from microseconds, dateTimeNanoseconds from nanoseconds (RFC 7011 6.1.9-10) */
    if (s->format == F_NTP_US)
        value = (((value / 1000000ULL + 2208988800ULL) & 0xFFFFFFFFULL) << 32) |
                ((((value % 1000000ULL) << 32) / 1000000ULL) & 0xFFFFF800ULL);
    else if (s->format == F_NTP)
        value = (((value / 1000000000ULL + 2208988800ULL) & 0xFFFFFFFFULL) << 32) |
                (((value % 1000000000ULL) << 32) / 1000000000ULL);
    *out = value;
    return 0;
}

/* Octets of a byte step: borrowed pointer and length; *owner (if set) must be released by the caller. */
static int
bytes_value(Packer *self, const Step *s, Inputs *in, const char **data, Py_ssize_t *size, PyObject **owner)
{
    PyObject *value;
    *owner = NULL;
    if (s->source == S_CONST || !guards_hold(s, in)) {
        *data = "", *size = 0;
        return 0;
    }
    if (s->source == S_KEY) {
        *data = in->key_data[s->index], *size = in->key_length[s->index];
        return 0;
    }
    if (s->source == S_SLOT) {
        value = in->slot[s->index];
    } else {
        value = *owner = item(in->lookup[s->index], s->item);
        if (value == NULL)
            return -1;
    }
    if (PyBytes_Check(value)) {
        *data = PyBytes_AS_STRING(value);
        *size = PyBytes_GET_SIZE(value);
        return 0;
    }
    if (PyUnicode_Check(value)) {
        *data = PyUnicode_AsUTF8AndSize(value, size);
        return *data == NULL ? -1 : 0;
    }
    PyErr_SetString(self->struct_error, "argument for 's' must be a bytes object");
    return -1;
}

static PyObject *
pack_record(Packer *self, Inputs *in, Buffer *buffer)
{
    buffer->used = 0;
    if (ensure(buffer, self->fixed_size) < 0)  /* then only variable-length content asks for more */
        return NULL;
    for (Py_ssize_t i = 0; i < self->nsteps; i++) {
        Step *s = &self->steps[i];
        if (s->kind == KIND_INT) {
            unsigned long long value;
            if (integer_value(self, s, in, &value) < 0)
                return NULL;
            if (value > s->limit) {
                if (!s->saturate) {
                    PyErr_Format(self->struct_error, "step %zd: value %llu does not fit %zd octets", i, value,
                                 s->length);
                    return NULL;
                }
                value = s->limit;
                s->saturated++;
            }
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
            Py_ssize_t copy = size < s->length ? size : s->length;
            memcpy(buffer->data + buffer->used, data, copy);
            memset(buffer->data + buffer->used + copy, 0, s->length - copy);
            buffer->used += s->length;
        } else {  /* RFC 7011 7: 1-octet length below 255, else 255 and a 2-octet length */
            if (size > 65535)
                size = 65535;
            if (ensure(buffer, size + self->fixed_size) < 0) {  /* room for the rest of the record too */
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
    if (self->steps == NULL) {
        PyErr_SetString(PyExc_TypeError, "Packer is not initialised");
        return NULL;
    }
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
    Inputs in;
    memset(&in, 0, sizeof in);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *packed = NULL;
        if (read_inputs(self, PySequence_Fast_GET_ITEM(fast, i), &in) == 0)
            packed = pack_record(self, &in, &buffer);
        release(self, &in);
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

static PyObject *
Packer_saturated(Packer *self, void *closure)
{
    PyObject *counts = PyTuple_New(self->nsteps);
    if (counts == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nsteps; i++) {
        PyObject *count = PyLong_FromUnsignedLongLong(self->steps[i].saturated);
        if (count == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyTuple_SET_ITEM(counts, i, count);
    }
    return counts;
}

static PyGetSetDef Packer_getset[] = {
    {"saturated", (getter)Packer_saturated, NULL,
     "per step: values sent as the largest a reduced-size field holds because they were larger", NULL},
    {NULL},
};

static PyTypeObject PackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kipfix.agent.export.ipfix._flowpack.Packer",
    .tp_doc = "Packer(steps, slots, lookups, record_type, no_pod, struct_error)(records) -> [record bytes]",
    .tp_basicsize = sizeof(Packer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Packer_init,
    .tp_dealloc = (destructor)Packer_dealloc,
    .tp_call = (ternaryfunc)Packer_call,
    .tp_getset = Packer_getset,
};

/* Codes by name, for flowpack.py (module constants of the same names). */
#define CONSTANT(name) {#name, name}
static const struct { const char *name; int value; } constants[] = {
    CONSTANT(KIND_INT), CONSTANT(KIND_BYTES), CONSTANT(KIND_VARLEN),
    CONSTANT(S_CONST), CONSTANT(S_SLOT), CONSTANT(S_KEY), CONSTANT(S_LOOKUP),
    CONSTANT(OP_DIV), CONSTANT(OP_SHR), CONSTANT(OP_SUB), CONSTANT(OP_AND),
    CONSTANT(F_PLAIN), CONSTANT(F_NTP_US), CONSTANT(F_NTP),
    CONSTANT(L_ROUTE), CONSTANT(L_POD), CONSTANT(L_CALL),
    CONSTANT(MAX_SLOTS), CONSTANT(MAX_KEY), CONSTANT(MAX_LOOKUPS), CONSTANT(MAX_GUARDS),
    CONSTANT(MAX_GUARD_VALUES), CONSTANT(MAX_OPS),
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
