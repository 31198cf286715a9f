"""raw_module: cupy.RawModule for the CUDA emulator, compiled with g++ and launched through ctypes.

`RawModule(code, options, name_expressions)` compiles cuda_model.h + code + one launcher per
name expression with g++ (-fsanitize=thread instrumentation, hooks of our own, see
cuda_model.h) into a shared library, cached under MINUNET_EMU_CACHE (default
~/.cache/minunet-emulator) by the sha256 of everything that goes into it.
`get_function(name)` returns a Kernel; `kernel(grid, block, args)` checks each argument
against the kernel's C++ parameter types and runs the grid (or, while the current stream
captures, records the launch for graph.launch(): see capture.py). fake_cupy.py describes the
checks; this file is its compile-and-launch half.
"""
import ctypes
import hashlib
import os
import pathlib
import re
import subprocess
import tempfile

import numpy as np

from cuda_emulator import EmulatorError, capture
from cuda_emulator.fake_cupy import (HEADER, LINKER_SCRIPT, ORDERS, CompileException, _exported_table, ndarray,
                                     settings)

class _Range(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_size_t), ("len", ctypes.c_size_t), ("writable", ctypes.c_int), ("arg", ctypes.c_int)]


class _Launch(ctypes.Structure):  # mirrors emu::Launch in cuda_model.h
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("order", ctypes.c_int),
                ("seed", ctypes.c_ulonglong), ("nranges", ctypes.c_int), ("ranges", _Range * 64),
                ("kernel", ctypes.c_char_p), ("message", ctypes.c_char * 2048),
                ("exported", ctypes.POINTER(ctypes.c_ulonglong)), ("nexported", ctypes.c_int)]


_IGNORED_OPTIONS = ("-arch", "--gpu-architecture", "-ftz", "--ftz", "-lineinfo", "--generate-line-info",
                    "--use_fast_math", "-use_fast_math", "--fmad", "-fmad", "-rdc", "--relocatable-device-code")


def _gxx_options(options):
    """NVRTC options -> g++ options: the language standard, macros and include folders carry over;
    code-generation flags with no CPU meaning are dropped; anything else is an error."""
    out = []
    for opt in options:
        if opt.startswith(("--std=", "-std=")):
            out.append("-std=" + opt.split("=", 1)[1])
        elif opt.startswith(("-D", "-I", "--define-macro=", "--include-path=")):
            out.append(opt.replace("--define-macro=", "-D").replace("--include-path=", "-I"))
        elif opt.startswith(_IGNORED_OPTIONS):
            continue
        else:
            raise ValueError(f"cupy (emulated): NVRTC option {opt!r} has no meaning the emulator knows")
    return out


CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-O2", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gnu-unique", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-fdata-sections",
              "-fno-strict-aliasing", "-Wno-unknown-pragmas"]


