"""One-pass CPU kernel of the task-vector family (sparsify, weigh, sign consensus, mix), compiled with numba.

The kernel streams each input once in blocks that stay in the core's cache, reading float32, bfloat16 or
float16 inputs in their own dtype (converted to float32 entry by entry inside the merge loop), computing in float32
and rounding the result once (round to nearest even) into the output's dtype. A second loop over the block just
written probes it for non-finite results (:func:`_nan_probe`), so the finiteness guard costs no extra pass over
memory (the entries are counted, over the whole output, only when there are some). A merge is split
into contiguous ranges run on ``threads`` threads (the kernel releases the GIL). It computes the same float32
operations in the same order as the torch path of :func:`mergesearch.merging.ops.task_vector_merge` (no fused
multiply-adds, no reassociation), hence the same bits (tests/merging/test_conformance.py). The reassociated
sums are DELLA's L1 norms (:func:`_l1`), float64 sums that only set the rescale factor and that both paths take
from the same compiled pass on the CPU, and the finiteness probe, which reads the result and writes nothing.

numba has no float16 on the CPU, so half-precision values travel as their bit patterns (bfloat16 as uint16,
float16 as int16) and are converted by a few LLVM instructions (exact, and round to nearest even on the way back,
like torch).
"""

from __future__ import annotations

import functools
import os
import queue
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numba
import numpy as np
import torch
from llvmlite import ir as llvm_ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from mergesearch.merging.threads import kernel_threads, single_threaded

#: elements per block: a block of every input and of the output stays in L2 (the output's is counted right after
#: it is written); fewer, longer runs per input stream measured ~30 % faster than 2048 on a 64M-entry float32 merge
BLOCK = 8192
#: below this many elements a merge runs on one thread (thread start-up would cost more than it saves)
MIN_PARALLEL = 1 << 18

T = TypeVar("T")
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One thread pool for every split pass of this module, started on first use and kept: starting threads per
    call cost more than the pass itself on tensors of a few MB. Its threads only run compiled kernels (the GIL
    is released), one range each. A forked child gets a pool of its own (it inherits none of the threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="mergesearch-kernel"))
    return _POOL[1]


# Half precision travels as its bits (numba has no float16 on the CPU): bfloat16 as uint16, float16 as int16, so
# the array's dtype tells the two apart when a kernel is compiled. Each conversion is a few LLVM instructions
# (intrinsics below) that vectorise inside the loops that use them: a merge reads its inputs and writes its output
# in their own dtypes, with no float32 copy of a block in between. numba types integer arithmetic as int64, so
# conversions written in Python ran at 4 lanes (float16's branches not at all: 5.7 ns an entry against 0.9 now).
_I16, _I32, _F32 = llvm_ir.IntType(16), llvm_ir.IntType(32), llvm_ir.FloatType()


def _c32(k: int) -> llvm_ir.Constant:
    return llvm_ir.Constant(_I32, k)


def _conversion(source: Callable[[types.Type], bool], result: types.Type, emit: Callable) -> Callable:
    """A numba intrinsic of one argument accepted by ``source`` (its numba type), returning ``result``: the LLVM
    instructions ``emit(builder, value)`` makes."""

    def typer(typingctx, x):
        if not source(x):
            return None
        return result(x), lambda context, builder, sig, args: emit(builder, args[0])

    return intrinsic(typer)


def _bits16(x: types.Type) -> bool:
    return isinstance(x, types.Integer) and x.bitwidth == 16


def _round_bf16(b, v):
    x = b.bitcast(v, _I32)
    odd = b.and_(b.lshr(x, _c32(16)), _c32(1))
    r = b.lshr(b.add(b.add(x, _c32(0x7FFF)), odd), _c32(16))
    nan = b.icmp_unsigned(">", b.and_(x, _c32(0x7FFFFFFF)), _c32(0x7F800000))
    return b.trunc(b.select(nan, _c32(0x7FC0), r), _I16)


#: float32 of bfloat16 bits (a 16-bit integer): they are float32's top half (exact)
_f32_of_bf16 = _conversion(_bits16, types.float32, lambda b, v: b.bitcast(b.shl(b.zext(v, _I32), _c32(16)), _F32))
#: bfloat16 bits (uint16) of a float32, rounded to nearest even (as torch); NaN becomes 0x7FC0
_bf16_of_f32 = _conversion(lambda v: v == types.float32, types.uint16, _round_bf16)
#: float32 of float16 bits (a 16-bit integer), exact: LLVM's half extension (F16C on x86)
_f32_of_f16 = _conversion(_bits16, types.float32, lambda b, v: b.fpext(b.bitcast(v, llvm_ir.HalfType()), _F32))
#: float16 bits (int16) of a float32, rounded to nearest even, overflow to ±inf: LLVM's half truncation
_f16_of_f32 = _conversion(lambda v: v == types.float32, types.int16,
                          lambda b, v: b.bitcast(b.fptrunc(v, llvm_ir.HalfType()), _I16))


