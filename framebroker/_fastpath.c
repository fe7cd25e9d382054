/* The frame path in compiled code: one call per frame on each side of the ring.
 *
 * The protocol is the one framebroker/_ring.py describes; this file carries its per-frame steps
 * out of the interpreter, because after a frame period of idling every Python-level step runs
 * cold and costs several microseconds (bench/cold_calls.py). Everything else (attaching, the
 * reader table, moving to a new segment, liveness) stays in Python.
 *
 * ReaderPath (one per Attachment): take() is steps 1-4 of "Leasing a frame" (HEAD read, the
 *   try-lock, the seq check, the Frame with its view), release() is step 5, wait() sleeps on
 *   the header's wake word (FUTEX_WAIT) until the producer bumps it.
 * ProducerPath (one per segment a Publisher writes): commit() is steps 2-6 of "Publishing"
 *   (metadata record, the unlock that publishes, map and HEAD stores, the change bytes, the
 *   wake-ups) with the slot bookkeeping and step 1 for the next frame (the lock-ahead).
 * broadcast(control): bump the wake word and wake every reader waiting on it.
 * copy_frame(destination, source): Publisher.publish's copy into a slot, with non-temporal stores
 *   for frames larger than the core's L2 cache (x86-64).
 *
 * framebroker/_fast.py chooses between this and the pure-Python path and checks, when it loads
 * this module, that LAYOUT below matches framebroker/_layout.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring's layout is little-endian (x86_64, aarch64); this machine is not"
#endif
#ifndef F_OFD_SETLK
#define F_OFD_SETLK 37 /* Linux 3.15+; older C libraries lack the name */
#endif

/* --- the layout (framebroker/_layout.py; _fast.py compares LAYOUT with it) -------------------- */

#define LIVE_OFFSET 320
#define WAKE_OFFSET (LIVE_OFFSET + 148)
#define PRODUCER_WAITS_OFFSET (LIVE_OFFSET + 112) /* lockstep: readers post the producer's semaphore */
#define META_RECORD_SIZE 64
#define LOCK_SLOT_BASE 1024
#define MAX_SLOTS 256
#define NO_FRAME 0xFFFFFFFFu
#define STATE_STREAMING 2
#define STATE_ENDED 5
#define STATE_REPLACED 6
#define MODE_LIVE 1
#define MODE_NEXT 2
#define MODE_ORDERED 3
#define ENTRY_PROGRESS_OFFSET 24 /* in a reader's entry: last_seq, cursor, frames, dropped, held */
#define ENTRY_CURSOR_OFFSET (ENTRY_PROGRESS_OFFSET + 8)
#define ENTRY_HELD_OFFSET 56
#define ENTRY_RATE_OFFSET 64 /* fps, last_frame_wall */
#define CHANGES_RUN_MAX 512    /* growth request + one change byte per entry, with room to spare */
#define MAX_PENDING_WAKES 1    /* framebroker/_ring.py */

/* HEAD and the frame counters after it (FRAME_COUNTERS, "<QIIQd"). */
struct head {
    uint64_t newest_seq;
    uint32_t slot;
    uint32_t state;
    uint64_t timestamp_ns;
    double wall;
};

/* A slot's metadata record (META, "<QQdIIIIQ"). */
struct meta_record {
    uint64_t seq;
    uint64_t timestamp_ns;
    double wall;
    uint32_t height;
    uint32_t width;
    uint32_t channels;
    uint32_t format;
    uint64_t nbytes;
};

/* A reader's figures for status (ENTRY_PROGRESS_HELD, "<QQQQI"), then its rate (ENTRY_RATE, "<dd"). */
struct progress {
    uint64_t last_seq;
    uint64_t cursor;
    uint64_t frames;
    uint64_t dropped;
    uint32_t held;
};
struct rate {
    double fps;
    double last_frame_wall;
};
/* 36 bytes: the struct's tail padding is not part of the record (the entry's flags follow). */
#define PROGRESS_SIZE (offsetof(struct progress, held) + sizeof(uint32_t))

_Static_assert(sizeof(struct head) == 32, "HEAD and frame counters are 32 bytes");
_Static_assert(PROGRESS_SIZE == 36, "a reader's progress record is 36 bytes");
_Static_assert(sizeof(struct meta_record) == 48, "a metadata record is 48 bytes");

/* The attributes of framebroker._frame.Frame, set in this order. */
enum frame_field {
    F_SEQ, F_TIMESTAMP, F_WALL, F_SHAPE, F_FORMAT, F_DROPPED, F_STREAM, F_SLOT, F_ATTACHMENT, F_VIEW, F_RELEASED, F_COUNT
};
static const char *const frame_field_names[F_COUNT] = {
    "seq", "timestamp_ns", "wall_time", "shape", "format", "dropped", "stream", "_slot", "_attachment", "_view", "_released",
};
static PyObject *frame_fields[F_COUNT];
/* The Reader's attributes take() reads and moves on (framebroker/_reader.py). */
enum reader_field { R_MODE, R_PROGRESS_DUE, R_ORPHANED, R_LAST_SEQ, R_SEEN_NEWEST, R_SEEN_AT, R_HOLD, R_FRAMES, R_DROPPED, R_COUNT };
static const char *const reader_field_names[R_COUNT] = {
    "_mode", "_progress_due", "_orphaned", "_last_seq", "_seen_newest", "_seen_at", "_hold", "_frames", "_dropped",
};
static PyObject *reader_fields[R_COUNT];
static PyObject *str_value, *str_release, *str_refresh_readers, *str_producer_semaphore, *str_bgr, *float_zero;

/* --- system calls ------------------------------------------------------------------------------ */

/* One-byte OFD lock, never waited for: 1 taken, 0 held by someone else, -1 error (errno). */
static int byte_lock(int fd, short type, uint32_t offset)
{
    struct flock lock;
    memset(&lock, 0, sizeof lock);
    lock.l_type = type;
    lock.l_whence = SEEK_SET;
    lock.l_start = (off_t)offset;
    lock.l_len = 1;
    if (fcntl(fd, F_OFD_SETLK, &lock) == 0)
        return 1;
    return (errno == EAGAIN || errno == EACCES) ? 0 : -1;
}

/* Shared futexes (no FUTEX_PRIVATE_FLAG): the word lives in a mapping other processes share. */
static long futex_wait(uint32_t *word, uint32_t expected, const struct timespec *timeout)
{
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, timeout, NULL, 0);
}

static void wake_everyone(char *base)
{
    uint32_t *word = (uint32_t *)(base + WAKE_OFFSET);
    /* The word changes before anyone is woken (a reader about to sleep on its old value then
     * does not sleep), with release: whoever sees the new value sees the HEAD stored before it.
     * One writer (the producer), so a plain increment cannot lose an update. */
    __atomic_store_n(word, __atomic_load_n(word, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int get_control(PyObject *control, Py_buffer *view, Py_ssize_t needed)
{
    if (PyObject_GetBuffer(control, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len < needed) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "the control area is %zd bytes, the layout needs %zd", view->len, needed);
        return -1;
    }
    return 0;
}

/* Let go of a segment's control area and descriptor (the segment is about to close them). */
static void let_go(Py_buffer *control, char **base, int *fd)
{
    if (control->obj != NULL)
        PyBuffer_Release(control);
    *base = NULL;
    *fd = -1;
}

static PyObject *closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "this frame path was closed with its segment");
    return NULL;
}