def _cache_dir():
    d = pathlib.Path(os.environ.get("MINUNET_EMU_CACHE", pathlib.Path.home() / ".cache" / "minunet-emulator"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(source, flags):
    """The path of the shared library for `source`, compiled once and cached by content."""
    key = hashlib.sha256("\0".join([source, *flags, *BASE_FLAGS, CXX, LINKER_SCRIPT.read_text()]).encode()).hexdigest()[:32]
    lib = _cache_dir() / f"{key}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(prefix="minunet-emu-") as tmp:
        src, obj, out = (pathlib.Path(tmp) / n for n in ("module.cpp", "module.o", "module.so"))
        src.write_text(source)
        for cmd in ([CXX, *flags, *BASE_FLAGS, "-c", str(src), "-o", str(obj)],
                    [CXX, "-shared", str(obj), "-o", str(out), f"-Wl,-T,{LINKER_SCRIPT}", "-Wl,-z,defs", "-Wl,-Bsymbolic"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise CompileException(f"cupy (emulated): g++ failed ({' '.join(cmd[:1] + cmd[-3:])}):\n{r.stderr}")
        tmp_lib = lib.with_name(f"{key}.{os.getpid()}.tmp")
        tmp_lib.write_bytes(out.read_bytes())
        os.replace(tmp_lib, lib)  # atomic: other processes see all of it or nothing
    return lib


def _function_name(signature):
    """'void f<float, g<float>(int)::{lambda(int)#1}>(int, float*)' -> 'f<float, g<float>(int)::{lambda(int)#1}>':
    the demangled name without its return type and parameter list."""
    depth = 0
    for i, ch in enumerate(signature):
        if ch in "<{":
            depth += 1
        elif ch in ">}":
            depth -= 1
        elif ch == "(" and depth == 0:
            signature = signature[:i]
            break
    return signature.removeprefix("void ")


class RawModule:
    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None or not name_expressions:
            raise ValueError("cupy (emulated): RawModule needs code= and name_expressions=")
        self.name_expressions = list(name_expressions)
        launchers = "".join(
            f'extern "C" __attribute__((visibility("default"))) int emu_launch_{i}(emu::Launch* L, void** a) '
            f'{{ return emu::launch(L, &{e}, a); }}\n'
            f'extern "C" __attribute__((visibility("default"))) int emu_signature_{i}(char* o, int n) '
            f'{{ return emu::signature(&{e}, o, n); }}\n'
            for i, e in enumerate(self.name_expressions))
        source = (f'#line 1 "cuda_model.h"\n{HEADER.read_text()}\n#line 1 "<RawModule code>"\n{code}\n'
                  f'#line 1 "<emulator launchers>"\n{launchers}')
        self._path = _compile(source, _gxx_options(options))
        self.uses_tables = "table_pointer" in code  # its launches list the exported arrays
        self._lib = ctypes.CDLL(str(self._path))
        self._functions = {}
        self._shared = None

    def shared_variable(self, offset):
        """'byte b of NAME in FUNCTION' for byte `offset` of the module's shared memory (from nm)."""
        if self._shared is None:
            r = subprocess.run(["nm", "-C", "-S", "--defined-only", str(self._path)], capture_output=True, text=True)
            symbols, begin = [], None
            for line in r.stdout.splitlines():
                parts = line.split(" ", 3)
                if len(parts) == 3 and parts[2] == "__emu_shared_begin":
                    begin = int(parts[0], 16)
                elif len(parts) == 4 and "::" in parts[3]:
                    symbols.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
            self._shared = [(a - begin, n, name) for a, n, name in symbols] if begin is not None else []
        for start, size, name in self._shared:
            if start <= offset < start + size:
                function, _, variable = name.rpartition("::")
                return f"byte {offset - start} of {variable} in {_function_name(function)}"
        return "unknown variable"


    def get_function(self, name):
        if name not in self.name_expressions:
            raise KeyError(f"cupy (emulated): {name!r} is not one of this module's name expressions "
                           f"{self.name_expressions}")
        if name not in self._functions:
            self._functions[name] = Kernel(self, self.name_expressions.index(name), name)
        return self._functions[name]


_SCALAR_KIND = {"f": "f", "i": "i", "u": "u", "b": "b"}


class Kernel:
    def __init__(self, module, index, name):
        self.name, self.module = name, module
        lib = module._lib
        self._launch = getattr(lib, f"emu_launch_{index}")
        self._launch.argtypes = [ctypes.POINTER(_Launch), ctypes.POINTER(ctypes.c_void_p)]
        sig = ctypes.create_string_buffer(4096)
        getattr(lib, f"emu_signature_{index}")(sig, len(sig))
        self.params = [p for p in sig.value.decode().split(",") if p]

    def _pack(self, i, param, arg, ranges):
        """One argument as bytes the launcher reads with the parameter's C++ type."""
        where = f"{self.name}: argument {i}"
        if param[0] in "pP":
            if arg is None:
                return ctypes.c_void_p(0)
            if not isinstance(arg, ndarray):
                raise TypeError(f"{where} is a pointer; expected a device array or None, got {type(arg).__name__}")
            kind, size = param[1], int(param[2:])
            if kind != "v" and (_SCALAR_KIND.get(arg.dtype.kind) != kind or arg.dtype.itemsize != size):
                raise TypeError(f"{where}: the kernel takes a pointer to a {size}-byte '{kind}' type, "
                                f"got an array of {arg.dtype}")
            if not arg.flags.c_contiguous:
                raise ValueError(f"{where}: array of shape {arg.shape} is not C-contiguous")
            ptr = arg.__array_interface__["data"][0]
            ranges.append((ptr, arg.nbytes, param[0] == "p", i))
            return ctypes.c_void_p(ptr)
        kind, size = param[0], int(param[1:])
        if isinstance(arg, ndarray) or arg is None:
            raise TypeError(f"{where} is a {size}-byte scalar, got {type(arg).__name__}")
        if isinstance(arg, bool):
            value = np.bool_(arg)
        elif isinstance(arg, int):
            value = np.int64(arg)
        elif isinstance(arg, float):
            value = np.float64(arg)
        elif isinstance(arg, np.generic):
            value = arg
        else:
            raise TypeError(f"{where}: unsupported argument type {type(arg).__name__}")
        if _SCALAR_KIND.get(value.dtype.kind) != kind or value.dtype.itemsize != size:
            raise TypeError(f"{where}: the kernel takes a {size}-byte '{kind}' scalar, got {value.dtype} "
                            f"({value!r}); pass it as the matching NumPy type")
        return ctypes.create_string_buffer(value.tobytes(), size)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if shared_mem:
            raise EmulatorError(f"{self.name}: dynamic shared memory (shared_mem={shared_mem}) is not modelled")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: the kernel takes {len(self.params)} arguments, got {len(args)}")
        ranges = []
        packed = [self._pack(i, p, a, ranges) for i, (p, a) in enumerate(zip(self.params, args))]
        dims = lambda d: tuple(int(v) for v in (d if isinstance(d, tuple) else (d,))) + (1, 1)  # noqa: E731
        if len(dims(grid)) > 5 or len(dims(block)) > 5:
            raise ValueError(f"{self.name}: grid and block have at most 3 dimensions")
        rec = capture.recording()
        if rec is None:
            self._run(dims(grid)[:3], dims(block)[:3], packed, ranges)
        else:  # the launch recorded with its arguments' addresses; the pools or arrays under them kept alive
            for a in args:
                if isinstance(a, ndarray):
                    capture.raw(a, rec)
            rec.record(lambda: self._run(dims(grid)[:3], dims(block)[:3], packed, ranges))

    def _run(self, grid, block, packed, ranges):
        argv = (ctypes.c_void_p * max(1, len(packed)))(*(ctypes.addressof(p) for p in packed))
        L = _Launch()
        L.grid[:], L.block[:] = grid, block
        L.order = ORDERS[settings.block_order]
        settings.launches += 1
        settings.launched.add(self.name)
        L.seed = settings.launches
        L.nranges = len(ranges)
        for k, (lo, n, writable, arg) in enumerate(ranges):
            L.ranges[k] = _Range(lo, n, int(writable), arg)
        kernel_name = self.name.encode()
        L.kernel = kernel_name
        if self.module.uses_tables:
            exported, L.nexported = _exported_table()
            L.exported = ctypes.cast(exported, ctypes.POINTER(ctypes.c_ulonglong))
        if self._launch(ctypes.byref(L), argv) != 0:
            message = re.sub(r"shared byte (\d+)",
                             lambda m: f"{m[0]} ({self.module.shared_variable(int(m[1]))})",
                             L.message.decode(errors="replace"))
            raise EmulatorError(f"CUDA emulator: {message}")
