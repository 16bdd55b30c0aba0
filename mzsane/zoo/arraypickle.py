"""Plain numpy arrays out of pickle files, without running the pickle machine.

Why a parser and not a restricted ``pickle.Unpickler``: dataset packages ship their arrays as pickles, and
any unpickler resolves the names a file asks for and *calls* them. Allow-listing names by prefix (e.g.
``numpy.*``) is not enough: numpy itself holds functions that execute strings
(``numpy.testing._private.utils.runstring``). This module instead walks the opcodes with
:func:`pickletools.genops`, which only decodes them, and interprets the few that make up a pickled
ndarray. Names are never imported; the three constructors a plain array needs are recognised by name
and rebuilt with :func:`numpy.frombuffer`, and object dtypes (whose elements would be arbitrary pickled
objects) are refused. Anything else in the stream is an error naming the opcode or the name.

Supported shapes of a pickled array: ``numpy.core.multiarray._reconstruct`` + ``BUILD`` (protocols 0-4,
``numpy.core`` or ``numpy._core``), raw data as bytes or as ``_codecs.encode(str, 'latin1')``
(protocol 2 from Python 3) or ``bytes()`` when empty, and ``numpy.core.numeric._frombuffer`` (protocol 5, in-band
buffers).
"""
from __future__ import annotations

import io
import pickletools
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

_RECONSTRUCT = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
_FROMBUFFER = {"numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"}
_NDARRAY = "numpy.ndarray"
_DTYPE = "numpy.dtype"
_ENCODE = "_codecs.encode"
_EMPTY_BYTES = {"builtins.bytes", "__builtin__.bytes"}  # protocols 0-2 write b"" as bytes()
_ALLOWED = _RECONSTRUCT | _FROMBUFFER | _EMPTY_BYTES | {_NDARRAY, _DTYPE, _ENCODE}
# fixed-size numeric dtypes only: bool, signed/unsigned ints, floats, complex (never "O", "V", "U", ...)
_DTYPE_CODE = re.compile(r"^[<>|=]?(b1|\?|[iu][1248]|f[248]|c(8|16))$")
_MAX_BYTES = 1 << 33  # 8 GiB: no dataset array is larger; a shape beyond that is hostile or corrupt

_PUSH_ARG = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
             "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
             "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_PUSH_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_IGNORED = {"PROTO", "FRAME", "STOP"}


class ArrayPickleError(ValueError):
    """The stream is not a plain numeric ndarray pickle (the message names what was found)."""


@dataclass(frozen=True)
class _Name:
    """A global the stream refers to; kept as text, never imported."""

    qualified: str


@dataclass
class _PendingDtype:
    """``numpy.dtype(code)``; its ``BUILD`` may still set the byte order."""

    dtype: np.dtype


@dataclass
class _PendingArray:
    """``_reconstruct(ndarray, ...)`` before its ``BUILD`` fills in shape, dtype and data."""

    array: np.ndarray | None = None


class _Mark:
    pass


_MARK = _Mark()


def load_array(fh: BinaryIO) -> np.ndarray:
    """The ndarray pickled in ``fh`` (a readable binary file); raises ArrayPickleError otherwise."""
    data = fh.read()
    try:
        result = _interpret(pickletools.genops(io.BytesIO(data)))
    except ArrayPickleError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as err:  # malformed opcode arguments
        raise ArrayPickleError(f"malformed array pickle ({err})") from None
    if isinstance(result, _PendingArray):
        result = result.array
    if not isinstance(result, np.ndarray):
        raise ArrayPickleError(f"the pickle holds a {type(result).__name__}, not a numpy array")
    return result