/* === ReaderPath ================================================================================ */

typedef struct {
    PyObject_HEAD
    Py_buffer control; /* control.obj is NULL once closed */
    char *base;
    int fd;
    int futex;
    uint32_t slot_count;
    Py_ssize_t meta_offset;
    Py_ssize_t map_offset;
    Py_ssize_t entry_offset;
    uint64_t map_mask;
    uint64_t newest; /* HEAD's newest_seq at the last take() */
    uint64_t rate_window_ns;
    double liveness_step; /* the longest a wait in take() lasts before _get looks at the daemon */
    uint64_t rate_mark_ns; /* where this reader's rate window started: when, at which frame count */
    uint64_t rate_mark_frames;
    PyObject *attachment;
    PyObject *held;   /* the Attachment's dict slot -> Frame, oldest first */
    PyObject *view;   /* Attachment.view(slot, shape): builds (and caches) a slot's ndarray */
    PyObject *frame_type;
    Py_ssize_t field_offsets[F_COUNT]; /* where Frame's slots sit in its instances */
    PyObject *format_names;
    PyObject *stream;
    /* The geometry of the last frame, and the views of it: one per slot, made on first use. */
    uint32_t height, width, channels, format;
    PyObject *shape;
    PyObject *format_name;
    PyObject *views[MAX_SLOTS];
} ReaderPath;

static void reader_drop_views(ReaderPath *self)
{
    for (uint32_t k = 0; k < MAX_SLOTS; k++)
        Py_CLEAR(self->views[k]);
    Py_CLEAR(self->shape);
}

static int ReaderPath_clear(ReaderPath *self)
{
    reader_drop_views(self);
    Py_CLEAR(self->format_name);
    Py_CLEAR(self->attachment);
    Py_CLEAR(self->held);
    Py_CLEAR(self->view);
    Py_CLEAR(self->frame_type);
    Py_CLEAR(self->format_names);
    Py_CLEAR(self->stream);
    return 0;
}

static int ReaderPath_traverse(ReaderPath *self, visitproc visit, void *arg)
{
    for (uint32_t k = 0; k < MAX_SLOTS; k++)
        Py_VISIT(self->views[k]);
    Py_VISIT(self->shape);
    Py_VISIT(self->format_name);
    Py_VISIT(self->attachment);
    Py_VISIT(self->held);
    Py_VISIT(self->view);
    Py_VISIT(self->frame_type);
    Py_VISIT(self->format_names);
    Py_VISIT(self->stream);
    return 0;
}

/* The offsets of Frame's __slots__ in its instances, so that a Frame is filled and released
 * without attribute lookups (each a first touch of type caches and descriptors after idling). */
static int find_field_offsets(PyObject *frame_type, Py_ssize_t *offsets)
{
    for (int field = 0; field < F_COUNT; field++) {
        PyObject *descriptor = PyObject_GetAttr(frame_type, frame_fields[field]);
        if (descriptor == NULL)
            return -1;
        int usable = Py_TYPE(descriptor) == &PyMemberDescr_Type &&
                     ((PyMemberDescrObject *)descriptor)->d_member->type == T_OBJECT_EX &&
                     !(((PyMemberDescrObject *)descriptor)->d_member->flags & READONLY);
        if (usable)
            offsets[field] = ((PyMemberDescrObject *)descriptor)->d_member->offset;
        Py_DECREF(descriptor);
        if (!usable) {
            PyErr_Format(PyExc_TypeError, "frame_type.%U must be a __slots__ attribute", frame_fields[field]);
            return -1;
        }
    }
    return 0;
}

static inline PyObject **frame_field(ReaderPath *self, PyObject *frame, enum frame_field field)
{
    return (PyObject **)((char *)frame + self->field_offsets[field]);
}

