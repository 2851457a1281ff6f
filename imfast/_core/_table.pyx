"""Connection table and timing wheel, Cython twins of :mod:`imfast._core.table_py`.

Same API and observable behaviour as the pure-Python module, whose docstring
states the guarantees; ``tests/unit/test_core_parity.py`` replays random
operation sequences on both.  Sessions stay ordinary Python objects: only
``user``, ``device`` and ``bound`` are read and written on them.
"""

cimport cython
from libc.math cimport ceil, copysign, floor, fmod, isinf, isnan

__all__ = ["ConnectionTable", "TimerWheel"]

# Ticks are C long longs.  A deadline beyond 2**62 resolutions is kept under a
# Python int key (it never fires, as in the twin); expired(now) with ``now``
# that far is refused with OverflowError (the twin would loop tick by tick
# for ever there).
cdef double _TICK_LIMIT = 4611686018427387904.0


@cython.final
cdef class ConnectionTable:
    """Sessions by user and device; ``session.user``/``session.device`` are read."""

    def __cinit__(self):
        self._by_user = {}
        self._count = 0
        self._bound = 0

    def __len__(self):
        if self._count < 0:
            # More remove() than add() calls.  Returning -1 from a C-level __len__
            # would be a SystemError; this is the twin's error.
            raise ValueError("__len__() should return >= 0")
        return self._count

    @property
    def authenticated(self):
        """Sessions bound to a user."""
        return self._bound

    @property
    def users(self):
        """Distinct users with at least one bound session."""
        return len(self._by_user)

    def add(self, session):
        """Count a new (not yet authenticated) session."""
        self._count += 1

    def bind(self, session, user, device):
        """Attach ``session`` to (user, device); return the session it replaces, or None."""
        cdef list kept
        # Same order of attribute writes and reads as the twin (session may be current).
        session.user = user
        session.device = device
        current = self._by_user.get(user)
        replaced = None
        if current is None:
            self._by_user[user] = session
        elif type(current) is tuple:
            kept = []
            for other in <tuple>current:
                if other.device == device:
                    replaced = other
                else:
                    kept.append(other)
            kept.append(session)
            self._by_user[user] = tuple(kept)
        elif current.device == device:
            replaced = current
            self._by_user[user] = session
        else:
            self._by_user[user] = (current, session)
        if replaced is None:
            self._bound += 1
        else:
            replaced.bound = False
        session.bound = True
        return replaced

    def remove(self, session):
        """Forget ``session`` (idempotent for the bound part; counts once)."""
        cdef list kept
        self._count -= 1
        if not getattr(session, "bound", False):
            return
        session.bound = False
        self._bound -= 1
        user = session.user
        current = self._by_user.get(user)
        if current is session:
            del self._by_user[user]
        elif type(current) is tuple:
            kept = [s for s in <tuple>current if s is not session]
            if len(kept) == 1:
                self._by_user[user] = kept[0]
            elif kept:
                self._by_user[user] = tuple(kept)
            else:
                del self._by_user[user]

    cdef tuple sessions_tuple(self, object user):
        current = self._by_user.get(user)
        if current is None:
            return ()
        if type(current) is tuple:
            return <tuple>current
        return (current,)

    def sessions_of(self, user):
        """All live sessions of ``user`` (possibly empty)."""
        return self.sessions_tuple(user)

    def session_of(self, user, device):
        """The session of (user, device), or None."""
        for s in self.sessions_tuple(user):
            if s.device == device:
                return s
        return None

    def iter_sessions(self):
        """Every bound session (a snapshot: safe to close sessions while iterating)."""
        # A generator like the twin's: the snapshot is taken at the first next().
        snapshot = list(self._by_user.values())
        for entry in snapshot:
            if type(entry) is tuple:
                yield from <tuple>entry
            else:
                yield entry


cdef double _py_floordiv(double vx, double wx) except? -1.0:
    """``vx // wx`` exactly as CPython computes it for floats (floatobject.c).

    Not ``floor(vx / wx)``: that differs near multiples (1.0 // 0.1 is 9.0, but
    floor(1.0 / 0.1) is 10.0), and the wheel must put items in the same
    buckets as the twin.
    """
    cdef double mod, div, floordiv
    if wx == 0.0:
        raise ZeroDivisionError("float floor division by zero")
    mod = fmod(vx, wx)
    div = (vx - mod) / wx
    if mod:
        if (wx < 0) != (mod < 0):
            div -= 1.0
    if div:
        floordiv = floor(div)
        if div - floordiv > 0.5:
            floordiv += 1.0
    else:
        floordiv = copysign(0.0, vx / wx)
    return floordiv


cdef long long _to_tick(double x) except? -1:
    # The same exceptions as int(x) / math.ceil(x) in the twin.
    if isnan(x):
        raise ValueError("cannot convert float NaN to integer")
    if isinf(x):
        raise OverflowError("cannot convert float infinity to integer")
    if not -_TICK_LIMIT < x < _TICK_LIMIT:
        raise OverflowError("timer deadline out of range")
    return <long long>x


@cython.final
cdef class TimerWheel:
    """Deadlines bucketed by ``resolution`` seconds; see :mod:`imfast._core.table_py`."""

    def __cinit__(self, double resolution=1.0, double now=0.0):
        self._resolution = resolution
        self._buckets = {}
        self._size = 0
        self._next_tick = self._tick_at(now)

    cdef long long _tick_at(self, double now) except? -1:
        return _to_tick(_py_floordiv(now, self._resolution))

    def __len__(self):
        return self._size

    def schedule(self, item, double deadline):
        """Hand ``item`` back from :meth:`expired` once ``deadline`` has passed."""
        cdef double x = ceil(deadline / self._resolution)
        cdef long long tick
        if isnan(x) or isinf(x):
            _to_tick(x)  # raises what math.ceil raises in the twin
        if x >= _TICK_LIMIT:
            # Absurdly far ("never"): a Python int key, as math.ceil gives the twin;
            # expired() cannot reach it, so it never fires, as in the twin.
            key = int(x)
        else:
            tick = <long long>x if x > -_TICK_LIMIT else self._next_tick
            if tick < self._next_tick:
                tick = self._next_tick
            key = tick
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [item]
        else:
            (<list>bucket).append(item)
        self._size += 1

    def expired(self, double now):
        """Items whose deadline is <= now, in deadline-bucket order."""
        cdef long long current = self._tick_at(now)
        cdef long long tick
        cdef list due = []
        cdef list keys
        if not self._buckets:
            self._next_tick = current + 1
            return due
        tick = self._next_tick
        if current - tick >= <long long>len(self._buckets):
            # The clock jumped further than there are buckets: visit the buckets,
            # not every tick in between (the twin loops over the ticks; same
            # result, since every key is >= _next_tick).
            keys = sorted([k for k in self._buckets if k <= current])
            for key in keys:
                due.extend(<list>self._buckets.pop(key))
        else:
            while tick <= current:
                bucket = self._buckets.pop(tick, None)
                if bucket is not None:
                    due.extend(<list>bucket)
                tick += 1
        self._size -= len(due)
        self._next_tick = current + 1
        return due
