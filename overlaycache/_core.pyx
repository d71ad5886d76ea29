# cython: language_level=3
"""Compiled kernels of overlaycache: bitmaps, batch resolve, guarded region copies and checksums.

The Python layer checks arguments before calling into the kernels; the ``cdef`` helpers below do no
checking of their own. ``_core_py`` is the pure-Python reference with the same API and exceptions.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.errno cimport errno
from libc.string cimport memcmp, memcpy, memset

import mmap as _mmap
import os

from overlaycache.errors import (
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    OutOfRangeError,
    Reason,
    RegionUnavailableError,
    StaleStackError,
)

IMPLEMENTATION = "cython"
#: Bitmaps of at least this many bytes are backed by an anonymous mapping (untouched pages are free).
BITMAP_MMAP_BYTES = 1 << 16

cdef extern from "_oc.h" nogil:
    int oc_install_sigbus_handler()
    int oc_guarded_copy(void *dst, const void *src, size_t n)
    int oc_guarded_copy_probe(void *dst, const void *src, size_t n, const void *probe)
    int oc_guarded_hash(const void *key, size_t length, unsigned char *out)
    void oc_mmh3_x64_128(const void *key, size_t length, unsigned char *out)
    void oc_init_tables()
    uint64_t oc_expand8[256]

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int msync(void *addr, size_t length, int flags)
    int madvise(void *addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE, MAP_NORESERVE, MS_SYNC, MADV_DONTNEED
    void *MAP_FAILED

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *lock, const void *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t *lock)
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)

cdef extern from *:
    """
    static inline int oc_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline int oc_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    static inline void oc_atomic_or64(unsigned long long *p, unsigned long long v) {
        __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
    }
    static inline int oc_little_endian(void) { const unsigned short one = 1; return *(const unsigned char *)&one; }
    """
    int oc_ctz64(unsigned long long x) nogil
    int oc_popcount64(unsigned long long x) nogil
    void oc_atomic_or64(unsigned long long *p, unsigned long long v) nogil
    int oc_little_endian() nogil

if not oc_little_endian():  # pragma: no cover - the formats are little-endian
    raise ImportError("overlaycache._core supports little-endian machines only")
if oc_install_sigbus_handler() != 0:  # pragma: no cover
    raise ImportError("overlaycache._core: cannot install the SIGBUS handler")
oc_init_tables()

cdef inline bint _bit(const uint64_t *words, Py_ssize_t i) noexcept nogil:
    return (words[i >> 6] >> (i & 63)) & 1


cdef class _Buffer:
    """A held buffer export: keeps the exporter pinned and its pointer valid until released."""

    cdef Py_buffer view
    cdef bint held

    def __cinit__(self, object obj, bint writable):
        flags = PyBUF_WRITABLE if writable else PyBUF_SIMPLE
        try:
            PyObject_GetBuffer(obj, &self.view, flags)
        except BufferError as exc:
            raise InvalidBufferError("a writable buffer is required" if writable else str(exc)) from exc
        except TypeError as exc:
            raise InvalidBufferError(
                f"expected a bytes-like object, got {type(obj).__name__}") from exc
        self.held = True
        if not PyBuffer_IsContiguous_C(&self.view):
            PyBuffer_Release(&self.view)
            self.held = False
            raise InvalidBufferError("buffer must be C-contiguous")

    cdef void release(self):
        if self.held:
            PyBuffer_Release(&self.view)
            self.held = False

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)

cdef extern from "Python.h":
    int _PyBuffer_IsContiguous "PyBuffer_IsContiguous" (Py_buffer *view, char order)

cdef inline bint PyBuffer_IsContiguous_C(Py_buffer *view) noexcept:
    return _PyBuffer_IsContiguous(view, b'C')


cdef class Bitmap:
    """A fixed-size bitmap of ``nbits`` bits in 64-bit little-endian words.

    Parameters
    ----------
    nbits : int
        Number of bits.
    buffer : writable buffer, optional
        Memory to use (for example an mmap'd file); at least ``8 * ceil(nbits / 64)`` bytes. By
        default the bitmap owns zeroed memory.
    """

    cdef uint64_t *words
    cdef readonly Py_ssize_t nbits
    cdef readonly Py_ssize_t nwords
    cdef object _owner
    cdef _Buffer _buf

    def __cinit__(self, Py_ssize_t nbits, object buffer=None):
        if nbits < 0:
            raise InvalidArgumentError(f"nbits must be >= 0, got {nbits}")
        self.nbits = nbits
        self.nwords = (nbits + 63) >> 6
        if buffer is None:
            nbytes = max(self.nwords, 1) * 8
            # A large one in zero pages of its own: memory only where bits were ever set.
            buffer = _mmap.mmap(-1, nbytes) if nbytes >= BITMAP_MMAP_BYTES else bytearray(nbytes)
        self._buf = _Buffer(buffer, True)
        if self._buf.view.len < self.nwords * 8:
            raise InvalidBufferError(
                f"buffer of {self._buf.view.len} bytes is too small for {nbits} bits")
        self._owner = buffer
        self.words = <uint64_t *>self._buf.view.buf

    def __len__(self):
        return self.nbits

    cdef inline void _check(self, Py_ssize_t i) except *:
        if i < 0 or i >= self.nbits:
            raise OutOfRangeError(f"bit {i} out of range [0, {self.nbits})")

    cdef inline void _check_range(self, Py_ssize_t start, Py_ssize_t stop) except *:
        if start < 0 or stop > self.nbits or start > stop:
            raise OutOfRangeError(f"range [{start}, {stop}) out of [0, {self.nbits})")

    def test(self, Py_ssize_t i):
        """Return whether bit ``i`` is set."""
        self._check(i)
        return bool(_bit(self.words, i))

    def set(self, Py_ssize_t i):
        """Set bit ``i``."""
        self._check(i)
        self.words[i >> 6] |= (<uint64_t>1) << (i & 63)

    def clear(self, Py_ssize_t i):
        """Clear bit ``i``."""
        self._check(i)
        self.words[i >> 6] &= ~((<uint64_t>1) << (i & 63))

    cdef void _fill(self, Py_ssize_t start, Py_ssize_t stop, bint value) noexcept nogil:
        cdef Py_ssize_t w0, w1, w
        cdef uint64_t m0, m1
        if start >= stop:
            return
        w0 = start >> 6
        w1 = (stop - 1) >> 6
        m0 = (~(<uint64_t>0)) << (start & 63)
        m1 = (~(<uint64_t>0)) >> (63 - ((stop - 1) & 63))
        if w0 == w1:
            m0 &= m1
            if value:
                self.words[w0] |= m0
            else:
                self.words[w0] &= ~m0
            return
        if value:
            self.words[w0] |= m0
            for w in range(w0 + 1, w1):
                self.words[w] = ~(<uint64_t>0)
            self.words[w1] |= m1
        else:
            self.words[w0] &= ~m0
            for w in range(w0 + 1, w1):
                self.words[w] = 0
            self.words[w1] &= ~m1

    def set_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Set bits ``start`` to ``stop - 1``."""
        self._check_range(start, stop)
        self._fill(start, stop, True)

    def clear_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Clear bits ``start`` to ``stop - 1``."""
        self._check_range(start, stop)
        self._fill(start, stop, False)

    def count(self, Py_ssize_t start=0, object stop=None):
        """Number of set bits in ``[start, stop)``."""
        cdef Py_ssize_t end = self.nbits if stop is None else stop
        cdef Py_ssize_t w, w0, w1, total = 0
        cdef uint64_t m0, m1
        self._check_range(start, end)
        if start == end:
            return 0
        w0 = start >> 6
        w1 = (end - 1) >> 6
        m0 = (~(<uint64_t>0)) << (start & 63)
        m1 = (~(<uint64_t>0)) >> (63 - ((end - 1) & 63))
        with nogil:
            if w0 == w1:
                total = oc_popcount64(self.words[w0] & m0 & m1)
            else:
                total = oc_popcount64(self.words[w0] & m0) + oc_popcount64(self.words[w1] & m1)
                for w in range(w0 + 1, w1):
                    total += oc_popcount64(self.words[w])
        return total

    cdef Py_ssize_t _next(self, Py_ssize_t pos, Py_ssize_t stop, bint value) noexcept nogil:
        """First index >= pos with the given value, or ``stop``."""
        cdef Py_ssize_t w
        cdef uint64_t word
        if pos >= stop:
            return stop
        w = pos >> 6
        word = self.words[w] if value else ~self.words[w]
        word &= (~(<uint64_t>0)) << (pos & 63)
        while word == 0:
            w += 1
            if (w << 6) >= stop:
                return stop
            word = self.words[w] if value else ~self.words[w]
        pos = (w << 6) + oc_ctz64(word)
        return pos if pos < stop else stop

    def runs(self, Py_ssize_t start=0, object stop=None, bint value=True):
        """Runs of bits equal to ``value`` in ``[start, stop)`` as a list of ``(first, stop)``."""
        cdef Py_ssize_t end = self.nbits if stop is None else stop
        cdef Py_ssize_t a, b
        self._check_range(start, end)
        out = []
        a = self._next(start, end, value)
        while a < end:
            b = self._next(a, end, not value)
            out.append((a, b))
            a = self._next(b, end, value)
        return out

    def test_many(self, indices, bint set_them=False):
        """Test many bits at once; returns a bytearray of 0/1, one per index. With ``set_them``,
        each bit is set after it is tested (a repeated index tests 1 the second time)."""
        cdef const uint64_t[::1] idx
        cdef Py_ssize_t k, n
        cdef uint64_t i
        cdef bytearray out
        cdef unsigned char *o
        try:
            idx = indices
        except (TypeError, ValueError, BufferError):
            from array import array
            try:
                idx = array("Q", indices)
            except (TypeError, OverflowError) as exc:
                raise InvalidArgumentError(f"indices must be non-negative integers: {exc}") from exc
        n = idx.shape[0]
        out = bytearray(n)
        o = out
        for k in range(n):
            if idx[k] >= <uint64_t>self.nbits:
                raise OutOfRangeError(f"bit {idx[k]} out of range [0, {self.nbits})")
        with nogil:
            for k in range(n):
                i = idx[k]
                o[k] = (self.words[i >> 6] >> (i & 63)) & 1
                if set_them:
                    self.words[i >> 6] |= (<uint64_t>1) << (i & 63)
        return out

    def any(self):
        """Whether any bit is set."""
        return self._next(0, self.nbits, True) < self.nbits

    def to_bytes(self, Py_ssize_t start=0, object stop=None):
        """Words ``start..stop`` (default: all) as little-endian bytes."""
        cdef Py_ssize_t end = self.nwords if stop is None else stop
        if start < 0 or end < start or end > self.nwords:
            raise OutOfRangeError(f"words [{start}, {end}) out of [0, {self.nwords})")
        return (<char *>self.words)[start * 8 : end * 8]

    def load(self, data):
        """Replace the contents with ``data`` as produced by :meth:`to_bytes` (words that are
        zero in both are not written: a mapping's untouched pages stay untouched)."""
        cdef const unsigned char[::1] src = data
        cdef Py_ssize_t i
        cdef uint64_t word
        if src.shape[0] != self.nwords * 8:
            raise InvalidArgumentError(
                f"expected {self.nwords * 8} bytes of bitmap, got {src.shape[0]}")
        for i in range(self.nwords):
            memcpy(&word, &src[8 * i], 8)
            if word != 0 or self.words[i] != 0:
                self.words[i] = word

    def copy(self):
        """An independent copy that owns its memory."""
        b = Bitmap(self.nbits)
        if self.nwords:
            b.load(self.to_bytes())
        return b


cdef void _resolve_into(uint64_t **maps, int nmaps, Py_ssize_t first, Py_ssize_t count,
                        unsigned char *out) noexcept nogil:
    """out[i] = index of the newest map (0 = newest) holding region first+i, else nmaps."""
    cdef Py_ssize_t done = 0, take, shift, k, pos
    cdef uint64_t assigned, mask, word, e, lval
    cdef int l, c
    memset(out, nmaps, count)
    while done < count:
        pos = first + done
        shift = pos & 63
        take = 64 - shift
        if take > count - done:
            take = count - done
        assigned = 0
        for l in range(nmaps):
            word = maps[l][pos >> 6] >> shift
            if take < 64:
                word &= ((<uint64_t>1) << take) - 1
            mask = word & ~assigned
            if mask == 0:
                continue
            assigned |= mask
            lval = (<uint64_t>l) * <uint64_t>0x0101010101010101
            for c in range(0, <int>take, 8):
                e = oc_expand8[(mask >> c) & 0xff]
                if e == 0:
                    continue
                k = done + c
                if k + 8 <= count:
                    _store8(out + k, e, lval)
                else:
                    _store_tail(out + k, e, lval, count - k)
        done += take


cdef extern from *:
    """
    static inline void _store8(unsigned char *p, unsigned long long e, unsigned long long v) {
        unsigned long long cur;
        memcpy(&cur, p, 8);
        cur = (cur & ~e) | (v & e);
        memcpy(p, &cur, 8);
    }
    static inline void _store_tail(unsigned char *p, unsigned long long e, unsigned long long v,
                                   long long n) {
        long long i;
        for (i = 0; i < n; i++)
            if ((e >> (8 * i)) & 0xff)
                p[i] = (unsigned char)(v & 0xff);
    }
    """
    void _store8(unsigned char *p, uint64_t e, uint64_t v) noexcept nogil
    void _store_tail(unsigned char *p, uint64_t e, uint64_t v, Py_ssize_t n) noexcept nogil


def resolve(bitmaps, Py_ssize_t first, Py_ssize_t count):
    """Index of the newest layer holding each region of ``[first, first + count)``.

    Parameters
    ----------
    bitmaps : sequence of Bitmap
        Layer bitmaps, newest first, all of the same length; at most 254.
    first, count : int
        The range of regions.

    Returns
    -------
    bytearray
        One byte per region: the index into ``bitmaps`` of the newest layer that holds it, or
        ``len(bitmaps)`` when none does (the region comes from the base).
    """
    cdef int nmaps = len(bitmaps), l
    cdef uint64_t **maps
    cdef bytearray out
    cdef Bitmap b
    cdef unsigned char *optr
    if nmaps > 254:
        raise InvalidArgumentError(f"at most 254 layers, got {nmaps}")
    for obj in bitmaps:
        if not isinstance(obj, Bitmap):
            raise InvalidArgumentError(f"expected Bitmap, got {type(obj).__name__}")
        b = obj
        if first < 0 or count < 0 or first + count > b.nbits:
            raise OutOfRangeError(f"regions [{first}, {first + count}) out of [0, {b.nbits})")
    if first < 0 or count < 0:
        raise OutOfRangeError(f"regions [{first}, {first + count}) out of range")
    out = bytearray(count)
    if count == 0:
        return out
    maps = <uint64_t **>malloc(max(nmaps, 1) * sizeof(uint64_t *))
    if maps == NULL:
        raise MemoryError()
    try:
        for l in range(nmaps):
            b = bitmaps[l]
            maps[l] = b.words
        optr = <unsigned char *>(<char *>out)
        with nogil:
            _resolve_into(maps, nmaps, first, count, optr)
    finally:
        free(maps)
    return out


def checksum(data):
    """MurmurHash3 x64-128 (seed 0) of a buffer, as 16 bytes; equal to ``mmh3.mmh3_x64_128_digest``."""
    cdef _Buffer buf = _Buffer(data, False)
    cdef unsigned char out[16]
    with nogil:
        oc_mmh3_x64_128(buf.view.buf, <size_t>buf.view.len, out)
    buf.release()
    return (<char *>out)[:16]


cdef class RWLock:
    """A readers-writer lock whose waits release the GIL."""

    cdef pthread_rwlock_t lock

    def __cinit__(self):
        if pthread_rwlock_init(&self.lock, NULL) != 0:
            raise MemoryError("cannot initialise a rwlock")

    def __dealloc__(self):
        pthread_rwlock_destroy(&self.lock)

    cdef inline void rdlock(self) noexcept nogil:
        pthread_rwlock_rdlock(&self.lock)

    cdef inline void unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.lock)

    def acquire_read(self):
        with nogil:
            pthread_rwlock_rdlock(&self.lock)

    def release_read(self):
        pthread_rwlock_unlock(&self.lock)

    def acquire_write(self):
        with nogil:
            pthread_rwlock_wrlock(&self.lock)

    def release_write(self):
        pthread_rwlock_unlock(&self.lock)


cdef class DataFile:
    """A file mapped into memory, accessed only through guarded copies.

    A page that cannot be read (file truncated under the map, failed device) raises
    :class:`MediaError` instead of killing the process.

    Parameters
    ----------
    fd : int
        Open file descriptor; the file must be at least ``length`` bytes long. Not closed here.
    length : int
        Bytes to map.
    writable : bool
        Map for writing.
    path : str
        Name used in error messages.
    private : bool
        Map copy-on-write (``MAP_PRIVATE``): writes change only this process's view, never the
        file, until :meth:`discard` drops them. The file may be opened read-only.
    """

    cdef unsigned char *base
    cdef readonly Py_ssize_t length
    cdef readonly bint writable
    cdef readonly bint private
    cdef readonly object path
    cdef int pins
    cdef bint _closed

    def __cinit__(self, int fd, Py_ssize_t length, bint writable, str path="", bint private=False):
        cdef void *p
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        self.path = path
        self.writable = writable
        self.private = private
        self.length = length
        self.base = NULL
        if length < 0:
            raise InvalidArgumentError(f"length must be >= 0, got {length}")
        oc_install_sigbus_handler()  # back in front if a later handler displaced it
        if length == 0:
            return
        p = mmap(NULL, length, prot, (MAP_PRIVATE if private else MAP_SHARED) | MAP_NORESERVE, fd, 0)
        if p == MAP_FAILED:
            raise MediaError(f"cannot map {path}: {os.strerror(errno)}", path=path, offset=0)
        self.base = <unsigned char *>p

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.length)
            self.base = NULL

    @property
    def closed(self):
        return self._closed

    cdef inline void _check(self, Py_ssize_t offset, Py_ssize_t n) except *:
        if self._closed:
            raise InvalidArgumentError(f"{self.path}: mapping is closed")
        if offset < 0 or n < 0 or offset + n > self.length:
            raise OutOfRangeError(
                f"{self.path}: bytes [{offset}, {offset + n}) out of [0, {self.length})")

    cdef inline _fault(self, Py_ssize_t offset):
        raise MediaError(
            f"{self.path}: cannot access bytes at offset {offset} "
            "(file truncated or device failed)", path=self.path, offset=offset)

    def readinto(self, Py_ssize_t offset, buffer):
        """Copy ``len(buffer)`` bytes at ``offset`` into ``buffer``; returns the count."""
        cdef _Buffer out = _Buffer(buffer, True)
        cdef Py_ssize_t n = out.view.len
        cdef int rc
        try:
            self._check(offset, n)
            with nogil:
                rc = oc_guarded_copy(out.view.buf, self.base + offset, n)
            if rc != 0:
                self._fault(offset)
        finally:
            out.release()
        return n

    def write(self, Py_ssize_t offset, data):
        """Copy ``data`` into the file at ``offset``; returns the count."""
        cdef _Buffer src = _Buffer(data, False)
        cdef Py_ssize_t n = src.view.len
        cdef int rc
        try:
            if not self.writable:
                raise InvalidArgumentError(f"{self.path}: mapped read-only")
            self._check(offset, n)
            with nogil:
                rc = oc_guarded_copy(self.base + offset, src.view.buf, n)
            if rc != 0:
                self._fault(offset)
        finally:
            src.release()
        return n

    def copy_to(self, Py_ssize_t offset, DataFile dst, Py_ssize_t dst_offset, Py_ssize_t length):
        """Copy ``length`` bytes at ``offset`` into ``dst`` at ``dst_offset``."""
        cdef int rc
        if not dst.writable:
            raise InvalidArgumentError(f"{dst.path}: mapped read-only")
        self._check(offset, length)
        dst._check(dst_offset, length)
        with nogil:
            rc = oc_guarded_copy(dst.base + dst_offset, self.base + offset, length)
        if rc != 0:
            raise MediaError(
                f"cannot copy {self.path}@{offset} to {dst.path}@{dst_offset} "
                "(file truncated or device failed)", path=self.path, offset=offset)

    def checksum(self, Py_ssize_t offset, Py_ssize_t length):
        """MurmurHash3 x64-128 of ``length`` bytes at ``offset``."""
        cdef unsigned char out[16]
        cdef int rc
        self._check(offset, length)
        with nogil:
            rc = oc_guarded_hash(self.base + offset, length, out)
        if rc != 0:
            self._fault(offset)
        return (<char *>out)[:16]

    def discard(self):
        """Drop the private copies of a ``private`` mapping: it shows the file again."""
        cdef int rc = 0
        if not self.private:
            raise InvalidArgumentError(f"{self.path}: not a private mapping")
        if self.base != NULL and not self._closed:
            with nogil:
                rc = madvise(self.base, self.length, MADV_DONTNEED)
            if rc != 0:
                raise MediaError(f"{self.path}: madvise failed: {os.strerror(errno)}", path=self.path, offset=0)

    def sync(self):
        """Write dirty pages back to the file and wait for them (msync MS_SYNC); nothing for a
        private mapping."""
        cdef int rc = 0
        if self.base != NULL and self.writable and not self.private:
            with nogil:
                rc = msync(self.base, self.length, MS_SYNC)
            if rc != 0:
                raise MediaError(f"{self.path}: msync failed", path=self.path, offset=0)

    def close(self):
        """Unmap; fails while a Stack still uses this file."""
        if self.pins:
            raise InvalidArgumentError(f"{self.path}: still in use by {self.pins} reader(s)")
        self._closed = True
        if self.base != NULL:
            munmap(self.base, self.length)
            self.base = NULL