static void ReaderPath_dealloc(ReaderPath *self)
{
    PyObject_GC_UnTrack(self);
    let_go(&self->control, &self->base, &self->fd);
    ReaderPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ReaderPath_init(ReaderPath *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"control", "fd", "slot_count", "meta_offset", "map_offset", "map_size", "entry_offset",
                               "attachment", "held", "view", "frame_type", "format_names", "stream", "futex",
                               "rate_window_ns", "liveness_step", NULL};
    PyObject *control, *attachment, *held, *view, *frame_type, *format_names, *stream;
    int fd, futex;
    unsigned int slot_count;
    Py_ssize_t meta_offset, map_offset, entry_offset;
    unsigned long long map_size, rate_window_ns;
    double liveness_step;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiInnKnOO!OO!O!UpKd:ReaderPath", keywords, &control, &fd, &slot_count,
                                     &meta_offset, &map_offset, &map_size, &entry_offset, &attachment, &PyDict_Type, &held,
                                     &view, &PyType_Type, &frame_type, &PyDict_Type, &format_names, &stream, &futex,
                                     &rate_window_ns, &liveness_step))
        return -1;
    if (slot_count == 0 || slot_count > MAX_SLOTS || map_size == 0 || (map_size & (map_size - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "implausible ring geometry");
        return -1;
    }
    if (find_field_offsets(frame_type, self->field_offsets) < 0)
        return -1;
    if (self->control.obj != NULL)
        PyBuffer_Release(&self->control);
    Py_ssize_t needed = map_offset + (Py_ssize_t)(map_size * 4);
    if (entry_offset + ENTRY_RATE_OFFSET + (Py_ssize_t)sizeof(struct rate) > needed)
        needed = entry_offset + ENTRY_RATE_OFFSET + (Py_ssize_t)sizeof(struct rate);
    if (get_control(control, &self->control, needed) < 0)
        return -1;
    self->base = self->control.buf;
    self->fd = fd;
    self->futex = futex;
    self->slot_count = slot_count;
    self->meta_offset = meta_offset;
    self->map_offset = map_offset;
    self->entry_offset = entry_offset;
    self->map_mask = map_size - 1;
    self->newest = 0;
    self->rate_window_ns = rate_window_ns;
    self->liveness_step = liveness_step;
    self->rate_mark_ns = 0;
    self->rate_mark_frames = 0;
    ReaderPath_clear(self);
    Py_INCREF(attachment);
    self->attachment = attachment;
    Py_INCREF(held);
    self->held = held;
    Py_INCREF(view);
    self->view = view;
    Py_INCREF(frame_type);
    self->frame_type = frame_type;
    Py_INCREF(format_names);
    self->format_names = format_names;
    Py_INCREF(stream);
    self->stream = stream;
    self->format = UINT32_MAX;
    /* The attaching reader has just written its change byte (Python, a plain store); its first
     * read of HEAD comes after this. The full fence is what "Wake-ups" in _ring.py asks for
     * between the two: the producer stores HEAD, fences, then reads the change bytes. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return 0;
}

/* Give a held frame's slot back (step 5): mark it released, forget it, unlock, and with
 * `publish` write how many frames this reader holds now (status shows it). */
static int reader_release(ReaderPath *self, PyObject *frame, int publish)
{
    if (self->frame_type == NULL || !PyObject_TypeCheck(frame, (PyTypeObject *)self->frame_type)) {
        PyErr_SetString(PyExc_TypeError, "release() takes a Frame");
        return -1;
    }
    PyObject **released = frame_field(self, frame, F_RELEASED);
    Py_INCREF(Py_True);
    Py_XSETREF(*released, Py_True);
    PyObject *slot = *frame_field(self, frame, F_SLOT);
    if (slot == NULL) {
        PyErr_SetString(PyExc_AttributeError, "this Frame has no slot");
        return -1;
    }
    Py_INCREF(slot);
    PyObject *current = PyDict_GetItemWithError(self->held, slot);
    if (current != frame) {
        Py_DECREF(slot);
        return PyErr_Occurred() ? -1 : 0;
    }
    long index = PyLong_AsLong(slot);
    int failed = PyDict_DelItem(self->held, slot);
    Py_DECREF(slot);
    if (failed < 0 || (index == -1 && PyErr_Occurred()))
        return -1;
    if (self->base == NULL)
        return 0; /* detached: the locks went with the descriptor */
    if (byte_lock(self->fd, F_UNLCK, LOCK_SLOT_BASE + (uint32_t)index) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (publish)
        __atomic_store_n((uint32_t *)(self->base + self->entry_offset + ENTRY_HELD_OFFSET), (uint32_t)PyDict_GET_SIZE(self->held), __ATOMIC_RELAXED);
    return 0;
}

/* Give back the oldest held frames until fewer than `hold` are held: 1 if any went, 0 if none,
 * -1 on error. Without `publish`: the caller writes the reader's figures after. */
static int reader_release_beyond(ReaderPath *self, long hold)
{
    int released = 0;
    while (PyDict_GET_SIZE(self->held) >= hold && PyDict_GET_SIZE(self->held) > 0) {
        Py_ssize_t position = 0;
        PyObject *key, *oldest;
        PyDict_Next(self->held, &position, &key, &oldest);
        Py_INCREF(oldest);
        int failed = reader_release(self, oldest, 0);
        Py_DECREF(oldest);
        if (failed < 0)
            return -1;
        released = 1;
    }
    return released;
}

static uint64_t clock_ns(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* The reader's figures for status, as Reader._write_progress writes them: progress (with the
 * cursor a producer in lockstep waits for) and held count, and about every rate_window_ns the
 * rate with the wall time of this frame. */
static void reader_write_figures(ReaderPath *self, uint64_t seq, uint64_t cursor, uint64_t frames, uint64_t dropped)
{
    struct progress progress = {seq, cursor, frames, dropped, (uint32_t)PyDict_GET_SIZE(self->held)};
    memcpy(self->base + self->entry_offset + ENTRY_PROGRESS_OFFSET, &progress, PROGRESS_SIZE);
    uint64_t now = clock_ns(CLOCK_MONOTONIC);
    if (now - self->rate_mark_ns < self->rate_window_ns)
        return;
    if (self->rate_mark_ns) {
        struct rate rate = {(double)(frames - self->rate_mark_frames) * 1e9 / (double)(now - self->rate_mark_ns),
                            (double)clock_ns(CLOCK_REALTIME) / 1e9};
        memcpy(self->base + self->entry_offset + ENTRY_RATE_OFFSET, &rate, sizeof rate);
    }
    self->rate_mark_ns = now;
    self->rate_mark_frames = frames;
}

/* Attachment.nudge_producer: wake a producer that waits for its readers (lockstep). */
static void reader_nudge_producer(ReaderPath *self)
{
    if (!__atomic_load_n((uint32_t *)(self->base + PRODUCER_WAITS_OFFSET), __ATOMIC_RELAXED))
        return;
    PyObject *semaphore = PyObject_GetAttr(self->attachment, str_producer_semaphore);
    PyObject *done = semaphore != NULL && semaphore != Py_None ? PyObject_CallMethodObjArgs(semaphore, str_release, NULL) : NULL;
    Py_XDECREF(done);
    Py_XDECREF(semaphore);
    PyErr_Clear(); /* a producer gone meanwhile: nobody to wake */
}

static PyObject *reader_shape(ReaderPath *self, const struct meta_record *meta)
{
    if (self->shape != NULL && meta->height == self->height && meta->width == self->width && meta->channels == self->channels)
        return self->shape;
    reader_drop_views(self); /* the geometry changed: views of the old shape are no use */
    self->shape = meta->channels == 1 ? Py_BuildValue("(II)", meta->height, meta->width)
                                      : Py_BuildValue("(III)", meta->height, meta->width, meta->channels);
    self->height = meta->height;
    self->width = meta->width;
    self->channels = meta->channels;
    return self->shape;
}

static PyObject *reader_format_name(ReaderPath *self, uint32_t code)
{
    if (self->format_name != NULL && code == self->format)
        return self->format_name;
    PyObject *key = PyLong_FromUnsignedLong(code);
    if (key == NULL)
        return NULL;
    PyObject *name = PyDict_GetItemWithError(self->format_names, key);
    Py_DECREF(key);
    if (name == NULL) {
        if (PyErr_Occurred())
            return NULL;
        name = str_bgr;
    }
    Py_INCREF(name);
    Py_XSETREF(self->format_name, name);
    self->format = code;
    return name;
}

/* The Frame for a leased slot, built without running Python code: allocated as Frame.__new__
 * would, its slots filled like Frame.__init__ does (through their offsets). */
static PyObject *reader_frame(ReaderPath *self, uint32_t slot, const struct meta_record *meta, PyObject *slot_key)
{
    PyObject *shape = reader_shape(self, meta);
    if (shape == NULL)
        return NULL;
    PyObject *format = reader_format_name(self, meta->format);
    if (format == NULL)
        return NULL;
    PyObject *view = self->views[slot];
    if (view == NULL) {
        view = PyObject_CallFunctionObjArgs(self->view, slot_key, shape, NULL);
        if (view == NULL)
            return NULL;
        self->views[slot] = view;
    }
    PyTypeObject *type = (PyTypeObject *)self->frame_type;
    PyObject *frame = type->tp_alloc(type, 0);
    if (frame == NULL)
        return NULL;
    /* New references for the first four and the counter, borrowed ones for the rest. */
    PyObject *values[F_COUNT] = {
        PyLong_FromUnsignedLongLong(meta->seq), PyLong_FromUnsignedLongLong(meta->timestamp_ns), PyFloat_FromDouble(meta->wall),
        shape, format, PyLong_FromLong(0), self->stream, slot_key, self->attachment, view, Py_False,
    };
    int failed = 0;
    for (int field = 0; field < F_COUNT; field++) {
        int owned = field == F_SEQ || field == F_TIMESTAMP || field == F_WALL || field == F_DROPPED;
        if (values[field] == NULL) {
            failed = 1;
            continue;
        }
        if (!owned)
            Py_INCREF(values[field]);
        *frame_field(self, frame, field) = values[field]; /* a new object's slots are NULL */
    }
    if (failed) {
        Py_DECREF(frame);
        return NULL;
    }
    return frame;
}

/* Steps 2-4 of "Leasing a frame": Py_None when the slot does not hold frame `target` (or is
 * being rewritten), a new reference to the Frame when leased, NULL on error. The frame's
 * `dropped` is 0: this path leases only the newest frame or an ordered reader's next one; an
 * ordered reader that missed frames is the Python path's case. */
static PyObject *reader_lease(ReaderPath *self, uint32_t slot, uint64_t target)
{
    if (slot >= self->slot_count)
        Py_RETURN_NONE; /* a map entry from before the wanted frame was written */
    PyObject *slot_key = PyLong_FromUnsignedLong(slot);
    if (slot_key == NULL)
        return NULL;
    int held = PyDict_Contains(self->held, slot_key);
    if (held != 0) {
        /* A slot this reader holds an older frame in: the wanted one cannot be there (and a
         * second shared lock would merge with the first, so unlocking it would drop both). */
        Py_DECREF(slot_key);
        if (held < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    int locked = byte_lock(self->fd, F_RDLCK, LOCK_SLOT_BASE + slot);
    if (locked <= 0) {
        Py_DECREF(slot_key);
        if (locked < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        Py_RETURN_NONE; /* the producer is rewriting it */
    }
    /* The lock is the acquire barrier (the kernel's flc_lock, see _ring.py); this fence only
     * keeps the compiler from hoisting the record's loads above the call. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    struct meta_record meta;
    memcpy(&meta, self->base + self->meta_offset + (Py_ssize_t)slot * META_RECORD_SIZE, sizeof meta);
    PyObject *frame = NULL;
    if (meta.seq == target) {
        frame = reader_frame(self, slot, &meta, slot_key);
        if (frame != NULL && PyDict_SetItem(self->held, slot_key, frame) < 0)
            Py_CLEAR(frame);
        if (frame == NULL) {
            Py_DECREF(slot_key);
            byte_lock(self->fd, F_UNLCK, LOCK_SLOT_BASE + slot);
            return NULL;
        }
    } else {
        byte_lock(self->fd, F_UNLCK, LOCK_SLOT_BASE + slot); /* reused meanwhile */
        frame = Py_None;
        Py_INCREF(frame);
    }
    Py_DECREF(slot_key);
    return frame;
}

static double monotonic_seconds(void)
{
    return (double)clock_ns(CLOCK_MONOTONIC) / 1e9;
}

/* Sleep in FUTEX_WAIT on the wake word for at most `seconds`, unless HEAD's newest_seq is no
 * longer `expected` (what the caller saw when it found nothing new) or the segment ended or was
 * replaced: 1 woken (or no need to sleep), 0 timed out, -1 an exception from a signal handler. */
static int reader_sleep(ReaderPath *self, uint64_t expected, double seconds)
{
    if (!(seconds > 0))
        return 0;
    uint32_t *word = (uint32_t *)(self->base + WAKE_OFFSET);
    const struct head *head = (const struct head *)(self->base + LIVE_OFFSET);
    /* The word first, then HEAD (acquire, both): a frame published after the HEAD read the
     * caller decided on either shows in this HEAD read or has already changed the word, and then
     * FUTEX_WAIT returns at once (the kernel compares the word under its own lock). */
    uint32_t armed = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    uint64_t newest = __atomic_load_n(&head->newest_seq, __ATOMIC_ACQUIRE);
    uint32_t state = __atomic_load_n(&head->state, __ATOMIC_RELAXED);
    if (newest != expected || state == STATE_ENDED || state == STATE_REPLACED)
        return 1;
    struct timespec span;
    span.tv_sec = (time_t)seconds;
    span.tv_nsec = (long)((seconds - (double)span.tv_sec) * 1e9);
    if (span.tv_nsec >= 1000000000L)
        span.tv_nsec = 999999999L;
    long result;
    int error;
    Py_BEGIN_ALLOW_THREADS
    result = futex_wait(word, armed, &span);
    error = errno;
    Py_END_ALLOW_THREADS
    if (result == 0 || error == EAGAIN)
        return 1;
    if (error == ETIMEDOUT)
        return 0;
    if (error == EINTR)
        return PyErr_CheckSignals() < 0 ? -1 : 1;
    errno = error;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* How many times take() looks at HEAD again after losing a race to the producer before it
 * leaves the case to the Python path. */
#define TAKE_ATTEMPTS 4


PyDoc_STRVAR(take_doc,
    "take(reader, mode, deadline) -> Frame | False | None\n\n"
    "What Reader._get does for `mode` in one call, as long as nothing unusual happens: first what\n"
    "comes before looking (in next and ordered mode, give back the oldest frame held beyond the\n"
    "budget; write the reader's figures for status if due, with an ordered reader's cursor and a\n"
    "nudge to a producer in lockstep), then the lease: a Frame (held by the attachment), with the\n"
    "reader's position moved on (_last_seq, _frames, _seen_newest and _seen_at, _progress_due).\n"
    "In next and ordered mode, a reader on the wake word that finds nothing new sleeps on it until\n"
    "a frame comes, at most one liveness step and not past `deadline` (time.monotonic(), or None),\n"
    "and leases it at once; False if it slept to the end of the step or to the deadline without\n"
    "one (_get then checks the daemon).\n"
    "None when _get's own steps must decide: nothing new without waiting here, the same frame\n"
    "again, an ended or replaced segment, a frame gone before an ordered reader got to it, another\n"
    "mode than the reader's, an orphaned reader. In live mode (latest()) the figures are written\n"
    "with the lease.");

/* The reader's int (or bool) attribute `field`. */
static int get_reader_int(PyObject *reader, enum reader_field field, long long *out)
{
    PyObject *value = PyObject_GetAttr(reader, reader_fields[field]);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int set_reader_int(PyObject *reader, enum reader_field field, long long value)
{
    PyObject *number = PyLong_FromLongLong(value);
    if (number == NULL)
        return -1;
    int failed = PyObject_SetAttr(reader, reader_fields[field], number);
    Py_DECREF(number);
    return failed;
}

/* Why reader_take_once leased nothing. */
enum take_outcome { TAKE_DECIDE, TAKE_RETRY, TAKE_NOTHING_NEW };

/* Steps 1-4 for `mode` once: a new reference to the leased Frame, or Py_None with *outcome
 * saying why (a race lost to the producer, nothing new to wait for, or a case for the Python
 * path), NULL on error. */
static PyObject *reader_take_once(ReaderPath *self, long mode, uint64_t last, long long seen, long hold, enum take_outcome *outcome)
{
    const struct head *head = (const struct head *)(self->base + LIVE_OFFSET);
    /* Step 1: HEAD. Acquire on newest_seq pairs with the producer's release store of it, so
     * the slot and state read after it are at least as new (all of it is only a hint). */
    uint64_t newest = __atomic_load_n(&head->newest_seq, __ATOMIC_ACQUIRE);
    uint32_t slot = __atomic_load_n(&head->slot, __ATOMIC_RELAXED);
    uint32_t state = __atomic_load_n(&head->state, __ATOMIC_RELAXED);
    self->newest = newest;
    *outcome = TAKE_DECIDE;
    if (state == STATE_ENDED || state == STATE_REPLACED || slot == NO_FRAME || newest == 0)
        Py_RETURN_NONE;
    uint64_t target = newest;
    if (mode == MODE_LIVE) {
        if ((long long)newest == seen)
            Py_RETURN_NONE; /* nothing newer: the frame held, checked for liveness */
        if (reader_release_beyond(self, hold) < 0) /* the figures written with the lease say it */
            return NULL;
    } else {
        if (newest <= last) {
            *outcome = TAKE_NOTHING_NEW;
            Py_RETURN_NONE;
        }
        if (mode == MODE_ORDERED && last) {
            target = last + 1;
            slot = __atomic_load_n((uint32_t *)(self->base + self->map_offset + (Py_ssize_t)((target & self->map_mask) * 4)), __ATOMIC_RELAXED);
        } else if ((long long)newest == seen) {
            Py_RETURN_NONE;
        }
    }
    PyObject *frame = reader_lease(self, slot, target);
    /* Lost to the producer: look again, except for an ordered reader whose next frame may be
     * gone for good (the Python path then takes the oldest one after it). */
    if (frame == Py_None && !(mode == MODE_ORDERED && last))
        *outcome = TAKE_RETRY;
    return frame;
}

static PyObject *ReaderPath_take(ReaderPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "take() takes reader, mode, deadline");
        return NULL;
    }
    PyObject *reader = args[0];
    long mode = PyLong_AsLong(args[1]);
    double deadline = args[2] == Py_None ? INFINITY : PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (self->base == NULL)
        return closed_error();
    long long reader_mode, progress_due, orphaned, last, seen, hold, frames, dropped;
    if (get_reader_int(reader, R_MODE, &reader_mode) < 0 || get_reader_int(reader, R_ORPHANED, &orphaned) < 0)
        return NULL;
    if (reader_mode != mode || orphaned)
        Py_RETURN_NONE;
    if (get_reader_int(reader, R_PROGRESS_DUE, &progress_due) < 0 || get_reader_int(reader, R_LAST_SEQ, &last) < 0 ||
        get_reader_int(reader, R_SEEN_NEWEST, &seen) < 0 || get_reader_int(reader, R_HOLD, &hold) < 0 ||
        get_reader_int(reader, R_FRAMES, &frames) < 0 || get_reader_int(reader, R_DROPPED, &dropped) < 0)
        return NULL;
    /* Before looking: asking for the next frame gives the oldest held one back now (the producer
     * gets its slot back a frame period sooner), and the figures go out before any wait. */
    if (mode != MODE_LIVE) {
        int released = reader_release_beyond(self, hold);
        if (released < 0)
            return NULL;
        progress_due |= released;
    }
    if (progress_due) {
        reader_write_figures(self, (uint64_t)last, mode == MODE_ORDERED ? (uint64_t)last : 0, (uint64_t)frames, (uint64_t)dropped);
        if (mode == MODE_ORDERED)
            reader_nudge_producer(self); /* a producer in lockstep waits for this cursor */
        if (PyObject_SetAttr(reader, reader_fields[R_PROGRESS_DUE], Py_False) < 0)
            return NULL;
    }
    PyObject *frame;
    double step_end = -1.0; /* when the wait that started with the first "nothing new" ends */
    for (;;) {
        enum take_outcome outcome = TAKE_RETRY;
        frame = Py_None;
        Py_INCREF(frame);
        for (int attempt = 0; attempt < TAKE_ATTEMPTS && outcome == TAKE_RETRY; attempt++) {
            Py_DECREF(frame);
            frame = reader_take_once(self, mode, (uint64_t)last, seen, hold, &outcome);
            if (frame == NULL)
                return NULL;
        }
        if (frame != Py_None || outcome != TAKE_NOTHING_NEW || !self->futex)
            break;
        /* Nothing new: sleep on the wake word, then look again (woken or not). */
        Py_DECREF(frame);
        double now = monotonic_seconds();
        if (step_end < 0) {
            if (now >= deadline)
                Py_RETURN_NONE; /* _get raises FrameTimeout */
            step_end = fmin(now + self->liveness_step, deadline);
        }
        /* Slept to the end of the step or to the deadline without a frame: False, so that _get
         * checks the daemon before it raises FrameTimeout (a reader that only ever waits less
         * than a liveness step must still notice a daemon that died and follow its successor). */
        if (now >= step_end)
            Py_RETURN_FALSE;
        if (reader_sleep(self, self->newest, step_end - now) < 0)
            return NULL;
    }
    if (frame == Py_None)
        return frame;
    /* Leased: move the reader on as Reader._get does after its own lease. */
    PyObject *seq_object = *frame_field(self, frame, F_SEQ);
    uint64_t seq = PyLong_AsUnsignedLongLong(seq_object);
    int failed = PyErr_Occurred() != NULL;
    if (!failed && (long long)self->newest != seen)
        failed = set_reader_int(reader, R_SEEN_NEWEST, (long long)self->newest) < 0 ||
                 PyObject_SetAttr(reader, reader_fields[R_SEEN_AT], float_zero) < 0;
    if (!failed)
        failed = PyObject_SetAttr(reader, reader_fields[R_LAST_SEQ], seq_object) < 0 ||
                 set_reader_int(reader, R_FRAMES, frames + 1) < 0;
    /* latest() writes its figures for status now (nothing waits in it to do it before); the
     * other modes write theirs before they wait, an ordered reader's cursor only once it asks
     * for the next frame. */
    if (!failed && mode == MODE_LIVE)
        reader_write_figures(self, seq, 0, (uint64_t)frames + 1, (uint64_t)dropped);
    else if (!failed)
        failed = PyObject_SetAttr(reader, reader_fields[R_PROGRESS_DUE], Py_True) < 0;
    if (failed) {
        Py_DECREF(frame);
        return NULL;
    }
    return frame;
}

PyDoc_STRVAR(release_doc, "release(frame, publish)\n\nGive the frame's slot back (Attachment.release).");

static PyObject *ReaderPath_release(ReaderPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "release() takes frame, publish");
        return NULL;
    }
    int publish = PyObject_IsTrue(args[1]);
    if (publish < 0 || reader_release(self, args[0], publish) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(wait_doc,
    "wait(timeout, newest) -> bool\n\n"
    "Sleep in FUTEX_WAIT on the header's wake word until the producer bumps it, at most `timeout`\n"
    "seconds; at once if HEAD's newest_seq is no longer `newest` (what the caller saw when it\n"
    "decided to wait) or the segment ended or was replaced. False on timeout. An exception raised\n"
    "by a signal handler meanwhile propagates.");

static PyObject *ReaderPath_wait(ReaderPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wait() takes timeout, newest");
        return NULL;
    }
    double timeout = PyFloat_AsDouble(args[0]);
    unsigned long long expected = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (self->base == NULL)
        return closed_error();
    int woken = reader_sleep(self, expected, timeout);
    if (woken < 0)
        return NULL;
    return PyBool_FromLong(woken);
}

PyDoc_STRVAR(reader_close_doc, "close()\n\nLet go of the control area and the descriptor (before the segment closes them).");

static PyObject *ReaderPath_close(ReaderPath *self, PyObject *unused)
{
    let_go(&self->control, &self->base, &self->fd);
    ReaderPath_clear(self);
    Py_RETURN_NONE;
}

static PyMethodDef ReaderPath_methods[] = {
    {"take", (PyCFunction)(void (*)(void))ReaderPath_take, METH_FASTCALL, take_doc},
    {"release", (PyCFunction)(void (*)(void))ReaderPath_release, METH_FASTCALL, release_doc},
    {"wait", (PyCFunction)(void (*)(void))ReaderPath_wait, METH_FASTCALL, wait_doc},
    {"close", (PyCFunction)ReaderPath_close, METH_NOARGS, reader_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef ReaderPath_members[] = {
    {"newest", T_ULONGLONG, offsetof(ReaderPath, newest), READONLY, "HEAD's newest_seq at the last take()"},
    {"futex", T_INT, offsetof(ReaderPath, futex), READONLY, "waits on the header's wake word (FLAG_FUTEX)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReaderPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "framebroker._fastpath.ReaderPath",
    .tp_basicsize = sizeof(ReaderPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A reader's frame path in one segment (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ReaderPath_init,
    .tp_dealloc = (destructor)ReaderPath_dealloc,
    .tp_traverse = (traverseproc)ReaderPath_traverse,
    .tp_clear = (inquiry)ReaderPath_clear,
    .tp_methods = ReaderPath_methods,
    .tp_members = ReaderPath_members,
};

/* === ProducerPath ============================================================================== */

typedef struct {
    PyObject_HEAD
    Py_buffer control;
    char *base;
    int fd;
    uint32_t slot_count;
    Py_ssize_t meta_offset;
    Py_ssize_t map_offset;
    uint64_t map_mask;
    Py_ssize_t changes_offset; /* the growth request, then one change byte per entry */
    Py_ssize_t changes_size;
    unsigned char changes_seen[CHANGES_RUN_MAX];
    int futex_readers;
    PyObject *recency;    /* the Publisher's list: slots, most recently written first */
    PyObject *slot_seq;   /* the Publisher's list: the seq each slot holds */
    PyObject *semaphores; /* wake-up semaphores of the readers that wait on one */
    PyObject *ordered;    /* entry offsets of the ordered readers */
} ProducerPath;

static int ProducerPath_clear(ProducerPath *self)
{
    Py_CLEAR(self->recency);
    Py_CLEAR(self->slot_seq);
    Py_CLEAR(self->semaphores);
    Py_CLEAR(self->ordered);
    return 0;
}

static int ProducerPath_traverse(ProducerPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recency);
    Py_VISIT(self->slot_seq);
    Py_VISIT(self->semaphores);
    Py_VISIT(self->ordered);
    return 0;
}

static void ProducerPath_dealloc(ProducerPath *self)
{
    PyObject_GC_UnTrack(self);
    let_go(&self->control, &self->base, &self->fd);
    ProducerPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ProducerPath_init(ProducerPath *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"control", "fd", "slot_count", "meta_offset", "map_offset", "map_size",
                               "changes_offset", "changes_size", "recency", "slot_seq", NULL};
    PyObject *control, *recency, *slot_seq;
    int fd;
    unsigned int slot_count;
    Py_ssize_t meta_offset, map_offset, changes_offset, changes_size;
    unsigned long long map_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiInnKnnO!O!:ProducerPath", keywords, &control, &fd, &slot_count,
                                     &meta_offset, &map_offset, &map_size, &changes_offset, &changes_size, &PyList_Type,
                                     &recency, &PyList_Type, &slot_seq))
        return -1;
    if (slot_count == 0 || slot_count > MAX_SLOTS || map_size == 0 || (map_size & (map_size - 1)) != 0 ||
        changes_size <= 0 || changes_size > CHANGES_RUN_MAX || PyList_GET_SIZE(slot_seq) != (Py_ssize_t)slot_count) {
        PyErr_SetString(PyExc_ValueError, "implausible ring geometry");
        return -1;
    }
    if (self->control.obj != NULL)
        PyBuffer_Release(&self->control);
    if (get_control(control, &self->control, map_offset + (Py_ssize_t)(map_size * 4)) < 0)
        return -1;
    self->base = self->control.buf;
    self->fd = fd;
    self->slot_count = slot_count;
    self->meta_offset = meta_offset;
    self->map_offset = map_offset;
    self->map_mask = map_size - 1;
    self->changes_offset = changes_offset;
    self->changes_size = changes_size;
    memcpy(self->changes_seen, self->base + changes_offset, (size_t)changes_size);
    self->futex_readers = 0;
    ProducerPath_clear(self);
    Py_INCREF(recency);
    self->recency = recency;
    Py_INCREF(slot_seq);
    self->slot_seq = slot_seq;
    self->semaphores = PyList_New(0);
    self->ordered = PyList_New(0);
    return self->semaphores && self->ordered ? 0 : -1;
}

PyDoc_STRVAR(set_readers_doc,
    "set_readers(changes_seen, semaphores, futex_readers, ordered)\n\n"
    "What Publisher._refresh_readers found: the change bytes it read (with the growth request\n"
    "before them), the semaphores to post, how many readers wait on the wake word, and the entry\n"
    "offsets of the ordered readers.");

static PyObject *ProducerPath_set_readers(ProducerPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "set_readers() takes bytes, list, int, list");
        return NULL;
    }
    if (PyBytes_GET_SIZE(args[0]) != self->changes_size) {
        PyErr_SetString(PyExc_ValueError, "set_readers(): the change bytes do not match the table");
        return NULL;
    }
    long futex_readers = PyLong_AsLong(args[2]);
    if (futex_readers == -1 && PyErr_Occurred())
        return NULL;
    memcpy(self->changes_seen, PyBytes_AS_STRING(args[0]), (size_t)self->changes_size);
    self->futex_readers = (int)futex_readers;
    Py_INCREF(args[1]);
    Py_XSETREF(self->semaphores, args[1]);
    Py_INCREF(args[3]);
    Py_XSETREF(self->ordered, args[3]);
    Py_RETURN_NONE;
}

/* Step 6: the wake-ups. The wake word moves and one FUTEX_WAKE wakes every reader waiting on
 * it, however many; a post for each reader that waits on a semaphore (pure-Python readers),
 * unless one is pending already. */
static int producer_wake(ProducerPath *self)
{
    if (self->futex_readers > 0)
        wake_everyone(self->base);
    PyObject *semaphores = self->semaphores;
    Py_INCREF(semaphores);
    int failed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(semaphores) && !failed; i++) {
        PyObject *semaphore = PyList_GET_ITEM(semaphores, i);
        PyObject *value = PyObject_GetAttr(semaphore, str_value);
        if (value == NULL) {
            failed = 1;
            break;
        }
        long pending = PyLong_AsLong(value);
        Py_DECREF(value);
        if (pending == -1 && PyErr_Occurred()) {
            failed = 1;
        } else if (pending < MAX_PENDING_WAKES) {
            PyObject *done = PyObject_CallMethodObjArgs(semaphore, str_release, NULL);
            failed = done == NULL;
            Py_XDECREF(done);
        }
    }
    Py_DECREF(semaphores);
    return failed ? -1 : 0;
}

static long list_int(PyObject *list, Py_ssize_t index)
{
    return PyLong_AsLong(PyList_GET_ITEM(list, index));
}

/* Slot recency: move `slot` to the front of the Publisher's list. */
static int producer_note_recent(ProducerPath *self, long slot)
{
    PyObject *recency = self->recency;
    Py_ssize_t size = PyList_GET_SIZE(recency);
    for (Py_ssize_t i = 0; i < size; i++) {
        long value = list_int(recency, i);
        if (value == -1 && PyErr_Occurred())
            return -1;
        if (value != slot)
            continue;
        if (i == 0)
            return 0;
        PyObject *item = PyList_GET_ITEM(recency, i);
        Py_INCREF(item);
        int failed = PySequence_DelItem(recency, i) < 0 || PyList_Insert(recency, 0, item) < 0;
        Py_DECREF(item);
        return failed ? -1 : 0;
    }
    return 0;
}

/* Step 1 for the next frame (Publisher._lock_a_slot): the warmest slot no ordered reader still
 * needs, else the oldest one they need; never the newest frame's. -1 if every one is leased,
 * -2 on error. */
static long producer_lock_ahead(ProducerPath *self, long newest, uint64_t seq)
{
    PyObject *recency = self->recency;
    Py_ssize_t size = PyList_GET_SIZE(recency);
    Py_ssize_t ordered = PyList_GET_SIZE(self->ordered);
    uint64_t protect_after = seq;
    for (Py_ssize_t i = 0; i < ordered; i++) {
        long offset = list_int(self->ordered, i);
        if (offset == -1 && PyErr_Occurred())
            return -2;
        uint64_t cursor = __atomic_load_n((uint64_t *)(self->base + offset + ENTRY_CURSOR_OFFSET), __ATOMIC_RELAXED);
        if (cursor && cursor < protect_after)
            protect_after = cursor;
    }
    for (int pass = 0; pass < (ordered ? 2 : 1); pass++) {
        for (Py_ssize_t i = 0; i < size; i++) {
            long slot = list_int(recency, pass ? size - 1 - i : i);
            if (slot == -1 && PyErr_Occurred())
                return -2;
            if (slot == newest || slot < 0 || slot >= (long)self->slot_count)
                continue;
            if (ordered) {
                unsigned long long held_seq = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(self->slot_seq, slot));
                if (held_seq == (unsigned long long)-1 && PyErr_Occurred())
                    return -2;
                /* First pass: frames every ordered reader has consumed; second: the oldest wanted. */
                if ((pass == 0) != (held_seq <= protect_after))
                    continue;
            }
            int locked = byte_lock(self->fd, F_WRLCK, LOCK_SLOT_BASE + (uint32_t)slot);
            if (locked < 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -2;
            }
            if (locked)
                return slot;
        }
    }
    return -1;
}