def _interpret(ops: Any) -> Any:
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in ops:
        name = op.name
        if name in _IGNORED:
            if name == "STOP":
                break
        elif name in _PUSH_ARG:
            stack.append(arg)
        elif name in _PUSH_CONST:
            stack.append(_PUSH_CONST[name])
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "TUPLE":
            start = _last_mark(stack)
            items = tuple(stack[start + 1:])
            del stack[start:]
            stack.append(items)
        elif name in _TUPLE_N:
            n = _TUPLE_N[name]
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_global(module, attr))
        elif name == "REDUCE":
            args, func = stack.pop(), stack.pop()
            stack.append(_reduce(func, args))
        elif name == "BUILD":
            state = stack.pop()
            _build(stack[-1], state)
        else:
            raise ArrayPickleError(f"opcode {name} is not part of a plain array pickle")
    if len(stack) != 1:
        raise ArrayPickleError("the pickle does not end with exactly one object")
    return stack[0]


def _last_mark(stack: list[Any]) -> int:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            return i
    raise ArrayPickleError("TUPLE without MARK")


def _global(module: Any, attr: Any) -> _Name:
    qualified = f"{module}.{attr}"
    if qualified not in _ALLOWED:
        raise ArrayPickleError(f"refusing the name {qualified}: only plain numpy arrays are accepted")
    return _Name(qualified)


def _dtype(code: Any) -> _PendingDtype:
    if not isinstance(code, str) or not _DTYPE_CODE.match(code):
        raise ArrayPickleError(f"refusing dtype {code!r}: only fixed-size numeric dtypes are accepted")
    return _PendingDtype(np.dtype(code))


def _reduce(func: Any, args: Any) -> Any:
    if not isinstance(func, _Name) or not isinstance(args, tuple):
        raise ArrayPickleError("REDUCE on something other than an allowed numpy constructor")
    if func.qualified == _DTYPE:
        return _dtype(args[0] if args else None)
    if func.qualified in _RECONSTRUCT:
        if not args or args[0] != _Name(_NDARRAY):
            raise ArrayPickleError("only numpy.ndarray itself can be reconstructed (no subclasses)")
        return _PendingArray()
    if func.qualified == _ENCODE:
        if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
            raise ArrayPickleError("_codecs.encode is accepted only as encode(str, 'latin1') for raw array data")
        return args[0].encode("latin1")
    if func.qualified in _EMPTY_BYTES:
        if args:
            raise ArrayPickleError("bytes(...) is accepted only without arguments (an empty array's data)")
        return b""
    if func.qualified in _FROMBUFFER:
        if len(args) != 4:
            raise ArrayPickleError("_frombuffer needs (buffer, dtype, shape, order)")
        buffer, dtype, shape, order = args
        return _array_from(buffer, dtype, shape, order == "F")
    raise ArrayPickleError(f"{func.qualified} cannot be called here")


def _build(target: Any, state: Any) -> None:
    if isinstance(target, _PendingDtype):
        # dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise ArrayPickleError("refusing a structured or sub-array dtype")
        if state[1] in ("<", ">"):
            target.dtype = target.dtype.newbyteorder(state[1])
        return
    if not isinstance(target, _PendingArray) or target.array is not None:
        raise ArrayPickleError("BUILD on something other than a fresh array")
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise ArrayPickleError("array state must be (version, shape, dtype, fortran, data)")
    shape, dtype, fortran, raw = state[-4:]
    target.array = _array_from(raw, dtype, shape, bool(fortran))


def _array_from(raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    dtype = dtype.dtype if isinstance(dtype, _PendingDtype) else None
    if dtype is None or dtype.hasobject:
        raise ArrayPickleError("refusing an array whose dtype is not a plain numeric dtype")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ArrayPickleError(f"array shape {shape!r} is not a tuple of non-negative ints")
    if not isinstance(raw, (bytes, bytearray)):
        raise ArrayPickleError("array data is not raw bytes")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize > _MAX_BYTES or count * dtype.itemsize != len(raw):
        raise ArrayPickleError(f"array data holds {len(raw)} bytes, shape {shape} x {dtype} needs "
                               f"{count * dtype.itemsize}")
    flat = np.frombuffer(bytes(raw), dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C").copy()