@intrinsic
def _prefetch(typingctx, a, j):
    """Hint that a[j]'s cache line will be read soon (LLVM's prefetch: read, high locality, data)."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]], wraparound=False)
        i8p = llvm_ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(
            llvm_ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), _c32(0), _c32(3), _c32(1)])
        return context.get_dummy_value()

    return types.void(a, j), codegen


def _get(a, j):  # pragma: no cover - compiled through the overload below
    """Entry ``j`` of ``a`` as float32: float32, bfloat16 bits (uint16) or float16 bits (int16)."""


@overload(_get, inline="always")
def _get_impl(a, j):
    if a.dtype == types.float32:
        return lambda a, j: a[j]
    if a.dtype == types.uint16:
        return lambda a, j: _f32_of_bf16(a[j])
    return lambda a, j: _f32_of_f16(a[j])


def _put(d, j, v):  # pragma: no cover - compiled through the overload below
    """d[j] = float32 ``v`` in ``d``'s dtype (float32, bfloat16 or float16 bits), rounded to nearest even."""


@overload(_put, inline="always")
def _put_impl(d, j, v):
    if d.dtype == types.float32:
        def put32(d, j, v):
            d[j] = v
        return put32
    if d.dtype == types.uint16:
        def put_bf16(d, j, v):
            d[j] = _bf16_of_f32(v)
        return put_bf16

    def put_f16(d, j, v):
        d[j] = _f16_of_f32(v)
    return put_f16


def _load(src, start, m, buf):  # pragma: no cover - compiled through the overload below
    """Block [start, start+m) of ``src`` as a C-contiguous float32 array: a slice of a float32 ``src``, or the
    half-precision bits converted into ``buf``."""


@overload(_load)
def _load_impl(src, start, m, buf):
    # Chosen by the source's type when compiled: one branch returning a view and another ``buf`` would type the
    # block as a non-contiguous array, and no loop over it vectorises.
    if src.dtype == types.float32:
        return lambda src, start, m, buf: src[start:start + m]

    def convert(src, start, m, buf):
        # index a slice, not src[start + j]: a sum index may be negative to numba, whose wrap-around check
        # then keeps the loop scalar (~8x slower)
        s = src[start:start + m]
        for j in range(m):
            buf[j] = _get(s, j)
        return buf[:m]

    return convert


def _generated(src: str, name: str, **scope) -> Callable:
    """The function ``name`` that ``src`` defines: our own templates, written out for a tuple's length (numba
    cannot loop over a tuple's arrays by a runtime index and keep the loop vectorised)."""
    scope["np"] = np
    exec(src, scope)
    return scope[name]


@numba.njit(inline="always")
def _della_keeps(draw, rank, p_lo, p_span, width):  # pragma: no cover - runs compiled
    """DELLA's keep test of one entry (:func:`della_mask`, the merge kernel): draw + 32768 < 65536·p with
    p = p_lo + (rank / width)·p_span in float32, as sparsify.rank_norm and sparsify.della_mask compute it."""
    f32 = np.float32
    return f32(draw) + f32(32768.0) < (p_lo + f32(rank) / width * p_span) * f32(65536.0)


def _combine(blocks, draws, ranks, b, res, m, room, keep, coef, lo, hi, keep_below, p_lo, p_span, width, weights,
             lam, mode, unit, div_nc):  # pragma: no cover - compiled through the overload below
    """res[:m] = the merged block from the k input blocks and base block ``b`` (each C-contiguous, length ≥ m, of
    any dtype :func:`_get` reads; ``res`` of one :func:`_put` writes). ``room``: entries of every input from the
    block's start that may be read (prefetched) beyond it.

    ``keep``: 0 the magnitude band [lo, hi], 1 DARE's draws < keep_below, 2 DELLA's draw test on the row ranks,
    3 every entry.
    ``mode``: 0 a plain weighted sum of the blocks (no base, no keep rule; 5: into a 16-bit ``res``, in float32),
    1 base + λ·Σu/div, 2 TIES consensus divided by the agreeing weights, 3 consensus undivided.
    ``unit``: 1 when λ and the divisor (of modes 0, 1, 5) are 1: the loop leaves out the division and the product
    (exact identities; a division an entry cost 15 % of a bfloat16 ``linear`` pass)."""