PyDoc_STRVAR(commit_doc,
    "commit(publisher, slot, seq, timestamp_ns, wall, geometry, lock_ahead) -> int\n\n"
    "Publish the slot written (Publisher._commit): its record, the unlock, map and HEAD, the\n"
    "change bytes (publisher._refresh_readers() if any moved), the wake-ups, the slot's recency;\n"
    "with `lock_ahead`, lock the slot for the next frame and return it (-1: none free, or not\n"
    "asked). `geometry` is (height, width, channels, format, nbytes).");

static PyObject *ProducerPath_commit(ProducerPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyTuple_Check(args[5]) || PyTuple_GET_SIZE(args[5]) != 5) {
        PyErr_SetString(PyExc_TypeError, "commit() takes publisher, slot, seq, timestamp_ns, wall, geometry (5 ints), lock_ahead");
        return NULL;
    }
    PyObject *publisher = args[0];
    long slot = PyLong_AsLong(args[1]);
    struct meta_record meta;
    meta.seq = PyLong_AsUnsignedLongLong(args[2]);
    meta.timestamp_ns = PyLong_AsUnsignedLongLong(args[3]);
    meta.wall = PyFloat_AsDouble(args[4]);
    meta.height = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(args[5], 0));
    meta.width = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(args[5], 1));
    meta.channels = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(args[5], 2));
    meta.format = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(args[5], 3));
    meta.nbytes = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[5], 4));
    int lock_ahead = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred() || lock_ahead < 0)
        return NULL;
    if (self->base == NULL)
        return closed_error();
    if (slot < 0 || slot >= (long)self->slot_count) {
        PyErr_Format(PyExc_ValueError, "slot %ld is outside the ring", slot);
        return NULL;
    }
    char *base = self->base;
    /* Step 2 (the pixels are written already): the slot's record. */
    memcpy(base + self->meta_offset + slot * META_RECORD_SIZE, &meta, sizeof meta);
    /* Step 3, the publishing barrier: the unlock. Its spin_unlock in the kernel is a release
     * (see _ring.py); the fence keeps the compiler from sinking the stores below the call. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (byte_lock(self->fd, F_UNLCK, LOCK_SLOT_BASE + (uint32_t)slot) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Step 4: the map, then HEAD with newest_seq last, as a release store: a reader whose
     * acquire load sees the new seq sees the map entry, the slot and the state with it. */
    __atomic_store_n((uint32_t *)(base + self->map_offset + (Py_ssize_t)((meta.seq & self->map_mask) * 4)), (uint32_t)slot, __ATOMIC_RELAXED);
    struct head *head = (struct head *)(base + LIVE_OFFSET);
    __atomic_store_n(&head->slot, (uint32_t)slot, __ATOMIC_RELAXED);
    __atomic_store_n(&head->state, STATE_STREAMING, __ATOMIC_RELAXED);
    __atomic_store_n(&head->timestamp_ns, meta.timestamp_ns, __ATOMIC_RELAXED);
    memcpy(&head->wall, &meta.wall, sizeof meta.wall);
    __atomic_store_n(&head->newest_seq, meta.seq, __ATOMIC_RELEASE);
    /* Step 5. Store HEAD, then load the change bytes, while an attaching reader stores its
     * change byte, then loads HEAD: only a full fence on both sides keeps each load after the
     * other side's store ("Wake-ups" in _ring.py; the reader's is in ReaderPath's constructor). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (memcmp(base + self->changes_offset, self->changes_seen, (size_t)self->changes_size) != 0) {
        PyObject *done = PyObject_CallMethodObjArgs(publisher, str_refresh_readers, NULL);
        if (done == NULL)
            return NULL;
        Py_DECREF(done);
    }
    /* Step 6: wake the readers; the bookkeeping nobody waits for comes after. */
    if (producer_wake(self) < 0)
        return NULL;
    PyObject *seq = PyLong_FromUnsignedLongLong(meta.seq);
    if (seq == NULL || PyList_SetItem(self->slot_seq, slot, seq) < 0 || producer_note_recent(self, slot) < 0)
        return NULL;
    long next = -1;
    if (lock_ahead) {
        next = producer_lock_ahead(self, slot, meta.seq);
        if (next == -2)
            return NULL;
    }
    return PyLong_FromLong(next);
}