cdef struct _Layer:
    const unsigned char *data
    const unsigned char *end  # data + mapped length
    uint64_t *present     # NULL: holds every region (the base)
    uint64_t *verified    # NULL: never verify
    const unsigned char *recs  # the record of region r at recs + stride * r
    Py_ssize_t stride     # 16: a checksum, region r at r * region_size (the base); REC_SIZE: a slot record
    unsigned char salt[16]


cdef enum:
    REC_SIZE = 32  # a slot record: slot + 1 (u64, 0: none), the region's checksum, the record's check


cdef inline bint _zero16(const unsigned char *p) noexcept nogil:
    cdef int i
    for i in range(16):
        if p[i]:
            return False
    return True


cdef inline uint64_t _le64(const unsigned char *p) noexcept nogil:
    cdef uint64_t out = 0
    cdef int i
    for i in range(8):
        out |= (<uint64_t>p[i]) << (8 * i)
    return out


cdef inline uint64_t _record_check(const unsigned char *salt, Py_ssize_t r, const unsigned char *rec) noexcept nogil:
    """The check of a slot record: the first 8 bytes of MurmurHash3 x64-128 of the layer's salt,
    the region number (u64) and the record's first 24 bytes (``local.layers.record_check``)."""
    cdef unsigned char buf[48]
    cdef unsigned char digest[16]
    cdef uint64_t reg = <uint64_t>r
    cdef int i
    memcpy(buf, salt, 16)
    for i in range(8):
        buf[16 + i] = (reg >> (8 * i)) & 0xff
    memcpy(buf + 24, rec, 24)
    oc_mmh3_x64_128(buf, 48, digest)
    return _le64(digest)