#: bytes of a task vector that one run of the merge loop covers, and how far ahead of a run the loop asks the
#: cache for the lines of every stream it reads. The hardware prefetcher alone keeps too few lines in flight for
#: 4-10 streams on one core. With the hints, on 64M entries and 3 inputs, 1 / 2 threads, G entries/s: bfloat16
#: task arithmetic 1.17 / 2.26 -> 1.51 / 2.93, TIES 1.04 / 2.02 -> 1.29 / 2.55; float32 task arithmetic
#: 0.73 / 1.40 -> 0.78 / 1.51, TIES 0.63 / 1.17 -> 0.77 / 1.52 (runs of 128 and 512 bytes, and 1 or 4 KiB ahead,
#: were slower; so were hints for a whole block at once: bursts of misses).
RUN_BYTES, AHEAD_BYTES = 256, 2048


def _run_loop(body: list[str], arrays: list[str], k: int) -> list[str]:
    """``body`` (lines over entry j of the run's views: ``T{i}``, ``D{i}``, ``R{i}``, ``B``, ``O``) as a loop over
    the block in runs of ``run`` entries, each run first hinting the lines ``ahead`` entries on of ``arrays`` (the
    block arrays the body reads). One loop whose runs are sliced, not a second loop for the block's shorter last
    run: as fast, and half the code to compile."""
    views = {"B": "b", "O": "res", **{f"{up}{i}": f"{up.lower()}{i}" for up in "TDR" for i in range(k)}}
    used = [v for v in views if re.search(rf"\b{v}\b", " ".join(body))]
    return ["for s in range(0, m, run):",
            "    if s + ahead + run <= room:",
            *[f"        _touch({a}, s + ahead, run)" for a in arrays],
            "    e = min(s + run, m)",
            *[f"    {v} = {views[v]}[s:e]" for v in used],
            "    for j in range(e - s):",
            *[f"        {x}" for x in body]]


def _combine_source(k: int, keep: int, mode: int, unit: bool) -> str:
    """The source of :func:`_combine` for k inputs, one keep rule, one mode and ``unit``: a loop over a block's
    entries (in runs, see :func:`_run_loop`), each input's block, parameters and u_i in named locals. Per-input
    rows of u written then summed, or ``blocks[i]`` and ``coef[i]`` read inside the entry loop, cost more (task
    arithmetic, 64M entries, one thread: 2.1x the bandwidth floor against 1.2x)."""
    ins = range(k)
    head = ["def combine(blocks, draws, ranks, b, res, m, room, keep, coef, lo, hi, keep_below, p_lo, p_span, "
            "width, weights, lam, mode, unit, div_nc):",
            "    f32 = np.float32",
            "    zero, one = f32(0.0), f32(1.0)",
            "    div = f32(div_nc)",
            "    run, ahead = _run_of(blocks[0])"]
    for i in ins:
        head.append(f"    t{i}, d{i}, c{i}, lo{i}, hi{i} = blocks[{i}], draws[{i}], coef[{i}], lo[{i}], hi[{i}]")
        head.append(f"    kb{i} = keep_below[{i}]")
        head.append(f"    w{i}, wf{i}, r{i}, pl{i}, ps{i} = weights[{i}], f32(weights[{i}]), ranks[{i}], p_lo[{i}], "
                    f"p_span[{i}]")
    # u_i = coef_i · keep_i(τ_i): the draw test as a factor (a select on an int16 compare does not vectorise);
    # the band drops what lies outside [lo, hi], so a NaN is kept, as in the torch path
    keeps = {0: [f"x{i} = _get(T{i}, j); u{i} = zero if (abs(x{i}) < lo{i}) | (abs(x{i}) > hi{i}) else c{i} * x{i}"
                 for i in ins],
             1: [f"u{i} = c{i} * _get(T{i}, j) * f32(D{i}[j] < kb{i})" for i in ins],
             # the entry read unconditionally: a read inside the select kept half-precision loops scalar (7x)
             2: [f"x{i} = c{i} * _get(T{i}, j); u{i} = x{i} if _della_keeps(D{i}[j], R{i}[j], pl{i}, ps{i}, width) "
                 "else zero" for i in ins],
             # every entry kept (task arithmetic): an open band's compare and select cost ~30 % of the pass
             3: [f"u{i} = c{i} * _get(T{i}, j)" for i in ins]}
    streams = {0: [], 1: ["d"], 2: ["d", "r"], 3: []}  # per-input arrays each keep rule reads besides τ
    taus = [f"t{i}" for i in ins]
    total = "s_ = zero" + "".join(f" + u{i}" for i in ins)  # mergekit's order: u_0 + u_1 + …
    if mode == 0:
        # ``linear`` (no base, no keep rule): Σ w_i·τ_i in float64, where each product of two float32 is exact,
        # divided there and rounded once; a loop of its own: mixed with float32 work it ran 1.3x slower (4 lanes)
        body = ["s64 = 0.0", *[f"s64 += w{i} * np.float64(_get(T{i}, j))" for i in ins],
                f"_put(O, j, f32({'s64' if unit else 's64 / div_nc'}))"]
    elif mode == 5:
        # the same into a half-precision output: float32 sums, 1.7x faster (bfloat16, 3 inputs, one thread), and
        # with 13–16 bits to spare still within one unit in the last place unless the sum cancels
        body = ["s_ = zero" + "".join(f" + wf{i} * _get(T{i}, j)" for i in ins),
                f"_put(O, j, {'s_' if unit else 's_ / div'})"]
    elif mode == 1:
        body = [*keeps[keep], total, f"_put(O, j, _get(B, j) + {'s_' if unit else 's_ / div * lam'})"]
    else:
        # consensus: keep the u_i whose sign is the sign of Σ u (0 counts as +, u_i = 0 never agrees)
        body = [*keeps[keep], total, "pos = s_ >= zero", "mx, dw = zero, zero"]
        for i in ins:
            body += [f"a{i} = ((u{i} > zero) == pos) & (u{i} != zero)",
                     f"mx += u{i} if a{i} else zero", f"dw += wf{i} if a{i} else zero"]
        mixed = "mx / dn" if mode == 2 else "mx"
        if mode == 2:
            body.append("dn = dw if dw != zero else one")
        body.append(f"_put(O, j, _get(B, j) + {mixed if unit else mixed + ' * lam'})")
    reads = taus if mode in (0, 5) else [*taus, *[f"{a}{i}" for a in streams[keep] for i in ins], "b"]
    lines = [*head, *[f"    {x}" for x in _run_loop(body, reads, k)]]
    return "\n".join(lines) + "\n"


