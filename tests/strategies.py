"""hypothesis strategies for the shapes the kernels and ops are tested on (minitorch's habit).

Each strategy draws small cases (a few pixels and channels, so that the float64 reference stays
quick) that reach the corners a fixed list of shapes misses: odd sizes, stride larger than the
kernel (inputs no window reads), overlapping pooling windows (stride smaller than the kernel),
padding up to the kernel's size, batch 1, single channels, 1x1 outputs. `SETTINGS` keeps the
number of examples small so the suite stays fast; hypothesis prints the failing case, and
`@example`s in the tests pin the ones worth keeping.
"""
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

# Few examples per test; no deadline (numba compiles on first use); the `device` fixture is
# function-scoped but only names a device, so it is safe to share between examples.
SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

booleans = st.booleans


def _pair(draw, lo, hi):
    return draw(st.integers(lo, hi)), draw(st.integers(lo, hi))


@st.composite
def conv2d_cases(draw, max_size=9, max_channels=4):
    """(N, C, H, W, K, (kh, kw), (sh, sw), (ph, pw)) with a non-empty output; padding up to the
    kernel's size (a border output may see padding only)."""
    kh, kw = _pair(draw, 1, 4)
    sh, sw = _pair(draw, 1, 3)
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    H = draw(st.integers(max(1, kh - 2 * ph), max_size))
    W = draw(st.integers(max(1, kw - 2 * pw), max_size))
    N, C, K = draw(st.integers(1, 3)), draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    return N, C, H, W, K, (kh, kw), (sh, sw), (ph, pw)


@st.composite
def conv_transpose2d_cases(draw, max_size=6, max_channels=4):
    """(N, Cin, H, W, Cout, (kh, kw), (sh, sw), (ph, pw), (oph, opw)), output_padding < stride
    and a non-empty output: the patchwise case (kernel == stride) about one time in three."""
    kh, kw = _pair(draw, 1, 4)
    if draw(st.integers(0, 2)) == 0:
        (sh, sw), (ph, pw), (oph, opw) = (kh, kw), (0, 0), (0, 0)
    else:
        sh, sw = _pair(draw, 1, 3)
        ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
        oph, opw = draw(st.integers(0, sh - 1)), draw(st.integers(0, sw - 1))
    H, W = _pair(draw, 1, max_size)
    assume((H - 1) * sh - 2 * ph + kh + oph >= 1 and (W - 1) * sw - 2 * pw + kw + opw >= 1)
    N, Cin, Cout = draw(st.integers(1, 3)), draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    return N, Cin, H, W, Cout, (kh, kw), (sh, sw), (ph, pw), (oph, opw)


@st.composite
def pool_cases(draw, max_size=9):
    """(N, C, H, W, (kh, kw), (sh, sw), (ph, pw)): windows that overlap (stride < kernel), tile, or
    leave gaps (stride > kernel); padding at most half the kernel, as PyTorch allows."""
    kh, kw = _pair(draw, 1, 4)
    sh, sw = _pair(draw, 1, 4)
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = draw(st.integers(max(1, kh - 2 * ph), max_size))
    W = draw(st.integers(max(1, kw - 2 * pw), max_size))
    return draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W, (kh, kw), (sh, sw), (ph, pw)


@st.composite
def concat_cases(draw, max_inputs=3, max_size=7):
    """(input shapes, crop offsets (top, left), out_hw): one to three inputs of one batch size,
    each at least out_hw and cropped at its own offset."""
    H, W = _pair(draw, 1, max_size)
    N = draw(st.integers(1, 3))
    shapes, offsets = [], []
    for _ in range(draw(st.integers(1, max_inputs))):
        Hi, Wi = draw(st.integers(H, H + 3)), draw(st.integers(W, W + 3))
        shapes.append((N, draw(st.integers(1, 3)), Hi, Wi))
        offsets.append((draw(st.integers(0, Hi - H)), draw(st.integers(0, Wi - W))))
    return shapes, offsets, (H, W)
