"""Every CUDA kernel compiles, for sm_80 (A100) and sm_90 (H100), on a machine WITHOUT a GPU.

NVRTC, CUDA's runtime compiler, is a plain library: CuPy's binding to it
(cupy_backends.cuda.libs.nvrtc) and the `nvidia-cuda-nvrtc-cu12` wheel need no driver and no
device. Each kernel family is compiled exactly as minunet.cuda compiles it at run time (the
same source text, name expressions and options, from `minunet.cuda._compile_table()`), plus
`-arch=sm_XX`, which makes NVRTC emit a CUBIN, so ptxas (the assembler that allocates
registers) runs too, and `-Xptxas=-v`, which makes ptxas report each kernel's resources.
A kernel that does not compile fails here with NVRTC's log; the registers, spills and shared
memory of every kernel instantiation are printed as a table (visible without -s) and
recorded as a junit property.

Skips only where CuPy or the NVRTC library cannot be loaded. On a fresh machine:
    pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12
(cupy-cuda12x 14 pulls in cuda-pathfinder, which finds libnvrtc inside the wheel.)
"""
import pathlib
import re

import pytest

try:
    from cupy_backends.cuda.libs import nvrtc

    NVRTC_VERSION = nvrtc.getVersion()
    from minunet import cuda
except Exception as e:  # no cupy, or no libnvrtc: an ImportError or a CUDA error at load time
    pytest.skip(f"CuPy's NVRTC cannot be loaded ({type(e).__name__}: {e}); "
                f"pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12", allow_module_level=True)

ARCHS = ["sm_80", "sm_90"]
FAMILIES = [family for family, *_ in cuda._compile_table()]


def compile_family(family, arch):
    """Compile one family to a CUBIN for `arch`; return {name expression: resources}."""
    _, source, names, options = next(entry for entry in cuda._compile_table() if entry[0] == family)
    prog = nvrtc.createProgram(source, f"{family}.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [*options, f"-arch={arch}", "-Xptxas=-v"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"{family}.cu does not compile for {arch} ({e}):\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        assert nvrtc.getCUBIN(prog)[:4] == b"\x7fELF", f"{family}.cu: NVRTC returned no CUBIN for {arch}"
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)
    resources = parse_ptxas(log)
    missing = [name for name, mangled in lowered.items() if mangled not in resources]
    assert not missing, f"{family}.cu: ptxas reported nothing for {missing} on {arch}:\n{log}"
    return {name: resources[lowered[name]] for name in names}


def parse_ptxas(log):
    """{mangled kernel name: {registers, spill_stores, spill_loads, smem}} from ptxas -v output:
        ptxas info : Compiling entry function '_Z17conv2d_forward_v2IfEv...' for 'sm_80'
        ptxas      . 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info : Used 61 registers, used 1 barriers, 8320 bytes smem, 436 bytes cmem[0]"""
    out, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = out.setdefault(m.group(1), {"registers": None, "spill_stores": None,
                                                   "spill_loads": None, "smem": 0})
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(s.group(1))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_compiles(family, arch, record_property, capsys):
    resources = compile_family(family, arch)
    for name, r in resources.items():
        assert r["registers"] is not None and r["spill_stores"] is not None, \
            f"{name} on {arch}: could not read ptxas' resource report {r}"
        assert r["registers"] <= 255, f"{name} on {arch} uses {r['registers']} registers"
    record_property(f"ptxas_{family}_{arch}", resources)
    lines = [f"{arch}  {name:<48} {r['registers']:>4} regs  {r['spill_stores']:>4} B spill st  "
             f"{r['spill_loads']:>4} B spill ld  {r['smem']:>6} B smem" for name, r in resources.items()]
    with capsys.disabled():
        print(f"\n[ptxas -v, NVRTC {NVRTC_VERSION[0]}.{NVRTC_VERSION[1]}] {family}.cu\n" + "\n".join(lines))


def test_every_kernel_source_is_a_family():
    """Each kernels/*.cu is compiled by the loader (and so by this test), none is forgotten."""
    on_disk = sorted(p.stem for p in cuda._kernel_dir().glob("*.cu"))
    assert on_disk == sorted(FAMILIES), f"kernels/*.cu {on_disk} vs minunet.cuda.FAMILIES {sorted(FAMILIES)}"


def test_each_kernel_family_shares_its_name_with_a_cpu_module():
    """An op family's CUDA file and its CPU module have one stem: kernels/max_pool2d.cu and
    minunet/cpu/max_pool2d.py (minunet/cpu/runtime.py, simd.py and gemm.py are the CPU's thread
    set-up, SIMD vectors and matrix products, no family; a family may keep a version in a module
    of its own, named <family>_<version>.py, as conv2d_winograd.py)."""
    cpu_dir = pathlib.Path(cuda.__file__).resolve().parent / "cpu"
    stems = [p.stem for p in cpu_dir.glob("*.py") if p.stem not in ("__init__", "runtime", "simd", "gemm")]
    cpu_modules = sorted(s for s in stems if not any(s.startswith(f + "_") for f in stems))
    assert sorted(FAMILIES) == cpu_modules, f"minunet.cuda.FAMILIES {sorted(FAMILIES)} vs minunet/cpu/ {cpu_modules}"


def test_sources_include_no_headers_and_open_with_a_teaching_comment():
    """NVRTC ships no standard headers, and the loader pastes common.cuh in as text: no #include."""
    for path in sorted(cuda._kernel_dir().glob("*.cu*")):
        text = path.read_text()
        assert not re.search(r"^\s*#\s*include", text, re.M), f"{path.name} has an #include"
        assert text.startswith("/*"), f"{path.name} must open with a block comment that teaches"


def test_tile_constants_mirror_common_cuh():
    """cuda.py sizes the GEMM grids with its copy of the tile constants; they must match the kernels'."""
    text = (cuda._kernel_dir() / "common.cuh").read_text()
    for name in ("GEMM_TILE_M", "GEMM_TILE_N", "GEMM_TILE_K", "GEMM_THREADS"):
        m = re.search(rf"^#define {name} (\d+)", text, re.M)
        assert m, f"common.cuh does not #define {name}"
        assert int(m.group(1)) == getattr(cuda, name), \
            f"{name}: common.cuh says {m.group(1)}, minunet/cuda.py says {getattr(cuda, name)}"
    m = re.search(r"^#define OPTIM_CHUNK (\d+)", (cuda._kernel_dir() / "optim.cu").read_text(), re.M)
    assert m and int(m.group(1)) == cuda.OPTIM_CHUNK, "OPTIM_CHUNK: optim.cu and minunet/cuda.py disagree"


def test_every_version_has_its_kernels():
    """Each (kernel, version) the launchers can pick names a kernel that a family compiles."""
    compiled = {name for names in cuda.FAMILIES.values() for name in names}
    for op, versions in cuda.VERSIONS.items():
        assert cuda.DEFAULT_VERSION[op] in versions, f"{op}: default version not among {versions}"
        for v in versions:
            assert f"{op}_v{v}" in compiled, f"{op} version {v}: no kernel {op}_v{v} in minunet.cuda.FAMILIES"
