"""What a worker raises and warns, rebuilt in the parent as it was.

Exceptions raised in a worker travel as :func:`pack_exception` tuples: the
worker's formatted traceback, and the exception pickled by
:class:`_ExceptionPickler`.  Plain pickle rebuilds an exception as
``cls(*args)``, which fails or formats the message twice when ``__init__``
takes other arguments, and drops ``__cause__`` and ``__context__``, unless
tblib's pickling is installed (``distributed`` does).  This pickler rebuilds every
exception in the message from its ``args``, ``__dict__`` and ``__slots__``
without calling a Python ``__init__``, with its chain, whatever is imported;
what does not pickle (an attribute, a slot, a cause) is left out and named in
the traceback text, and ``str()`` is never needed; a class that pickle cannot
find by name (defined inside a function) is the parent's own, found by
identity (identity.py).  :func:`unpack_exception` attaches the worker's
traceback as the exception's ``__cause__`` (as ``concurrent.futures`` does),
followed by the original cause.  Only an exception that still cannot make the
round trip (its ``args`` do not pickle, its class was made in the worker and
does not pickle by value) is replaced by a :class:`LostException` that keeps
its type name, message and traceback text.

Warnings issued in a worker come home too.  Each worker records them
(``warnings.showwarning``, after the filters it inherited at the fork have
decided: ``error`` still raises there, ``ignore`` drops them) and sends
:func:`take_warnings` with each reply; the parent re-issues them with
:func:`reissue`, with their category, text, file and line, into the
warnings registry of the module they came from.  So the caller's filters,
``catch_warnings(record=True)``, ``pytest.warns`` and "once per location"
decide as they would for threads: a warning from the same line in several
workers or tasks is shown once under the default filter.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import sys
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

from . import identity

# -- remote warnings ----------------------------------------------------------

#: warnings this worker issued since the last take_warnings(): (category, text, file, line)
_CAUGHT: list[tuple[type, str, str, int]] = []
#: category -> whether it survives pickling (a class defined in a function does not)
_TRAVELS: dict[type, bool] = {}


def _record_warning(message: Any, category: type, filename: str, lineno: int,
                    file: Any = None, line: Any = None) -> None:
    """``warnings.showwarning`` in a worker: keep it for the parent."""
    if category not in _TRAVELS:
        try:
            _TRAVELS[category] = pickle.loads(pickle.dumps(category)) is category
        except Exception:
            _TRAVELS[category] = False
    text = str(message)
    if not _TRAVELS[category]:
        text, category = f"{category.__qualname__}: {text}", UserWarning
    _CAUGHT.append((category, text, filename, lineno))


WARNINGS = "warnings"  # the kind of the message that carries them, before a reply


def take_warnings() -> list:
    """The warnings this worker issued since the last call, to send to the parent.

    >>> import warnings
    >>> warnings.showwarning, saved = _record_warning, warnings.showwarning
    >>> warnings.warn("careful", RuntimeWarning)
    >>> warnings.showwarning = saved
    >>> [(c.__name__, text) for c, text, *_ in take_warnings()]
    [('RuntimeWarning', 'careful')]
    """
    caught = _CAUGHT[:]
    _CAUGHT.clear()
    return caught


#: file name -> the warnings registry of the module loaded from it, or a private one
_REGISTRIES: dict[str, tuple[str, dict]] = {}


def _registry(filename: str) -> tuple[str, dict]:
    """The module name and ``__warningregistry__`` that ``warnings.warn`` would use there."""
    found = _REGISTRIES.get(filename)
    if found is None:
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) == filename:
                found = (name, vars(module).setdefault("__warningregistry__", {}))
                break
        else:
            found = (os.path.splitext(os.path.basename(filename))[0], {})
        _REGISTRIES[filename] = found
    return found


def reissue(caught: list | None) -> None:
    """Issue in this process the warnings a worker recorded (see :func:`take_warnings`)."""
    for category, text, filename, lineno in caught or ():
        module, registry = _registry(filename)
        warnings.warn_explicit(text, category, filename, lineno, module=module,
                               registry=registry)


# -- remote exceptions --------------------------------------------------------

class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of its exception."""

    def __init__(self, tb: str, where: str = ""):
        super().__init__(tb)
        self.tb = tb
        self.where = where  # e.g. "task 'x'", set by the session that knows

    def __str__(self) -> str:
        where = f", in {self.where}" if self.where else ""
        return ("\n\n" + self.tb.rstrip("\n")
                + f"\n\n(the traceback above was raised in a worker process{where})")


class LostException(Exception):
    """Stands in for a worker's exception that could not be pickled."""


_BUILTIN = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)


def _reduces_itself(cls: type) -> bool:
    """Whether ``cls`` has a ``__reduce__`` written in Python: it knows its own arguments."""
    return not (isinstance(cls.__reduce__, _BUILTIN) and isinstance(cls.__reduce_ex__, _BUILTIN))


def _set_slots(obj: object) -> dict[str, Any]:
    """The ``__slots__`` of every class of ``type(obj)`` that are set, by (mangled) name.

    >>> class E(Exception):
    ...     __slots__ = ("a", "b")
    >>> e = E()
    >>> e.a = 1
    >>> _set_slots(e)
    {'a': 1}
    """
    found = {}
    # what pickle itself reads for other objects (private: not in typeshed)
    for name in copyreg._slotnames(type(obj)):  # type: ignore[attr-defined]
        try:
            found[name] = getattr(obj, name)
        except AttributeError:  # never set: it stays unset in the copy too
            pass
    return found