def _run_of(a):  # pragma: no cover - compiled through the overload below
    """(entries of ``a``'s dtype in :data:`RUN_BYTES`, in :data:`AHEAD_BYTES`): compile-time constants."""


@overload(_run_of, inline="always")
def _run_of_impl(a):
    size = a.dtype.bitwidth // 8
    run, ahead = RUN_BYTES // size, AHEAD_BYTES // size
    return lambda a: (run, ahead)


def _touch(a, j, count):  # pragma: no cover - compiled through the overload below
    """Prefetch hints for the cache lines of a[j:j+count] (``a`` may be a view: its memory goes on past it)."""


@overload(_touch, inline="always")
def _touch_impl(a, j, count):
    line = 64 // (a.dtype.bitwidth // 8)

    def touch(a, j, count):
        for q in range(j, j + count, line):
            _prefetch(a, q)
    return touch


@overload(_combine)
def _combine_impl(blocks, draws, ranks, b, res, m, room, keep, coef, lo, hi, keep_below, p_lo, p_span, width,
                  weights, lam, mode, unit, div_nc):
    # keep, mode and unit are constants of the kernel that calls (:func:`_merge_kernel`): numba offers them as
    # literals after their plain integer types, which this declines
    if not all(isinstance(x, types.IntegerLiteral) for x in (keep, mode, unit)):
        return None
    source = _combine_source(len(blocks), keep.literal_value, mode.literal_value, bool(unit.literal_value))
    return _generated(source, "combine", _della_keeps=_della_keeps, _get=_get, _put=_put, _run_of=_run_of,
                      _touch=_touch)


def _per_item(name: str, params: str, item: str, k: int, **scope) -> Callable:
    """A function ``name(params)`` returning the tuple of ``item`` (a template of ``{i}``) for i < k."""
    body = "".join(item.format(i=i) + ", " for i in range(k))
    return _generated(f"def {name}({params}):\n    return ({body})\n", name, **scope)


def _slices(arrays, start, m):  # pragma: no cover - compiled through the overload below
    """The tuple of ``a[start:start+m]`` for each array of the tuple."""


@overload(_slices)
def _slices_impl(arrays, start, m):
    return _per_item("slices", "arrays, start, m", "arrays[{i}][start:start + m]", len(arrays))


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def _nan_probe(o, m):  # pragma: no cover - runs compiled
    """Σ o[j]·0 over o[:m] (any dtype :func:`_get` reads): NaN when an entry is NaN or ±inf (inf·0 is NaN), else
    ±0. A NaN survives any order of the sum, so the reassociation that lets it vectorise cannot hide one
    (reassoc alone does not fold x·0 to 0: that would need no-NaN). Counting the entries instead (a compare
    and an int64 sum per entry) added 19 % to a task-arithmetic loop in one measurement, this 7 %."""
    s = np.float32(0.0)
    for j in range(m):
        s += _get(o, j) * np.float32(0.0)
    return s


