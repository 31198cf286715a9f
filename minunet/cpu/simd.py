"""minunet.cpu.simd: 512-bit SIMD vectors as a numba type, for the hand-vectorised CPU kernels.

numba leaves vectorisation to LLVM's loop vectoriser, which does well on a straight loop over
one array (v3's convolution) but cannot keep a block of accumulators in registers across an
outer loop, as a matrix-multiply micro-kernel must, and which on recent Intel cores uses
256-bit vectors only (LLVM's tuning for those cores prefers them). This module gives numba
code an explicit vector: a `Vector` value is 512 bits of one float dtype, 16 float32 lanes or
8 float64 lanes, held in one register (zmm on AVX-512; on a machine without AVX-512, LLVM
splits each operation into two or four narrower ones, so the code stays correct everywhere).

    lanes(a)             the number of lanes of a vector of a's dtype (a: array or Vector)
    zeros(a)             a vector of zeros of a's dtype
    splat(s, a)          the scalar s in every lane
    broadcast(a, i)      a[i] in every lane, i a flat element index of a C-contiguous array:
                         splat(a.reshape(-1)[i], a) without numba's wrap-around of a negative
                         index, which costs a micro-kernel five integer instructions a load
    load(a, i)           a[i : i+lanes] of a C-contiguous array a, i a flat element index
    store(a, i, v)       a[i : i+lanes] = v
    load_range(a, i, lo, hi)      lane j = a[i + j] for lo <= j < hi, else 0 (masked: the
                         places outside are not read, so i may lie before a's start)
    store_range(a, i, v, lo, hi)  a[i + j] = v[j] for lo <= j < hi only
    load_every4(a, i)    four vectors: lane j of the s-th is a[i + 4*j + s] (a stride-4 load,
                         one shuffle away from four contiguous loads)
    load_tiles6(a, i)    six vectors: lane j of the s-th is a[i + 4*j + s] for s < 6, the six
                         columns of lanes 6-wide windows 4 apart (Winograd's F(4, 3) input
                         tiles): load_every4's four, and the last two as the first two moved
                         down one lane, the top lane loaded on its own
    store_every4(a, i, v0, v1, v2, v3, lo, hi)
                         the inverse: a[i + e] = vs[e % 4][e // 4] for lo <= e < hi only
                         (a masked store: the places outside [i + lo, i + hi) are not touched,
                         so i may point before a's start when lo makes up for it)
    load_every2(a, i, lo, hi)     two vectors: lane j of the s-th is a[i + 2*j + s], for the
                         places e = 2*j + s with lo <= e < hi only (the others are not read: 0)
    store_every2(a, i, v0, v1, lo, hi)
                         the inverse: a[i + e] = vs[e % 2][e // 2] for lo <= e < hi only
    gather(a, i, stride) lane j = a[i + j*stride]
    scatter(a, i, stride, v, n)   a[i + j*stride] = v[j] for j < n
    transpose(a, i, sa, b, j, sb)
                         the lanes x lanes block of a with rows at i, i + sa, ... stored
                         transposed into b's rows at j, j + sb, ... (in registers, by shuffles)
    hsum(v)              the sum of v's lanes, as a scalar
    fma(a, b, c)         a * b + c in one rounding
    relu(v)              lane j = 0 if v[j] <= 0 else v[j] (NaN passes, as in PyTorch)
    relu_mask(v, y)      lane j = v[j] if y[j] > 0 else 0: the ReLU's backward, y its output
    v + w, v - w, v * w, s * v, v * s    lane by lane (s a scalar)

Nothing here checks bounds: a kernel that uses these owns the buffers it reads and writes
and sizes them for whole vectors (see conv2d_winograd.py). The arithmetic carries
LLVM's `contract` flag, so a product feeding a sum may become one fused multiply-add.
"""
import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

REGISTER_BITS = 512
_CONTRACT = ("contract",)