cdef inline int _check_sum(const unsigned char *src, Py_ssize_t rlen, Py_ssize_t region_size,
                           const unsigned char *want) noexcept nogil:
    """0 if the region at ``src`` matches the checksum ``want``; -1 if it cannot be read, -3 if not."""
    cdef unsigned char digest[16]
    if rlen > region_size:
        rlen = region_size
    if oc_guarded_hash(src, rlen, digest) != 0:
        return -1
    return 0 if memcmp(digest, want, 16) == 0 else -3


cdef class Stack:
    """The read path of one virtual image: layers newest first, the last one the base.

    Parameters
    ----------
    lock : RWLock
        Shared with the writer of the layers; reads hold it for reading.
    region_size, size : int
        Geometry of the volume.
    layers : list of tuple
        ``(datafile, present, verified, records, offset, salt)`` newest first. ``present`` is a
        Bitmap, or None for the base (which holds every region at ``r * region_size``);
        ``verified`` a Bitmap of the regions already checked against their checksums (the same
        one may serve every layer), or None. ``records`` is a DataFile with the record of region
        ``r`` at ``offset + stride * r``: for the base (``salt`` None) its 16-byte checksum, all
        zeros meaning an all-zero region; for an overlay (``salt`` 16 bytes) a 32-byte slot record
        (slot + 1 as u64, the checksum, the record's check; see ``local.layers``). A record is
        checked with its region's data.
    """

    cdef RWLock lock
    cdef readonly Py_ssize_t region_size
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t num_regions
    cdef int shift
    cdef int nlayers
    cdef _Layer *layers
    cdef list _keep
    cdef bint released
    cdef unsigned char zero_full[16]
    cdef unsigned char zero_tail[16]
    # Routing (see route()): regions unavailable below the top ``npo`` layers come from the cache.
    cdef int npo
    cdef const uint64_t *unavail
    cdef const unsigned char *cdata
    cdef const unsigned char *cend
    cdef const int64_t *cslots
    cdef uint64_t *cverified
    cdef const unsigned char *csums
    cdef Py_ssize_t ccapacity

    def __cinit__(self, RWLock lock, Py_ssize_t region_size, Py_ssize_t size, list layers):
        cdef int i
        cdef DataFile f, recs
        cdef Bitmap bm
        cdef Py_ssize_t offset, tail
        cdef unsigned char *zeros
        cdef bytes salt_bytes
        self.released = True  # until every layer is pinned
        self._keep = []
        self.lock = lock
        self.region_size = region_size
        self.size = size
        self.num_regions = (size + region_size - 1) // region_size
        self.shift = 0
        while ((<Py_ssize_t>1) << self.shift) < region_size:
            self.shift += 1
        if ((<Py_ssize_t>1) << self.shift) != region_size:
            raise InvalidArgumentError(f"region_size {region_size} is not a power of two")
        self.nlayers = len(layers)
        if self.nlayers < 1:
            raise InvalidArgumentError("a stack needs at least a base layer")
        zeros = <unsigned char *>calloc(region_size, 1)
        if zeros == NULL:
            raise MemoryError()
        tail = size - ((self.num_regions - 1) << self.shift)
        oc_mmh3_x64_128(zeros, region_size, self.zero_full)
        oc_mmh3_x64_128(zeros, tail, self.zero_tail)
        free(zeros)
        self.layers = <_Layer *>malloc(self.nlayers * sizeof(_Layer))
        if self.layers == NULL:
            raise MemoryError()
        memset(self.layers, 0, self.nlayers * sizeof(_Layer))
        keep = []
        for i, (datafile, present, verified, records, offset, salt) in enumerate(layers):
            f = datafile
            recs = records
            self.layers[i].data = f.base
            self.layers[i].end = f.base + f.length
            if present is not None:
                bm = present
                if bm.nbits < self.num_regions:
                    raise InvalidArgumentError("present bitmap too small")
                self.layers[i].present = bm.words
                keep.append(bm)
            if verified is not None:
                bm = verified
                if bm.nbits < self.num_regions:
                    raise InvalidArgumentError("verified bitmap too small")
                self.layers[i].verified = bm.words
                keep.append(bm)
            if salt is None:
                self.layers[i].stride = 16
            else:
                salt_bytes = bytes(salt)
                if len(salt_bytes) != 16:
                    raise InvalidArgumentError("a salt is 16 bytes")
                self.layers[i].stride = REC_SIZE
                memcpy(self.layers[i].salt, <const char *>salt_bytes, 16)
            if offset < 0 or offset + self.layers[i].stride * self.num_regions > recs.length:
                raise InvalidArgumentError("record table too small")
            self.layers[i].recs = recs.base + offset
            keep.append(f)
            keep.append(recs)
        if self.layers[self.nlayers - 1].present != NULL or self.layers[self.nlayers - 1].stride != 16:
            raise InvalidArgumentError("the last layer must be the base (present=None, salt=None)")
        for obj in keep:
            if isinstance(obj, DataFile):
                (<DataFile>obj).pins += 1
        self._keep = keep
        self.released = False

    def release(self):
        """Unpin the layer files; the stack cannot be used afterwards."""
        cdef int i
        cdef DataFile f
        if self.released:
            return
        self.released = True
        for obj in self._keep or ():
            if isinstance(obj, DataFile):
                f = obj
                f.pins -= 1
            elif isinstance(obj, _Buffer):
                (<_Buffer>obj).release()
        self._keep = []

    def __dealloc__(self):
        if not self.released:
            self.release()
        if self.layers != NULL:
            free(self.layers)

    def route(self, int po_layers, Bitmap unavailable, DataFile cache, slots, Bitmap verified, sums):
        """Serve the regions that are unavailable locally from a cache of remote region versions.

        A region is remote (R) when its bit in ``unavailable`` is set and none of the top
        ``po_layers`` layers holds it. Its entry in ``slots`` (int64 per region) says where it is:
        ``k > 0`` in cache slot ``k - 1`` (verified against ``sums``, 16 bytes per slot, on its
        first read unless its bit in ``verified`` is set), ``-1`` all zeros, ``0`` not cached: a
        miss, reported by :meth:`readinto_routed`. The caller changes ``slots`` and the cache's
        slots only while holding the stack's lock for writing.
        """
        cdef _Buffer sl, sm
        cdef Py_ssize_t capacity
        if self.released:
            raise StaleStackError("the layers of this image changed; retry with the new stack")
        if self.unavail != NULL:
            raise InvalidArgumentError("this stack is already routed")
        if po_layers < 0 or po_layers >= self.nlayers:
            raise InvalidArgumentError(f"po_layers must be in [0, {self.nlayers}), got {po_layers}")
        if unavailable.nbits < self.num_regions:
            raise InvalidArgumentError("unavailable bitmap too small")
        capacity = cache.length >> self.shift
        sl = _Buffer(slots, False)
        sm = _Buffer(sums, False)
        if sl.view.len < self.num_regions * 8 or sm.view.len < capacity * 16 or verified.nbits < capacity:
            sl.release()
            sm.release()
            raise InvalidArgumentError("slot table, checksums or verified bitmap too small")
        self._keep.extend((unavailable, verified, sl, sm, cache))
        cache.pins += 1
        self.npo = po_layers
        self.ccapacity = capacity
        self.cdata = cache.base
        self.cend = cache.base + cache.length
        self.cslots = <const int64_t *>sl.view.buf
        self.csums = <const unsigned char *>sm.view.buf
        self.cverified = verified.words
        self.unavail = unavailable.words

    @property
    def routed(self):
        """Whether :meth:`route` was called."""
        return self.unavail != NULL

    cdef inline int _find(self, Py_ssize_t r) noexcept nogil:
        cdef int l
        for l in range(self.nlayers - 1):
            if _bit(self.layers[l].present, r):
                return l
        return self.nlayers - 1

    cdef inline int _slot(self, _Layer *layer, Py_ssize_t r, unsigned char *rec, Py_ssize_t *slot) noexcept nogil:
        """Where region ``r`` is in ``layer``'s file, in region-sized slots; an overlay's record is
        left in ``rec``. 0, or 1 (the record cannot be read) / 2 (it names no slot of the file)."""
        cdef uint64_t v
        if layer.stride == 16:
            slot[0] = r
            return 0
        if oc_guarded_copy(rec, layer.recs + REC_SIZE * r, REC_SIZE) != 0:
            return 1
        v = _le64(rec)
        if v == 0 or v - 1 >= <uint64_t>((layer.end - layer.data) >> self.shift):
            return 2
        slot[0] = <Py_ssize_t>(v - 1)
        return 0

    cdef inline int _want(self, _Layer *layer, Py_ssize_t r, unsigned char *rec, Py_ssize_t rlen,
                          const unsigned char **want) noexcept nogil:
        """The checksum region ``r`` of ``layer`` must match (``rec`` holds an overlay's record,
        and takes the base's checksum). 0, or 1 (cannot be read) / 2 (the record fails its check)."""
        if layer.stride == 16:
            if oc_guarded_copy(rec, layer.recs + 16 * r, 16) != 0:
                return 1
            if _zero16(rec):
                if rlen == self.region_size:
                    want[0] = &self.zero_full[0]
                else:
                    want[0] = &self.zero_tail[0]
            else:
                want[0] = rec
            return 0
        if _record_check(layer.salt, r, rec) != _le64(rec + 24):
            return 2
        want[0] = rec + 8
        return 0

    cdef int _read(self, Py_ssize_t offset, unsigned char *out, Py_ssize_t length,
                   int64_t *misses, Py_ssize_t *nmiss, Py_ssize_t *bad) noexcept nogil:
        """Copy ``length`` bytes at ``offset`` to ``out``; 0, or 1 (I/O error) / 2 (checksum) at
        region ``bad``; 4 at a remote region when ``misses`` is NULL. A routed stack serves R regions from the cache; those it cannot serve are
        skipped and listed in ``misses`` (``r``: not cached, ``-r - 1``: cached copy damaged)."""
        cdef Py_ssize_t pos = offset, end = offset + length, r, intra, n, rlen, slot
        cdef const unsigned char *probe
        cdef int rc
        cdef int64_t k
        cdef int l
        cdef const unsigned char *src
        cdef unsigned char digest[16]
        cdef unsigned char rec[REC_SIZE]
        cdef const unsigned char *want = NULL
        cdef _Layer *layer
        nmiss[0] = 0
        while pos < end:
            r = pos >> self.shift
            intra = pos - (r << self.shift)
            n = self.region_size - intra
            if n > end - pos:
                n = end - pos
            l = self._find(r)
            if self.unavail != NULL and l >= self.npo and _bit(self.unavail, r):
                k = self.cslots[r]
                if misses == NULL and k != -1:
                    bad[0] = r
                    return 4
                if k == -1:
                    memset(out + (pos - offset), 0, n)
                elif k <= 0 or k > self.ccapacity:
                    misses[nmiss[0]] = r
                    nmiss[0] += 1
                else:
                    slot = k - 1
                    src = self.cdata + (slot << self.shift)
                    probe = src + self.region_size
                    if probe >= self.cend:
                        probe = NULL
                    if not _bit(self.cverified, slot):
                        rlen = self.size - (r << self.shift)
                        if rlen > self.region_size:
                            rlen = self.region_size
                        if (oc_guarded_hash(src, rlen, digest) != 0
                                or memcmp(digest, self.csums + 16 * slot, 16) != 0):
                            misses[nmiss[0]] = -r - 1
                            nmiss[0] += 1
                            pos += n
                            continue
                        oc_atomic_or64(<unsigned long long *>&self.cverified[slot >> 6],
                                       (<uint64_t>1) << (slot & 63))
                    rc = oc_guarded_copy_probe(out + (pos - offset), src + intra, n, probe)
                    if rc == -2:
                        rc = _check_sum(src, self.size - (r << self.shift), self.region_size,
                                        self.csums + 16 * slot)
                    if rc != 0:
                        misses[nmiss[0]] = -r - 1
                        nmiss[0] += 1
                pos += n
                continue
            layer = &self.layers[l]
            rc = self._slot(layer, r, rec, &slot)
            if rc != 0:
                bad[0] = r
                return rc
            src = layer.data + (slot << self.shift)
            # Copied with a probe of the page after the region (see oc_guarded_copy_probe), so that
            # a file truncated inside the region's last page is not read as zeros.
            probe = src + self.region_size
            if probe >= layer.end:
                probe = NULL
            rlen = self.size - (r << self.shift)
            if rlen > self.region_size:
                rlen = self.region_size
            if layer.verified != NULL and not _bit(layer.verified, r):
                rc = self._want(layer, r, rec, rlen, &want)
                if rc != 0:
                    bad[0] = r
                    return rc
                if oc_guarded_hash(src, rlen, digest) != 0:
                    bad[0] = r
                    return 1
                if memcmp(digest, want, 16) != 0:
                    bad[0] = r
                    return 2
                oc_atomic_or64(<unsigned long long *>&layer.verified[r >> 6],
                               (<uint64_t>1) << (r & 63))
            rc = oc_guarded_copy_probe(out + (pos - offset), src + intra, n, probe)
            if rc == -2:  # the file ends at or inside this region: good only if it matches its checksum
                rc = self._want(layer, r, rec, rlen, &want)
                if rc == 0:
                    rc = _check_sum(src, rlen, self.region_size, want)
                elif rc == 2:
                    bad[0] = r
                    return 2
            if rc != 0:
                bad[0] = r
                return 1
            pos += n
        return 0

    def readinto_routed(self, Py_ssize_t offset, buffer):
        """Read ``len(buffer)`` bytes at ``offset`` holding the read lock, R regions from the cache.

        Returns ``(nbytes, misses)``: the regions not served, ``r`` for a region not cached and
        ``-r - 1`` for a cached copy that failed its checksum or could not be read. Their bytes in
        ``buffer`` are left as they were.
        """
        cdef _Buffer out
        cdef Py_ssize_t n, bad = -1, nmiss = 0, span, i
        cdef int64_t *misses
        cdef int rc
        if self.unavail == NULL:
            raise InvalidArgumentError("this stack is not routed")
        out = _Buffer(buffer, True)
        try:
            n = out.view.len
            if offset < 0 or offset + n > self.size:
                raise OutOfRangeError(
                    f"bytes [{offset}, {offset + n}) out of the volume [0, {self.size})")
            span = ((offset + n - 1) >> self.shift) - (offset >> self.shift) + 1 if n else 1
            misses = <int64_t *>malloc(span * sizeof(int64_t))
            if misses == NULL:
                raise MemoryError()
            try:
                with nogil:
                    self.lock.rdlock()
                    if self.released:
                        rc = 3
                    else:
                        rc = self._read(offset, <unsigned char *>out.view.buf, n, misses, &nmiss, &bad)
                    self.lock.unlock()
                if rc == 3:
                    raise StaleStackError("the layers of this image changed; retry with the new stack")
                if rc:
                    self._raise(rc, bad)
                return n, [misses[i] for i in range(nmiss)]
            finally:
                free(misses)
        finally:
            out.release()

    cdef _raise(self, int rc, Py_ssize_t bad):
        if rc == 1:
            raise RegionUnavailableError(
                f"region {bad} cannot be read (I/O error or file truncated)",
                regions=(bad,), reason=Reason.IO)
        if rc == 4:
            raise RegionUnavailableError(
                f"region {bad} is remote and not cached: read it with readinto_routed",
                regions=(bad,), reason=Reason.REMOTE)
        raise RegionUnavailableError(
            f"region {bad} does not match its checksum", regions=(bad,), reason=Reason.CHECKSUM)

    cdef int _read_raw(self, Py_ssize_t offset, unsigned char *out, Py_ssize_t n,
                       bint lock) except -1:
        cdef Py_ssize_t bad = -1, nmiss = 0
        cdef int rc
        if offset < 0 or n < 0 or offset + n > self.size:
            raise OutOfRangeError(
                f"bytes [{offset}, {offset + n}) out of the volume [0, {self.size})")
        with nogil:
            if lock:
                self.lock.rdlock()
            # Checked under the lock: the writer releases a stack only while holding it.
            if self.released:
                rc = 3
            else:
                rc = self._read(offset, out, n, NULL, &nmiss, &bad)
            if lock:
                self.lock.unlock()
        if rc == 3:
            raise StaleStackError("the layers of this image changed; retry with the new stack")
        if rc:
            self._raise(rc, bad)
        return 0

    cdef Py_ssize_t _readinto(self, Py_ssize_t offset, object buffer, bint lock) except -1:
        cdef _Buffer out = _Buffer(buffer, True)
        cdef Py_ssize_t n = out.view.len
        try:
            self._read_raw(offset, <unsigned char *>out.view.buf, n, lock)
        finally:
            out.release()
        return n

    def readinto(self, Py_ssize_t offset, buffer):
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer`` holding the read lock."""
        return self._readinto(offset, buffer, True)

    def readinto_locked(self, Py_ssize_t offset, buffer):
        """As :meth:`readinto`, for a caller that already holds the lock."""
        return self._readinto(offset, buffer, False)

    def read(self, Py_ssize_t offset, Py_ssize_t length):
        """Read ``length`` bytes at ``offset`` as a new bytes object."""
        cdef bytes out
        if length < 0:
            raise OutOfRangeError(f"length must be >= 0, got {length}")
        out = PyBytes_FromStringAndSize(NULL, length)
        self._read_raw(offset, <unsigned char *>PyBytes_AS_STRING(out), length, True)
        return out

    def locate(self, Py_ssize_t region):
        """``(layer_index, byte offset in that layer's file)`` of ``region``.

        Raises
        ------
        RegionUnavailableError
            An overlay's record of the region cannot be read or names no slot of its file.
        """
        cdef int l, rc
        cdef Py_ssize_t slot = region
        cdef unsigned char rec[REC_SIZE]
        if region < 0 or region >= self.num_regions:
            raise OutOfRangeError(f"region {region} out of [0, {self.num_regions})")
        l = self._find(region)
        rc = self._slot(&self.layers[l], region, rec, &slot)
        if rc != 0:
            self._raise(rc, region)
        return l, slot << self.shift