@functools.cache
def _merge_kernel(keep: int, mode: int, unit: int) -> Callable:
    """The compiled merge pass of one keep rule, one mode and ``unit`` (see :func:`_combine`): numba compiles what the
    kernel runs and nothing else (all rules and modes in one function took 3x longer to compile with the
    prefetch hints), and the constants pick the loop once, not per block. Cached on disk like the others (the
    constants are part of the cache key)."""

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def merge(base, out, taus, draws, ranks, lo, hi, keep_below, p_lo, p_span, width, coef, weights, lam, div_nc,
              first, last):  # pragma: no cover - runs compiled
        # k, the length of the ``taus`` tuple, is a compile-time constant: :func:`_combine` is generated for it
        probe = np.float32(0.0)
        for start in range(first, last, BLOCK):
            m = min(BLOCK, last - start)
            o = out[start:start + m]  # may be ``base`` itself (in place): each entry reads b[j] before writing o[j]
            b = base[start:start + m]  # unread without a base (``fused_merge`` passes ``out`` then)
            _combine(_slices(taus, start, m), _slices(draws, start, m), _slices(ranks, start, m), b, o, m,
                     last - start, keep, coef, lo, hi, keep_below, p_lo, p_span, width, weights, lam, mode, unit,
                     div_nc)
            probe += _nan_probe(o, m)  # in cache: the block was just written
        return probe != probe  # some entry of [first, last) is not finite

    return merge


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def _l1(x, m):  # pragma: no cover - runs compiled
    """Σ|x[:m]| in float64. Reassociation lets the sum vectorise (partial sums per lane, a fixed order, so the
    same bits every run); summed in index order, one add's latency per entry cost 3x the pass's memory time."""
    s = 0.0
    for j in range(m):
        s += abs(np.float64(x[j]))
    return s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _della(tau, draws, ranks, width, p_lo, p_span, out, dropped):  # pragma: no cover - runs compiled
    f32 = np.float32
    before, after = 0.0, 0.0
    buf = np.empty(BLOCK, dtype=f32)
    kept = np.empty(BLOCK, dtype=f32)
    spare = np.empty(BLOCK, dtype=np.int8)
    write, flag = out.shape[0] > 0, dropped.shape[0] > 0
    n = draws.shape[0]
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        t = _load(tau, start, m, buf)
        dr, rk = draws[start:start + m], ranks[start:start + m]
        o = out[start:start + m] if write else kept[:m]
        fl = dropped[start:start + m] if flag else spare[:m]
        for j in range(m):  # vectorises
            keep = _della_keeps(dr[j], rk[j], p_lo, p_span, width)
            o[j] = t[j] if keep else f32(0.0)
            fl[j] = np.int8(0) if keep else np.int8(1)
        before += _l1(t, m)
        after += _l1(o, m)
    return before, after


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _l1_hist(tau, draws, hist):  # pragma: no cover - runs compiled
    buf = np.empty(BLOCK, dtype=np.float32)
    n = draws.shape[0]
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        t = _load(tau, start, m, buf)
        for j in range(m):  # in index order, like index_add_: the same float64 sums, bit for bit
            hist[np.int32(draws[start + j]) + 32769] += abs(np.float64(t[j]))