class Vector(types.Type):
    """numba's type for one 512-bit vector of float32 or float64."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = REGISTER_BITS // dtype.bitwidth
        super().__init__(name=f"Vector({dtype} x {self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _vector_type(t):
    """The Vector type for an array or vector type t of float32/float64, or None."""
    if isinstance(t, Vector):
        return t
    if isinstance(t, types.Array) and t.dtype in (types.float32, types.float64):
        return Vector(t.dtype)
    return None


def _pointer(context, builder, array_type, array, index, vtype):
    """A pointer to element `index` of `array`'s data, typed as a pointer to `vtype`."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), context.get_value_type(vtype).as_pointer())


def _i32s(values):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), list(values))


@intrinsic
def lanes(typingctx, a):
    vt = _vector_type(a)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, vt.lanes)
    return types.intp(a), codegen


@intrinsic
def zeros(typingctx, a):
    vt = _vector_type(a)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)
    return vt(a), codegen


@intrinsic
def splat(typingctx, s, a):
    vt = _vector_type(a)
    if vt is None or not isinstance(s, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, context.get_value_type(vt), context.cast(builder, args[0], sig.args[0], vt.dtype))
    return vt(s, a), codegen


def _splat(builder, ty, scalar):
    """The vector of type ty with scalar in every lane"""
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), _i32s([0] * ty.count))


@intrinsic
def broadcast(typingctx, a, i):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        scalar = builder.load(builder.gep(data, [args[1]]), align=vt.dtype.bitwidth // 8)
        return _splat(builder, context.get_value_type(vt), scalar)
    return vt(a, i), codegen


@intrinsic
def load(typingctx, a, i):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], vt), align=vt.dtype.bitwidth // 8)
    return vt(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    if _vector_type(a) != v or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1], v),
                      align=v.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


def _lane_mask(builder, n, first, last):
    """<n x i1>: lane j is set where first <= j < last (first, last: integers)"""
    i32x = ir.VectorType(ir.IntType(32), n)

    def splat32(value):
        value = builder.trunc(value, ir.IntType(32)) if value.type.width > 32 else value
        one = builder.insert_element(ir.Constant(i32x, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(i32x, ir.Undefined), _i32s([0] * n))
    lane = _i32s(range(n))
    return builder.and_(builder.icmp_signed(">=", lane, splat32(first)), builder.icmp_signed("<", lane, splat32(last)))


def _masked(builder, vector_ty, ptr, align, mask, value=None):
    """llvm.masked.load of vector_ty at ptr (masked-off lanes 0), or with a value, llvm.masked.store"""
    n = vector_ty.count
    name = f"v{n}{'f32' if isinstance(vector_ty.element, ir.FloatType) else 'f64'}.p0"
    mask_ty, i32 = ir.VectorType(ir.IntType(1), n), ir.IntType(32)
    if value is None:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector_ty, [vector_ty.as_pointer(), i32, mask_ty, vector_ty]),
            f"llvm.masked.load.{name}")
        return builder.call(fn, [ptr, ir.Constant(i32, align), mask, ir.Constant(vector_ty, None)])
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vector_ty, vector_ty.as_pointer(), i32, mask_ty]),
        f"llvm.masked.store.{name}")
    return builder.call(fn, [value, ptr, ir.Constant(i32, align), mask])


@intrinsic
def load_range(typingctx, a, i, lo, hi):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not all(isinstance(t, types.Integer) for t in (i, lo, hi)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        return _masked(builder, context.get_value_type(vt), ptr, vt.dtype.bitwidth // 8,
                       _lane_mask(builder, vt.lanes, args[2], args[3]))
    return vt(a, i, lo, hi), codegen


@intrinsic
def store_range(typingctx, a, i, v, lo, hi):
    if _vector_type(a) != v or not all(isinstance(t, types.Integer) for t in (i, lo, hi)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1], v)
        mask = _lane_mask(builder, v.lanes, args[3], args[4])
        _masked(builder, context.get_value_type(v), ptr, v.dtype.bitwidth // 8, mask, args[2])
        return context.get_dummy_value()
    return types.void(a, i, v, lo, hi), codegen


@intrinsic
def load_every4(typingctx, a, i):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None
    result = types.UniTuple(vt, 4)

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, result, _every4(context, builder, vt, sig.args[0], *args))
    return result(a, i), codegen


