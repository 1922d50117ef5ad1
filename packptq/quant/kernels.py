"""One-pass soft rounding on CPU.

AdaRound's soft-rounded weight, its regulariser and their gradient are element-wise over every
weight of a unit, so a reconstruction step's extra cost over a plain forward+backward follows
the unit's weight count. Written as tensor operations, the forward takes about 15 passes over
weight-sized memory and the backward about 15 more (each with a fresh allocation). Here each
is one loop over the weights: the forward reads V and floor(w / s), writes the weight, sums the
regulariser and keeps sigmoid(V) and the regulariser's gradient factor; the backward reads
those, floor(w / s) and the weight's gradient and writes V's gradient, with no exp or log.

The loops are C compiled once per machine with the system's C compiler into
``$PACKPTQ_CACHE/kernels`` (or ``~/.cache/packptq/kernels``) and called through ctypes; no
torch headers, so a build takes well under a second. Without a compiler, on other devices, for
non-float32 or strided tensors, or with ``PACKPTQ_KERNELS=eager``, ``SoftRound`` runs its tensor
operations instead. The two agree to float rounding (the C loop evaluates exp with the vector
math library), not bit for bit."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* h = clamp(sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1); exp's argument is clamped so that no
   infinity enters the loop (compiled finite-math-only; sigmoid is 0 or 1 to float precision
   beyond it). */
#define ZG 1.2f
#define G (-0.1f)

static inline float sig(float a) {
    a = fminf(fmaxf(a, -80.f), 80.f);
    return 1.f / (1.f + expf(-a));
}

/* |d|^beta for d in [-1, 1]: exp(beta * log|d|), 0 at d = 0 (beta > 0). */
static inline float powabs(float d, float beta) {
    float ad = fmaxf(fabsf(d), 1e-30f);
    return expf(beta * logf(ad));
}

double pq_softround_fwd(const float *alpha, const float *base, const float *s, const float *z,
                        int64_t rows, int64_t cols, float qmax, float beta, int with_reg,
                        float *w, float *sg_out, float *r_out, int nthreads) {
    double reg = 0.0;
    #pragma omp parallel for reduction(+:reg) num_threads(nthreads) schedule(static) if(nthreads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float sr = s[r], zr = z[r];
        const float *a = alpha + r * cols, *b = base + r * cols;
        float *o = w + r * cols, *so = sg_out + r * cols, *ro = r_out + r * cols;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t c = 0; c < cols; ++c) {
            float sg = sig(a[c]);
            float h = fminf(fmaxf(sg * ZG + G, 0.f), 1.f);
            float t = fminf(fmaxf(b[c] + h + zr, 0.f), qmax);
            o[c] = (t - zr) * sr;
            so[c] = sg;
            if (with_reg) {
                float d = 2.f * h - 1.f;
                float p = powabs(d, beta);
                acc += 1.f - p;
                ro[c] = d == 0.f ? 0.f : p / d;  /* d/dh of -|d|^beta is -2 beta times this */
            }
        }
        reg += acc;
    }
    return reg;
}

/* From the forward's sigmoid (sg) and regulariser factor (rf): no exp or log here.
   coef = d loss / d reg * (-2 beta). */
void pq_softround_bwd(const float *sgv, const float *base, const float *s, const float *z,
                      const float *gw, const float *rf, int64_t rows, int64_t cols, float qmax,
                      int with_reg, float coef, float *ga, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float sr = s[r], zr = z[r];
        const float *sv = sgv + r * cols, *b = base + r * cols, *g = gw + r * cols, *rr = rf + r * cols;
        float *o = ga + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            float sg = sv[c];
            float u = sg * ZG + G;
            float h = fminf(fmaxf(u, 0.f), 1.f);
            float t = b[c] + h + zr;
            float gh = (t < 0.f || t > qmax) ? 0.f : g[c] * sr;
            if (with_reg) gh += coef * rr[c];
            o[c] = (u < 0.f || u > 1.f) ? 0.f : gh * ZG * sg * (1.f - sg);
        }
    }
}
"""

#: vectorised, with glibc's SIMD exp/log (declared by its headers under __FAST_MATH__), and every
#: add and multiply rounded in source order (no reassociation or fused multiply-add), so the
#: weight is computed the same way in both loops and with or without the regulariser
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only",
          "-fno-signed-zeros", "-ffp-contract=off", "-D__FAST_MATH__", "-shared", "-fPIC"]