def l1_hist(tau: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Σ |τ| by draw value (float64, 65537 bins, bin d + 32769 for draw d; bin 0 stays 0), in one pass reading τ
    in its own dtype: no float64 copy of τ or int32 copy of the draws (12 bytes an entry) as ``index_add_``
    needs.

    Args:
        tau: contiguous CPU float32/bfloat16/float16 task vector; ``draws``: its int16 draws, same numel.
    """
    hist = np.zeros(65537, dtype=np.float64)
    _l1_hist(_array(tau), _array(draws), hist)
    return torch.from_numpy(hist)


#: distinct magnitude keys: the 15 bits below the sign of a bfloat16/float16 pattern, or of float32's top half
KEYS = 1 << 15


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _key_counts(bits, shift, counts, first, last):  # pragma: no cover - runs compiled
    for j in range(first, last):  # the sign bit is the top bit: shift it to bit 15 and drop it
        counts[(np.uint32(bits[j]) >> np.uint32(shift)) & np.uint32(0x7FFF)] += 1


def key_counts(tau: torch.Tensor, threads: int = 1) -> np.ndarray:
    """How many entries of ``tau`` (contiguous CPU float32/bfloat16/float16) fall on each magnitude key, in one
    pass split over ``threads`` threads.

    The key of an entry is the bit pattern of |τ| cut to 15 bits: bfloat16 and float16 keep all of theirs (a key
    is one value), float32 keeps its top 16 bits minus the sign (a key is a range of 2^16 adjacent floats). Keys
    order like magnitudes, so cumulative counts give every order statistic's key.

    Returns:
        int64 array of :data:`KEYS` counts.
    """
    src = _array(tau)
    # float32 as its uint32 bits, whose top 16 hold the key; half precision is 16-bit patterns already
    bits, shift = (src.view(np.uint32), 16) if src.dtype == np.float32 else (src, 0)
    n = src.shape[0]
    parts = max(1, min(threads, n // MIN_PARALLEL))
    cuts = [n * p // parts for p in range(parts)] + [n]

    def part(p: int) -> np.ndarray:
        counts = np.zeros(KEYS, dtype=np.int64)
        _key_counts(bits, shift, counts, cuts[p], cuts[p + 1])
        return counts

    if parts == 1:
        return part(0)
    return np.sum(list(_pool().map(part, range(parts))), axis=0)


#: entries a bracket pass tests together before gathering: in-bracket entries are rare (a key holds well under 1 %
#: of a tensor), so most runs of 32 have none, and the test over a run vectorises where a gather cannot
RUN = 32
#: parts of its range a bracket pass reads in turn, a run of each: one read stream alone stays far below the
#: memory bandwidth (measured 7.7 GB/s against 11.3 GB/s for 4 streams, one thread)
STREAMS = 4
#: entries ahead of each stream that a bracket pass asks the cache for (both lines of the run there): its test
#: and branch per run keep too few reads in flight otherwise (one thread, 134M entries: 14-15 GB/s against 10)
AHEAD = 512


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _bracket(tau, bits, key, lo, hi, buf, first, last):  # pragma: no cover - runs compiled
    m, cap = 0, buf.shape[0]
    q = (last - first + STREAMS - 1) // STREAMS
    mask = np.uint32(0x7FFF0000)
    for r0 in range(0, q, RUN):
        for p in range(STREAMS):
            a = first + p * q + r0
            if a + AHEAD + RUN <= last:
                _prefetch(bits, a + AHEAD)
                _prefetch(bits, a + AHEAD + RUN // 2)
            e = max(a, min(a + RUN, first + (p + 1) * q, last))
            # the run's test on the bit patterns (an and and a compare an entry, or-ed; alone it read 11.5 GB/s
            # against 8.8 for abs and two float compares summed); indexed from 0 (t[a + j] kept it scalar)
            run_bits = bits[a:e]
            hits = False
            for j in range(run_bits.shape[0]):  # vectorises
                hits |= (run_bits[j] & mask) == key
            if hits:
                run = tau[a:e]
                for j in range(run.shape[0]):  # branch-free compaction: always write, advance only inside [lo, hi]
                    x = abs(run[j])
                    buf[min(m, cap - 1)] = x
                    m += (x >= lo) & (x <= hi)
    return m


def bracket_select(tau: torch.Tensor, k: int, lo: float, hi: float, width: int) -> float | None:
    """The k-th smallest (0-based) of the |τ| in [lo, hi], of which there are ``width``, in one pass gathering
    them, split over ``kernel_threads()`` threads like :func:`fused_merge`.

    Args:
        tau: contiguous CPU float32 task vector (a bfloat16/float16 magnitude key is one value: no bracket).
        lo, hi: one float32 magnitude key's range (:class:`~mergesearch.merging.sparsify.MagnitudeOrder`): lo's
            bits with the low 16 cleared, hi's with them set. Runs are tested on the key (lo's top bits) and
            gathered by [lo, hi], so another range only finds fewer entries (None).

    Returns:
        The value, or None when the bracket held another number of entries than ``width`` (e.g. NaN bounds).
    """
    src = _array(tau)
    n = src.shape[0]
    parts = max(1, min(kernel_threads(), n // MIN_PARALLEL))
    cuts = [n * p // parts for p in range(parts)] + [n]
    cap = width + 1
    key = np.array([lo], dtype=np.float32).view(np.uint32)[0] & np.uint32(0x7FFF0000)

    def part(p: int) -> tuple[int, np.ndarray]:
        buf = np.empty(cap, dtype=np.float32)
        return _bracket(src, src.view(np.uint32), key, np.float32(lo), np.float32(hi), buf, cuts[p],
                        cuts[p + 1]), buf

    results = [part(0)] if parts == 1 else list(_pool().map(part, range(parts)))
    if sum(m for m, _ in results) != width or not 0 <= k < width:
        return None
    inside = np.concatenate([buf[:m] for m, buf in results])
    return float(np.partition(inside, k)[k])


def della_mask(tau: torch.Tensor, draws: torch.Tensor, ranks: torch.Tensor, p_lo: float, p_span: float,
               into: Literal["masked", "dropped"] = "masked") -> tuple[torch.Tensor, float, float]:
    """DELLA's mask in one pass, with ‖τ‖₁ and ‖mask⊙τ‖₁ (float64 sums) for the rescale.

    Keeps where draw + 32768 < 65536·p, with p = p_lo + (rank / width)·p_span in float32 (width = row length − 1,
    as :func:`mergesearch.merging.sparsify.rank_norm`).

    Args:
        tau: task vector (float32, bfloat16 or float16), shape S; ``draws``: its int16 draws, ``ranks``: its
            row ranks (:func:`mergesearch.merging.sparsify.della_ranks`, uint16 or int32).
        into: ``"masked"``: mask⊙τ as a new float32 tensor of shape S; ``"dropped"``: int8 flags of numel(S),
            1 where the entry is dropped — what the merge kernel reads as draws kept below 1, 1 byte an entry
            in place of the 4 of draws and ranks, and no keep test in its loop (the flags live while the job
            runs: numel(S) bytes per input).

    Returns:
        (that tensor, ‖τ‖₁, ‖mask⊙τ‖₁).
    """
    if into not in ("masked", "dropped"):
        raise ValueError(f"into must be 'masked' or 'dropped', got {into!r}")
    out = torch.empty(tau.shape if into == "masked" else 0, dtype=torch.float32)
    dropped = torch.empty(tau.numel() if into == "dropped" else 0, dtype=torch.int8)
    f32 = np.float32
    before, after = _della(_array(tau), _array(draws), _array(ranks), della_width_f32(tau.shape), f32(p_lo),
                           f32(p_span), _array(out), _array(dropped))
    return (out if into == "masked" else dropped), before, after


def della_width_f32(shape: torch.Size | tuple[int, ...]) -> np.float32:
    """The rank divisor of DELLA's keep probability: the row length − 1, at least 1 (1-wide rows: rank 0 / 1 = 0,
    as ``rank_norm``'s zeros)."""
    from mergesearch.merging.sparsify import della_width

    return np.float32(max(della_width(shape), 1))


