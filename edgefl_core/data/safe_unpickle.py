"""Read data-only pickles (CIFAR-10's python batches) without executing them.

The standard unpickler imports and calls whatever the file names, so a poisoned dataset file would run code
on the device. This module walks the opcode stream with :func:`pickletools.genops` (an opcode parser) and builds only
plain containers, numbers, strings/bytes and NumPy arrays/dtypes; any other global or opcode is an
error naming it. Nothing is imported or called from the file's say-so.
"""
from __future__ import annotations

from pickletools import genops
from pathlib import Path
from typing import Any

import numpy as np


class UnsafePickleError(ValueError):
    """The pickle asks for something other than plain data."""


_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
_ALLOWED_GLOBALS = _RECONSTRUCT | _FROMBUFFER | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _Global:
    def __init__(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"pickle references {module}.{name}, which is not plain data")
        self.key = (module, name)


class _DtypeBox:
    """A dtype under construction (BUILD may set its byte order after memoization)."""

    def __init__(self, spec: Any):
        spec = spec.decode() if isinstance(spec, bytes) else spec
        self.dtype = np.dtype(spec)

    def build(self, state: tuple) -> None:
        if len(state) > 1 and state[1] in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayBox:
    """An ndarray from ``_reconstruct`` awaiting its BUILD state (version, shape, dtype, fortran, data)."""

    def __init__(self):
        self.value: np.ndarray | None = None

    def build(self, state: tuple) -> None:
        if len(state) != 5:
            raise UnsafePickleError(f"unexpected ndarray state of length {len(state)}")
        _, shape, dtype, fortran, data = state
        dtype = dtype.dtype if isinstance(dtype, _DtypeBox) else np.dtype(dtype)
        if isinstance(data, str):
            data = data.encode("latin-1")
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafePickleError("ndarray data is not a byte string (object arrays are not data)")
        arr = np.frombuffer(bytes(data), dtype=dtype)
        self.value = arr.reshape(shape, order="F" if fortran else "C")


def _call(func: Any, args: tuple) -> Any:
    if not isinstance(func, _Global):
        raise UnsafePickleError("REDUCE on something that is not an allowed global")
    if func.key in _RECONSTRUCT:
        return _ArrayBox()
    if func.key == ("numpy", "dtype"):
        return _DtypeBox(args[0])
    if func.key in _FROMBUFFER:
        buf, dtype, shape, order = args
        dtype = dtype.dtype if isinstance(dtype, _DtypeBox) else np.dtype(dtype)
        return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)
    if func.key == ("_codecs", "encode"):
        text, encoding = args
        return text.encode(encoding)
    raise UnsafePickleError(f"cannot call {func.key}")


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _ArrayBox):
        if obj.value is None:
            raise UnsafePickleError("ndarray without state")
        return obj.value
    if isinstance(obj, _DtypeBox):
        return obj.dtype
    if isinstance(obj, dict):
        return {_resolve(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


_MARK = object()


def loads(data: bytes) -> Any:
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise UnsafePickleError("MARK not found")

    for op, arg, pos in genops(data):
        name = op.name
        if name in ("PROTO", "FRAME", "READONLY_BUFFER"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise UnsafePickleError("malformed pickle: stack not empty at STOP")
            return _resolve(stack.pop())
        if name == "MARK":
            stack.append(_MARK)
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4",
                      "BINFLOAT", "INT", "LONG", "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
                      "UNICODE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, arg))
        elif name in ("BINSTRING", "SHORT_BINSTRING", "STRING"):
            # Python 2 str: keep bytes, as pickle.load(encoding="bytes") does.
            stack.append(arg.encode("latin-1") if isinstance(arg, str) else arg)
        elif name == "BYTEARRAY8":
            stack.append(bytearray(arg))
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            for k, v in zip(items[::2], items[1::2]):
                stack[-1][k] = v
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[int(arg)])
        elif name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
            stack.append(_Global(module, qualname))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            stack.append(_Global(module, qualname))
        elif name == "REDUCE":
            args, func = stack.pop(), stack.pop()
            stack.append(_call(func, args))
        elif name == "BUILD":
            state = stack.pop()
            target = stack[-1]
            if not isinstance(target, (_ArrayBox, _DtypeBox)):
                raise UnsafePickleError(f"BUILD on {type(target).__name__} at byte {pos}")
            target.build(state)
        else:
            raise UnsafePickleError(f"pickle opcode {name} at byte {pos} is not allowed in a data file")
    raise UnsafePickleError("pickle ended without STOP")


def load_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        return loads(path.read_bytes())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, TypeError, EOFError) as e:
        raise UnsafePickleError(f"{path}: malformed pickle ({e})") from None
