"""``log Φ(a)`` of an array, compiled: Optuna's ``_truncnorm._log_ndtr`` bit for bit, without its Python call per entry.

Optuna's TPE inverts truncated normals by Newton's method on ``log Φ``, computed by ``_log_ndtr_single`` (Python
floats, the C library's ``erf``/``erfc``/``log``/``pow``) once per entry and iteration: ~2 µs each, the largest
part of a stacked TPE ask (:mod:`.tpe`). Here the same formulas run compiled, calling the same C library functions.
One trap: for ``a ** 2`` Python calls ``pow(a, 2.0)`` while LLVM rewrites a constant exponent 2 to ``a * a``,
which differs in the last place for some ``a``; so the exponent is read from an array at run time, which LLVM
cannot fold. ``tests/search/test_tpe.py`` checks the bits against Optuna's on every branch.

Imported on first use (numba is a heavy import).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_EPS = 2.220446049250313e-16  # sys.float_info.epsilon


@numba.njit(cache=True, nogil=True)
def _ndtr(a: float) -> float:
    x = a / 2**0.5
    if x < -1 / 2**0.5:
        return 0.5 * math.erfc(-x)
    if x < 1 / 2**0.5:
        return 0.5 + 0.5 * math.erf(x)
    return 1.0 - 0.5 * math.erfc(x)


@numba.njit(cache=True, nogil=True)
def _log_ndtr_into(a: np.ndarray, out: np.ndarray, two: np.ndarray) -> None:
    p = two[0]  # 2.0, unknown to the compiler (see the module)
    for k in range(a.size):
        v = a[k]
        if v > 6:
            out[k] = -_ndtr(-v)
        elif v > -20:
            out[k] = math.log(_ndtr(v))
        else:  # the asymptotic series of the far left tail
            square = math.pow(v, p)
            log_lhs = -0.5 * square - math.log(-v) - 0.5 * math.log(2 * math.pi)
            last_total, right_hand_side, numerator, denom_factor = 0.0, 1.0, 1.0, 1.0
            denom_cons = 1 / square
            sign, i = 1, 0
            while abs(last_total - right_hand_side) > _EPS:
                i += 1
                last_total = right_hand_side
                sign = -sign
                denom_factor *= denom_cons
                numerator *= 2 * i - 1
                right_hand_side += sign * numerator * denom_factor
            out[k] = log_lhs + math.log(right_hand_side)


_TWO = np.array([2.0])


def log_ndtr(a: np.ndarray) -> np.ndarray:
    """``log Φ(a)`` entrywise, ``a`` float64 of any shape; equal to ``optuna.samplers._tpe._truncnorm._log_ndtr``."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty_like(a)
    _log_ndtr_into(a.reshape(-1), out.reshape(-1), _TWO)
    return out