def fused_merge(base: torch.Tensor | None, out: torch.Tensor, taus: Sequence[torch.Tensor], coef: Sequence[float],
                weights: Sequence[float], lam: float, normalize: bool, consensus: bool, div_nc: float, *,
                lo: Sequence[float] | None = None, hi: Sequence[float] | None = None,
                draws: Sequence[torch.Tensor] | None = None, keep_below: Sequence[int] | None = None,
                ranks: Sequence[torch.Tensor] | None = None, p_lo: Sequence[float] | None = None,
                p_span: Sequence[float] | None = None, threads: int = 1) -> int:
    """out = base + λ·mix(coef_i · keep_i(τ_i)) in one pass (METHODS.md steps 3–6), computed in float32.

    The keep rule of input i is one of: the magnitude band (``lo``, ``hi``: drops |τ_i| outside [lo[i], hi[i]],
    keeps NaN); DARE (``draws``, ``keep_below``: keeps draws[i] < keep_below[i]); DELLA (``draws``, ``ranks``,
    ``p_lo``, ``p_span``: keeps draw + 32768 < 65536·(p_lo[i] + rank/width·p_span[i]), as :func:`della_mask`); or,
    with none of these, every entry.

    Args:
        base: θ0, contiguous CPU float32/bfloat16/float16, any shape S, or None for a plain weighted sum
            (``linear``: out = mix(coef_i · τ_i)); ``out`` the destination (same numel, any of those dtypes; may
            be ``base``).
        taus: N task vectors of numel(S), one dtype among them; ``draws``: N int16 tensors of numel(S) (or
            DELLA's int8 drop flags, :func:`della_mask`, kept below 1);
            ``ranks``: N DELLA row-rank tensors of S (one dtype).
        coef: per-input factor of the kept τ_i (weight × rescale); ``weights``: the consensus divisor's weights
            (without a base: the weighted sum's weights, applied in float64 — float32 into a half-precision
            ``out`` — with ``coef`` all 1).
        lam: λ. normalize: divide by Σ weights (of the agreeing inputs under consensus; 0 -> 1).
        consensus: TIES sign election. div_nc: the divisor without consensus (Σ weights or 1).
        threads: how many threads share the pass (contiguous ranges).

    Returns:
        How many output entries are not finite (NaN or ±inf after rounding to the output's dtype).
    """
    o = _array(out)
    b = _array(base) if base is not None else o  # unread without a base
    flat = tuple(_array(t) for t in taus)
    k, f32 = len(flat), np.float32
    keep = 2 if ranks is not None else 1 if draws is not None else 0 if lo is not None or hi is not None else 3

    def per_input(values, dtype, default) -> np.ndarray:
        return np.asarray(values, dtype=dtype) if values is not None else _unused(k, dtype, default)

    def arrays_of(tensors, dtype) -> tuple:  # numba needs k arrays even when unused (the combine names each)
        return tuple(_array(x) for x in tensors) if tensors is not None else (_unused(0, dtype, 0),) * k

    width = della_width_f32(ranks[0].shape) if ranks is not None else f32(1)  # ranks keep τ's shape (rows)
    # without a base, a plain weighted sum: in float64, or in float32 into a half-precision output
    mode = (5 if o.itemsize == 2 else 0) if base is None else 2 if consensus and normalize else 3 if consensus else 1
    unit = lam == 1.0 and (div_nc == 1.0 or consensus)  # consensus modes do not divide by div_nc
    merge = _merge_kernel(keep, mode, int(unit))
    args = (b, o, flat, arrays_of(draws, np.int16), arrays_of(ranks, np.uint16), per_input(lo, f32, -np.inf),
            per_input(hi, f32, np.inf), per_input(keep_below, np.int32, 0), per_input(p_lo, f32, 0),
            per_input(p_span, f32, 0), width, np.asarray(coef, dtype=f32), np.asarray(weights, dtype=np.float64),
            f32(lam), float(div_nc))
    n = b.shape[0]
    parts = max(1, min(threads, n // MIN_PARALLEL))
    if parts == 1:
        bad = bool(merge(*args, 0, n))
    else:  # ranges split on BLOCK boundaries, so every thread sees the same blocks as one thread would (same bits)
        cuts = [min(n, (n * p // parts) // BLOCK * BLOCK) for p in range(parts)] + [n]
        bad = any(list(_pool().map(lambda p: bool(merge(*args, cuts[p], cuts[p + 1])), range(parts))))
    return int(out.numel() - torch.isfinite(out).sum().item()) if bad else 0  # counted only on the error path


def run_side_by_side(calls: Sequence[Callable[[], T]], threads: int | None = None,
                     start: Sequence[int] | None = None) -> list[T]:
    """Call each of ``calls`` on up to ``threads`` (default ``kernel_threads()``) threads of the module's pool;
    results in order. Each thread takes the next call until none is left (``start``: the order they are taken
    in, e.g. largest first so the threads finish together) and runs it as one of a job-parallel merge's workers
    (its own compiled passes on that thread alone, no autograd). One thread runs them in turn. The first call
    to raise, in the order of ``calls``, is raised once all have run, as one thread would have reported it."""
    threads = min(len(calls), threads or kernel_threads())
    if threads < 2:
        return [c() for c in calls]
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()  # thread-safe without the GIL too (an iterator is not)
    for i in start if start is not None else range(len(calls)):
        todo.put(i)
    results: list = [None] * len(calls)
    errors: dict[int, BaseException] = {}

    def worker() -> None:
        with torch.no_grad(), single_threaded():  # both are per thread
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[i] = calls[i]()
                except BaseException as e:  # re-raised below, in the order of ``calls``
                    errors[i] = e

    for f in [_pool().submit(worker) for _ in range(threads)]:
        f.result()
    if errors:
        raise errors[min(errors)]
    return results


#: numpy's type string of the bits a kernel reads for each dtype: bfloat16 as uint16, float16 as int16 (numba has
#: no half type on the CPU; the kernels' convention: the array's dtype tells the two apart)
_TYPESTR = {k: np.dtype(v).str for k, v in {  # .str: with this machine's byte order
    torch.float32: "f4", torch.float64: "f8", torch.bfloat16: "u2", torch.float16: "i2", torch.int8: "i1",
    torch.uint8: "u1", torch.int16: "i2", torch.uint16: "u2", torch.int32: "i4", torch.int64: "i8"}.items()}


class _Memory:
    """A contiguous tensor's memory as numpy's array interface describes it: the array made from it keeps the
    tensor alive through ``tensor``."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (t.numel(),),
                                    "typestr": _TYPESTR[t.dtype], "version": 3}


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view sharing ``t``'s memory, in the bits :data:`_TYPESTR` names. Through the array interface,
    not ``t.view(...).numpy()``: 1.0 µs against 2.2 (several per tensor of a merge), and no torch call, each of
    which lets go of the GIL and so, in a job-parallel merge, waits for the other worker's Python to retake it.

    Raises:
        ValueError: ``t`` is not a contiguous CPU tensor (a flat view of its memory would not be its entries).
    """
    if not (t.is_cpu and t.is_contiguous()):
        raise ValueError(f"a kernel needs contiguous CPU tensors, got {t.device} strides {t.stride()} for shape "
                         f"{tuple(t.shape)}")
    return np.asarray(_Memory(t))


@functools.lru_cache(maxsize=64)
def _unused(k: int, dtype: type, default: float) -> np.ndarray:
    """``k`` copies of ``default``: a kernel argument the keep rule does not read (shared by every call, never
    written; left writeable, as a read-only array would be another type to numba, hence another compile)."""
    return np.full(k, default, dtype=dtype)