def _every4(context, builder, vt, array_type, array, i):
    """load_every4's four vectors: one load of 4 whole registers, one shuffle per vector"""
    n = vt.lanes
    wide_ty = ir.VectorType(context.get_value_type(vt).element, 4 * n)
    ptr = _pointer(context, builder, array_type, array, i, vt)
    block = builder.load(builder.bitcast(ptr, wide_ty.as_pointer()), align=vt.dtype.bitwidth // 8)
    return [builder.shuffle_vector(block, ir.Constant(wide_ty, ir.Undefined), _i32s([4 * j + s for j in range(n)]))
            for s in range(4)]


@intrinsic
def load_tiles6(typingctx, a, i):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None
    n = vt.lanes
    result = types.UniTuple(vt, 6)

    def codegen(context, builder, sig, args):
        two_ty = ir.VectorType(context.get_value_type(vt).element, 2)
        parts = _every4(context, builder, vt, sig.args[0], *args)
        top = _pointer(context, builder, sig.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, 4 * n)),
                       vt)
        two = builder.load(builder.bitcast(top, two_ty.as_pointer()), align=vt.dtype.bitwidth // 8)  # a[i + 4n : + 2]
        two = builder.shuffle_vector(two, ir.Constant(two_ty, ir.Undefined), _i32s([0, 1] + [0] * (n - 2)))
        for s in range(2):              # columns 4 and 5: columns 0 and 1 of the next window
            parts.append(builder.shuffle_vector(parts[s], two, _i32s(list(range(1, n)) + [n + s])))
        return context.make_tuple(builder, result, parts)
    return result(a, i), codegen


@intrinsic
def store_every4(typingctx, a, i, v0, v1, v2, v3, lo, hi):
    vt = _vector_type(a)
    if vt is None or not all(v == vt for v in (v0, v1, v2, v3)):
        return None
    if not all(isinstance(t, types.Integer) for t in (i, lo, hi)):
        return None
    n = vt.lanes

    def codegen(context, builder, sig, args):
        _, index, a0, a1, a2, a3, first, last = args
        element = context.get_value_type(vt).element
        wide_ty = ir.VectorType(element, 4 * n)
        lo_half = builder.shuffle_vector(a0, a1, _i32s(range(2 * n)))
        hi_half = builder.shuffle_vector(a2, a3, _i32s(range(2 * n)))
        cat = builder.shuffle_vector(lo_half, hi_half, _i32s(range(4 * n)))
        # element e = 4*j + s of the block is lane j of vector s, i.e. element s*n + j of cat
        block = builder.shuffle_vector(cat, ir.Constant(wide_ty, ir.Undefined),
                                       _i32s([(e % 4) * n + e // 4 for e in range(4 * n)]))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [index]), wide_ty.as_pointer())
        _masked(builder, wide_ty, ptr, vt.dtype.bitwidth // 8, _lane_mask(builder, 4 * n, first, last), block)
        return context.get_dummy_value()
    return types.void(a, i, v0, v1, v2, v3, lo, hi), codegen


@intrinsic
def load_every2(typingctx, a, i, lo, hi):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not all(isinstance(t, types.Integer) for t in (i, lo, hi)):
        return None
    n = vt.lanes
    result = types.UniTuple(vt, 2)

    def codegen(context, builder, sig, args):
        wide_ty = ir.VectorType(context.get_value_type(vt).element, 2 * n)
        ptr = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]]),
                              wide_ty.as_pointer())
        block = _masked(builder, wide_ty, ptr, vt.dtype.bitwidth // 8, _lane_mask(builder, 2 * n, args[2], args[3]))
        parts = [builder.shuffle_vector(block, ir.Constant(wide_ty, ir.Undefined), _i32s([2 * j + s for j in range(n)]))
                 for s in range(2)]
        return context.make_tuple(builder, result, parts)
    return result(a, i, lo, hi), codegen


@intrinsic
def store_every2(typingctx, a, i, v0, v1, lo, hi):
    vt = _vector_type(a)
    if vt is None or not (v0 == vt and v1 == vt) or not all(isinstance(t, types.Integer) for t in (i, lo, hi)):
        return None
    n = vt.lanes

    def codegen(context, builder, sig, args):
        _, index, a0, a1, first, last = args
        wide_ty = ir.VectorType(context.get_value_type(vt).element, 2 * n)
        # element e = 2*j + s of the block is lane j of vector s
        block = builder.shuffle_vector(a0, a1, _i32s([(e % 2) * n + e // 2 for e in range(2 * n)]))
        ptr = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [index]),
                              wide_ty.as_pointer())
        _masked(builder, wide_ty, ptr, vt.dtype.bitwidth // 8, _lane_mask(builder, 2 * n, first, last), block)
        return context.get_dummy_value()
    return types.void(a, i, v0, v1, lo, hi), codegen


@intrinsic
def gather(typingctx, a, i, stride):
    vt = _vector_type(a)
    if vt is None or not isinstance(a, types.Array) or not all(isinstance(t, types.Integer) for t in (i, stride)):
        return None
    n = vt.lanes

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(vt)
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptrs = _lane_pointers(builder, data, args[1], args[2], n, vt.dtype.bitwidth // 8)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ptrs.type, ir.IntType(32), ir.VectorType(ir.IntType(1), n), ty]),
            f"llvm.masked.gather.v{n}f{vt.dtype.bitwidth}.v{n}p0")
        every = ir.Constant(ir.VectorType(ir.IntType(1), n), [1] * n)
        return builder.call(fn, [ptrs, ir.Constant(ir.IntType(32), vt.dtype.bitwidth // 8), every,
                                 ir.Constant(ty, ir.Undefined)])
    return vt(a, i, stride), codegen


@intrinsic
def scatter(typingctx, a, i, stride, v, n):
    if _vector_type(a) != v or not all(isinstance(t, types.Integer) for t in (i, stride, n)):
        return None
    lanes_ = v.lanes

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(v)
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptrs = _lane_pointers(builder, data, args[1], args[2], lanes_, v.dtype.bitwidth // 8)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ty, ptrs.type, ir.IntType(32),
                                                            ir.VectorType(ir.IntType(1), lanes_)]),
            f"llvm.masked.scatter.v{lanes_}f{v.dtype.bitwidth}.v{lanes_}p0")
        builder.call(fn, [args[3], ptrs, ir.Constant(ir.IntType(32), v.dtype.bitwidth // 8),
                          _lane_mask(builder, lanes_, ir.Constant(ir.IntType(32), 0), args[4])])
        return context.get_dummy_value()
    return types.void(a, i, stride, v, n), codegen


def _lane_pointers(builder, data, i, stride, n, size):
    """<n x ptr>: lane j points at data[i + j*stride]"""
    i64x = ir.VectorType(ir.IntType(64), n)

    def splat64(value):
        one = builder.insert_element(ir.Constant(i64x, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(i64x, ir.Undefined), _i32s([0] * n))
    offsets = builder.mul(splat64(stride), ir.Constant(i64x, [size * j for j in range(n)]))   # in bytes
    base = splat64(builder.ptrtoint(builder.gep(data, [i]), ir.IntType(64)))
    return builder.inttoptr(builder.add(base, offsets), ir.VectorType(data.type, n))


@intrinsic
def transpose(typingctx, src, i, src_stride, dst, j, dst_stride):
    vt = _vector_type(src)
    if vt is None or _vector_type(dst) != vt:
        return None
    if not all(isinstance(t, types.Integer) for t in (i, src_stride, j, dst_stride)):
        return None
    n = vt.lanes

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(vt)
        align = vt.dtype.bitwidth // 8

        def row_pointer(array_type, array, start, stride, r):
            data = context.make_array(array_type)(context, builder, array).data
            offset = builder.add(start, builder.mul(stride, ir.Constant(stride.type, r)))
            return builder.bitcast(builder.gep(data, [offset]), ty.as_pointer())
        rows = [builder.load(row_pointer(sig.args[0], args[0], args[1], args[2], r), align=align) for r in range(n)]
        # swap, for each bit b of the row and lane numbers, the elements whose row bit differs
        # from their lane bit: after every bit, element (r, l) sits at (l, r)
        b = 1
        while b < n:
            for r in range(n):
                if not r & b:
                    lo, hi = rows[r], rows[r + b]
                    rows[r] = builder.shuffle_vector(lo, hi, _i32s([l if not l & b else n + l - b for l in range(n)]))
                    rows[r + b] = builder.shuffle_vector(lo, hi, _i32s([l + b if not l & b else n + l for l in range(n)]))
            b *= 2
        for r in range(n):
            builder.store(rows[r], row_pointer(sig.args[3], args[3], args[4], args[5], r), align=align)
        return context.get_dummy_value()
    return types.void(src, i, src_stride, dst, j, dst_stride), codegen


@intrinsic
def hsum(typingctx, v):
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty.element, [ty.element, ty]),
            f"llvm.vector.reduce.fadd.v{v.lanes}f{v.dtype.bitwidth}")
        # reassoc: a tree of adds, not one lane after another
        return builder.call(fn, [ir.Constant(ty.element, 0.0), args[0]], fastmath=("reassoc",))
    return v.dtype(v), codegen


@intrinsic
def fma(typingctx, a, b, c):
    if not (isinstance(a, Vector) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                            f"llvm.fma.v{a.lanes}f{a.dtype.bitwidth}")
        return builder.call(fn, list(args))
    return a(a, b, c), codegen


@intrinsic
def relu(typingctx, v):
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, sig, args):
        zero = ir.Constant(args[0].type, None)
        return builder.select(builder.fcmp_ordered("<=", args[0], zero), zero, args[0])
    return v(v), codegen


@intrinsic
def relu_mask(typingctx, v, y):
    if not (isinstance(v, Vector) and v == y):
        return None

    def codegen(context, builder, sig, args):
        zero = ir.Constant(args[0].type, None)
        return builder.select(builder.fcmp_ordered(">", args[1], zero), args[0], zero)
    return v(v, y), codegen


def _binary(name):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, Vector) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1], flags=_CONTRACT)
        return a(a, b), codegen
    return op


_add, _sub, _mul = _binary("fadd"), _binary("fsub"), _binary("fmul")


def _scalar(t):
    return isinstance(t, (types.Float, types.Integer))


@overload(operator.add)
def _overload_add(a, b):
    if isinstance(a, Vector) and a == b:
        return lambda a, b: _add(a, b)


@overload(operator.sub)
def _overload_sub(a, b):
    if isinstance(a, Vector) and a == b:
        return lambda a, b: _sub(a, b)


@overload(operator.neg)
def _overload_neg(a):
    if isinstance(a, Vector):
        return lambda a: _sub(zeros(a), a)


@overload(operator.mul)
def _overload_mul(a, b):
    if isinstance(a, Vector) and a == b:
        return lambda a, b: _mul(a, b)
    if _scalar(a) and isinstance(b, Vector):
        return lambda a, b: _mul(splat(a, b), b)
    if isinstance(a, Vector) and _scalar(b):
        return lambda a, b: _mul(a, splat(b, a))