def _new_exception(cls: type, init_args: tuple, args: tuple) -> BaseException:
    """Rebuild an exception the way ``cls(*init_args)`` would, minus every
    ``__init__`` written in Python: those take their own arguments, not ``args``.

    The built-in ``__init__`` still runs, for the fields of built-in bases
    that live outside ``__dict__`` (``OSError.errno``, ``SystemExit.code``).
    """
    exc = cls.__new__(cls, *init_args)
    init = next(vars(k)["__init__"] for k in cls.__mro__
                if isinstance(vars(k).get("__init__"), types.WrapperDescriptorType))
    init(exc, *init_args)
    exc.args = args
    return exc


def _chained(make: Callable, make_args: tuple, cause: BaseException | None,
             context: BaseException | None, suppress: bool) -> BaseException:
    exc = make(*make_args)
    exc.__cause__, exc.__context__ = cause, context
    exc.__suppress_context__ = suppress
    return exc


class _ExceptionPickler(pickle.Pickler):
    """Pickles exceptions, at any depth, so that they rebuild as they were raised.

    Plain pickle rebuilds an exception as ``cls(*args)``, which fails or gives
    another message when ``__init__`` takes other arguments, and drops
    ``__cause__`` and ``__context__``; tblib (which ``distributed`` installs)
    changes both, so what came back would depend on what was imported.  Here
    an exception is rebuilt by :func:`_new_exception` with its ``args``,
    ``__dict__`` and the ``__slots__`` that are set, and its chain -- unless its
    class has a ``__reduce__`` of its own, which is then used as it is.  A
    class that pickle cannot find by name (one defined inside a function)
    crosses by identity, as a result's does (``identity.reduce``).

    Slots matter because no ``__init__`` runs: ``BaseException.__reduce__``
    leaves them out (``cls(*args)`` would set them again), and a class that
    keeps its fields there needs them back -- numpy's AxisError formats its
    message from the slots ``axis`` and ``ndim``.  They travel in the state
    dict beside ``__dict__``'s items, since ``BaseException.__setstate__``
    sets each key with ``setattr``, which reaches a slot as well.

    ``lenient``: attributes (slots too), causes and contexts that do not pickle
    are left out, and described in ``dropped``.
    """

    def __init__(self, file: io.BytesIO, lenient: bool = False):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.lenient = lenient
        self.dropped: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, BaseException):
            return (identity.reduce(obj) if isinstance(obj, identity.KINDS)
                    else NotImplemented)
        cls = type(obj)
        reduced = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if isinstance(reduced, str):
            return NotImplemented
        make, make_args, *rest = reduced
        if make is cls and not _reduces_itself(cls):
            make, make_args = _new_exception, (cls, make_args, obj.args)
            state = {**(rest[0] if rest else {}), **_set_slots(obj)}
            rest = [state] if state else []
        cause, context = obj.__cause__, obj.__context__
        if self.lenient:
            name = f"{cls.__module__}.{cls.__qualname__}"
            if rest and isinstance(rest[0], dict):
                rest[0] = {key: value for key, value in rest[0].items()
                           if self._keeps(value, f"attribute {key!r} of {name}")}
            cause = cause if self._keeps(cause, f"the __cause__ of {name}") else None
            context = context if self._keeps(context, f"the __context__ of {name}") else None
        return (_chained, (make, make_args, cause, context, obj.__suppress_context__), *rest)

    def _keeps(self, value: Any, what: str) -> bool:
        try:
            _dumps(value, lenient=True)
        except Exception as e:
            self.dropped.append(f"{what} ({type(e).__name__}: {e})")
            return False
        return True


def _dumps(obj: Any, lenient: bool = False) -> tuple[bytes, list[str]]:
    """Pickle with :class:`_ExceptionPickler`; raise unless it also unpickles."""
    buf = io.BytesIO()
    pickler = _ExceptionPickler(buf, lenient)
    pickler.dump(obj)
    pickle.loads(buf.getvalue())
    return buf.getvalue(), pickler.dropped


def pack_exception(exc: BaseException) -> tuple:
    """Turn an exception into ``(pickle or None, type name, message, traceback)``.

    It never raises, whatever ``exc`` does when pickled or printed.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception as e:  # not str(e): that could fail too
        message = f"<str() failed with {type(e).__name__}>"
    blob: bytes | None = None
    for lenient in (False, True):
        try:
            blob, dropped = _dumps(exc, lenient)
        except Exception:
            continue
        if dropped:
            tb += ("\n(left out of the exception sent to the parent, as they could not "
                   "be pickled: " + "; ".join(dropped) + ")\n")
        break
    return (blob, name, message, tb)


def unpack_exception(packed: tuple, where: str = "") -> tuple[BaseException, bool]:
    """Rebuild a packed exception; say whether its type survived.

    Its ``__cause__`` becomes the worker's traceback (naming ``where`` it was
    raised, e.g. ``"task 'x'"``), whose own ``__cause__`` is the exception's
    original cause.
    """
    blob, name, message, tb = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    lost = exc is None
    if exc is None:
        exc = LostException(f"{name}: {message} (the exception could not be pickled; "
                            "its type is lost, its message and traceback are kept)")
    remote = RemoteTraceback(tb, where)
    remote.__cause__ = exc.__cause__
    exc.__cause__ = remote
    return exc, lost