PyDoc_STRVAR(producer_close_doc, "close()\n\nLet go of the control area and the descriptor (before the segment closes them).");

static PyObject *ProducerPath_close(ProducerPath *self, PyObject *unused)
{
    let_go(&self->control, &self->base, &self->fd);
    ProducerPath_clear(self);
    Py_RETURN_NONE;
}

static PyMethodDef ProducerPath_methods[] = {
    {"commit", (PyCFunction)(void (*)(void))ProducerPath_commit, METH_FASTCALL, commit_doc},
    {"set_readers", (PyCFunction)(void (*)(void))ProducerPath_set_readers, METH_FASTCALL, set_readers_doc},
    {"close", (PyCFunction)ProducerPath_close, METH_NOARGS, producer_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProducerPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "framebroker._fastpath.ProducerPath",
    .tp_basicsize = sizeof(ProducerPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A producer's frame path in one segment (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ProducerPath_init,
    .tp_dealloc = (destructor)ProducerPath_dealloc,
    .tp_traverse = (traverseproc)ProducerPath_traverse,
    .tp_clear = (inquiry)ProducerPath_clear,
    .tp_methods = ProducerPath_methods,
};

/* === copying a frame into its slot =========================================================== */

/* A frame larger than the core's L2 cache is not read back from it by the producer: storing it
 * around the caches (non-temporal stores) saves reading every destination line from memory first
 * (read-for-ownership) and leaves the producer's cache to its own work. Measured on this project's
 * machine (1080p BGR): about 35% less time back to back and 15% less at 30 fps than numpy's copy;
 * a reader that then reads the whole frame takes about 6% longer (it comes from memory rather than
 * the last-level cache). VGA frames fit in L2 and are copied as before. */
static size_t streaming_threshold;

static size_t find_streaming_threshold(void)
{
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? (size_t)l2 : (size_t)1 << 20;
}

static void copy_bytes(char *destination, const char *source, size_t size)
{
#if defined(__x86_64__)
    if (size >= streaming_threshold && ((uintptr_t)destination & 15) == 0) {
        size_t done = 0;
        for (; done + 64 <= size; done += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(source + done));
            __m128i b = _mm_loadu_si128((const __m128i *)(source + done + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(source + done + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(source + done + 48));
            _mm_stream_si128((__m128i *)(destination + done), a);
            _mm_stream_si128((__m128i *)(destination + done + 16), b);
            _mm_stream_si128((__m128i *)(destination + done + 32), c);
            _mm_stream_si128((__m128i *)(destination + done + 48), d);
        }
        memcpy(destination + done, source + done, size - done);
        /* Non-temporal stores are not ordered by x86's usual rules: the fence makes them visible
         * before anything stored after it, the record and the unlock that publishes them. */
        _mm_sfence();
        return;
    }
#endif
    memcpy(destination, source, size);
}

PyDoc_STRVAR(copy_frame_doc,
    "copy_frame(destination, source) -> bool\n\n"
    "Copy a frame into a slot: `destination` the slot's writable view, `source` a C-contiguous\n"
    "buffer of the same size. False (nothing copied) if `source` is not contiguous or the sizes\n"
    "differ: numpy's copy handles those.");

static PyObject *fastpath_copy_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_frame() takes destination, source");
        return NULL;
    }
    Py_buffer destination, source;
    if (PyObject_GetBuffer(args[0], &destination, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &source, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&destination);
        PyErr_Clear(); /* strided: numpy's case */
        Py_RETURN_FALSE;
    }
    int same = destination.len == source.len;
    if (same) {
        Py_BEGIN_ALLOW_THREADS
        copy_bytes(destination.buf, source.buf, (size_t)source.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&source);
    PyBuffer_Release(&destination);
    return PyBool_FromLong(same);
}

/* === the module ================================================================================ */

PyDoc_STRVAR(broadcast_doc,
    "broadcast(control)\n\nBump the wake word of a segment's control area and wake every reader\n"
    "waiting on it (a state change, a move to a new segment).");

static PyObject *fastpath_broadcast(PyObject *module, PyObject *control)
{
    Py_buffer view;
    if (get_control(control, &view, WAKE_OFFSET + 4) < 0)
        return NULL;
    wake_everyone(view.buf);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef fastpath_methods[] = {
    {"broadcast", (PyCFunction)fastpath_broadcast, METH_O, broadcast_doc},
    {"copy_frame", (PyCFunction)(void (*)(void))fastpath_copy_frame, METH_FASTCALL, copy_frame_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "framebroker._fastpath",
    .m_doc = "The frame path of framebroker's ring in compiled code (see framebroker/_fast.py).",
    .m_size = -1,
    .m_methods = fastpath_methods,
};

static int add_layout(PyObject *module)
{
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:I,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "LIVE_OFFSET", LIVE_OFFSET, "WAKE_OFFSET",
        WAKE_OFFSET, "META_RECORD_SIZE", META_RECORD_SIZE, "LOCK_SLOT_BASE", LOCK_SLOT_BASE, "MAX_SLOTS", MAX_SLOTS, "NO_FRAME",
        NO_FRAME, "STREAMING", STATE_STREAMING, "ENDED", STATE_ENDED, "REPLACED", STATE_REPLACED, "LIVE", MODE_LIVE, "NEXT",
        MODE_NEXT, "ORDERED", MODE_ORDERED, "ENTRY_CURSOR_OFFSET", ENTRY_CURSOR_OFFSET, "MAX_PENDING_WAKES", MAX_PENDING_WAKES, "PRODUCER_WAITS_OFFSET", PRODUCER_WAITS_OFFSET, "ENTRY_PROGRESS_OFFSET", ENTRY_PROGRESS_OFFSET, "ENTRY_HELD_OFFSET",
        ENTRY_HELD_OFFSET, "ENTRY_RATE_OFFSET", ENTRY_RATE_OFFSET,
        "HEAD_SIZE", (int)sizeof(struct head), "META_SIZE", (int)sizeof(struct meta_record), "PROGRESS_SIZE", (int)PROGRESS_SIZE, "RATE_SIZE", (int)sizeof(struct rate));
    if (layout == NULL || PyModule_AddObject(module, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__fastpath(void)
{
    for (int field = 0; field < F_COUNT; field++) {
        if ((frame_fields[field] = PyUnicode_InternFromString(frame_field_names[field])) == NULL)
            return NULL;
    }
    for (int field = 0; field < R_COUNT; field++) {
        if ((reader_fields[field] = PyUnicode_InternFromString(reader_field_names[field])) == NULL)
            return NULL;
    }
    if ((float_zero = PyFloat_FromDouble(0.0)) == NULL)
        return NULL;
    streaming_threshold = find_streaming_threshold();
    if ((str_value = PyUnicode_InternFromString("value")) == NULL || (str_release = PyUnicode_InternFromString("release")) == NULL ||
        (str_refresh_readers = PyUnicode_InternFromString("_refresh_readers")) == NULL ||
        (str_producer_semaphore = PyUnicode_InternFromString("producer_semaphore")) == NULL ||
        (str_bgr = PyUnicode_InternFromString("bgr")) == NULL)
        return NULL;
    if (PyType_Ready(&ReaderPathType) < 0 || PyType_Ready(&ProducerPathType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&ReaderPathType);
    Py_INCREF(&ProducerPathType);
    if (PyModule_AddObject(module, "ReaderPath", (PyObject *)&ReaderPathType) < 0 ||
        PyModule_AddObject(module, "ProducerPath", (PyObject *)&ProducerPathType) < 0 || add_layout(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