_lib = None  # the loaded library, False when it cannot be built here


def _cpu_id() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> Optional[ctypes.CDLL]:
    cache = Path(os.environ.get("PACKPTQ_CACHE") or Path.home() / ".cache" / "packptq") / "kernels"
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    so = cache / f"softround_{key}.so"
    if not so.exists():
        cc = os.environ.get("CC", "cc")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as td:
            src, tmp = Path(td) / "softround.c", Path(td) / "softround.so"
            src.write_text(_SOURCE)
            res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                raise OSError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "compiler failed")
            os.replace(tmp, so)  # atomic: concurrent jobs never load a half-written file
    lib = ctypes.CDLL(str(so))
    f, i64, fl, p = ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.pq_softround_fwd.restype = ctypes.c_double
    lib.pq_softround_fwd.argtypes = [p, p, p, p, i64, i64, f, fl, ctypes.c_int, p, p, p, ctypes.c_int]
    lib.pq_softround_bwd.restype = None
    lib.pq_softround_bwd.argtypes = [p, p, p, p, p, p, i64, i64, f, ctypes.c_int, f, p, ctypes.c_int]
    return lib


def library():
    """The compiled loops, or None where they cannot be used (built on first call)."""
    global _lib
    if os.environ.get("PACKPTQ_KERNELS", "auto") == "eager":
        return None
    if _lib is None:
        try:
            _lib = _build()
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            log.info("soft-rounding C loops unavailable (%s); using tensor operations", exc)
            _lib = False
    return _lib or None


def applicable(alpha: torch.Tensor, base: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether the one-pass loops can take these tensors: float32, contiguous, on the CPU,
    with per-row (or scalar) scale and zero point."""
    rows = alpha.shape[0] if alpha.dim() else 1
    return (alpha.device.type == "cpu" and alpha.dtype == base.dtype == torch.float32
            and alpha.is_contiguous() and base.is_contiguous() and alpha.shape == base.shape
            and s.numel() in (1, rows) and z.numel() in (1, rows) and library() is not None)


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.detach().float().reshape(-1).expand(rows).contiguous() if t.numel() == 1 else \
        t.detach().float().reshape(-1).contiguous()


def _shape(alpha: torch.Tensor):
    rows = alpha.shape[0] if alpha.dim() else 1
    return rows, alpha.numel() // max(rows, 1)


def softround_forward(alpha, base, s, z, qmax: int, beta: Optional[float]):
    """(soft-rounded weight, regulariser sum as a 0-dim tensor, saved) in one pass; ``saved``
    (the sigmoid of V and, with the regulariser, its gradient factor) is what
    ``softround_backward`` reads instead of recomputing exp and log."""
    lib = library()
    rows, cols = _shape(alpha)
    w, sg = torch.empty_like(alpha), torch.empty_like(alpha)
    r = torch.empty_like(alpha) if beta is not None else sg  # unused without the regulariser
    sr, zr = _rows(s, rows), _rows(z, rows)
    reg = lib.pq_softround_fwd(alpha.data_ptr(), base.data_ptr(), sr.data_ptr(), zr.data_ptr(), rows, cols,
                               float(qmax), float(beta or 0.0), int(beta is not None), w.data_ptr(),
                               sg.data_ptr(), r.data_ptr(), torch.get_num_threads())
    return w, alpha.new_tensor(reg), (sg, r)


def softround_backward(saved, base, s, z, qmax: int, beta: Optional[float], g_w, g_reg) -> torch.Tensor:
    """The gradient with respect to V of <g_w, weight> + g_reg * regulariser, in one pass over
    ``saved`` (from ``softround_forward``)."""
    lib = library()
    sg, r = saved
    rows, cols = _shape(sg)
    g_w = g_w.contiguous().float()
    ga = torch.empty_like(sg)
    sr, zr = _rows(s, rows), _rows(z, rows)
    coef = float(g_reg) * -2.0 * beta if beta is not None else 0.0
    lib.pq_softround_bwd(sg.data_ptr(), base.data_ptr(), sr.data_ptr(), zr.data_ptr(), g_w.data_ptr(), r.data_ptr(),
                         rows, cols, float(qmax), int(beta is not None), coef, ga.data_ptr(),
                         torch.get_num_threads())
    return ga
