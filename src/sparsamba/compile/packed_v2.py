"""Packed format v2 ("rows in lanes") of one matrix: the numpy writer and reader of the blob that
docs/packed-format.md specifies ("Matrix blob") and src/engine/cpu/linear_v2.h reads.

    blob = pack_matrix(out, in_, classes, dtype)   # classes: [(n, rows, keep, weight)], n ascending
    m    = unpack_matrix(blob)                     # header + per class rows, keep, stored values, scales
    W    = dense_of(m)                             # (out, in) fp32, int8 dequantised (q · scale)

Rows of one n-class go in blocks of 16, processed together by the kernels (one SIMD lane per row);
one sequential stream per block and panel of inputs; 2-bit position codes. Everything is vectorised
over blocks and chunks: a 370M model packs in seconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

B, CHUNK, ALIGN = 16, 64, 64
MAGIC, VERSION = 0x32565053, 2  # "SPV2"
DTYPES = {"f32": 0, "f16": 1, "int8": 2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ESIZE = {0: 4, 1: 2, 2: 1}
STORE = {0: np.float32, 1: np.float16, 2: np.int8}
HEADER = struct.Struct("<8I4Q")  # magic, version, dtype, out, in, panel, block, 0, class_off[4]
CLASS_HEADER = struct.Struct(
    "<4I6Q"
)  # n, rows, nblocks, 0, off_index, off_scale, off_stream, stream_bytes, 0, 0


def up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def code_bytes(n: int) -> int:
    return 0 if n == 0 else (8 if n == 2 else 4) * B


def slots(n: int, G: int, dt: int) -> int:
    s = G * (4 - n)
    return s + (s & 1) if dt == 2 else s


def record_bytes(n: int, dt: int, G: int) -> int:
    return up(code_bytes(n) + slots(n, G, dt) * B * ESIZE[dt], ALIGN)


def default_panel(K: int) -> int:
    """One panel while x (fp32) stays well inside L1, else 1024 inputs."""
    return up(K, CHUNK) if K <= 2048 else 1024


def stream_off(dt: int, nb: int) -> int:
    return 64 + 64 * nb * (2 if dt == 2 else 1)


def block_panel_bytes(n: int, dt: int, K: int, P: int, p: int) -> int:
    ln = min(P, K - p * P)
    full, rest = divmod(ln, CHUNK)
    return full * record_bytes(n, dt, 16) + (record_bytes(n, dt, (rest + 3) // 4) if rest else 0)


def stream_bytes(n: int, dt: int, K: int, P: int, nb: int) -> int:
    return nb * sum(block_panel_bytes(n, dt, K, P, p) for p in range(-(-K // P)))


def class_bytes(n: int, dt: int, K: int, P: int, rows: int) -> int:
    nb = -(-rows // B)
    return stream_off(dt, nb) + stream_bytes(n, dt, K, P, nb)


def matrix_bytes(K: int, dt: int, rows_by_n: dict[int, int], panel: int | None = None) -> int:
    """Bytes of the blob of a matrix with ``rows_by_n[n]`` rows in class n (the size model)."""
    P = panel or default_panel(K)
    return 64 + sum(class_bytes(n, dt, K, P, r) for n, r in rows_by_n.items() if r)


# ----------------------------------------------------------------------------------------------
# Slots and codes of a class, from its keep mask


def _slot_positions(keep: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """keep (R, Gt, 4) bool, exactly 4 - n per group -> (slot positions (R, Gt, 4 - n) in the
    stored order, code fields (R, Gt·f) or None): n = 1 stores the removed position and its kept
    ones in rotated order (p+1, p+2, p+3 mod 4); n = 2, 3 the kept positions, ascending."""
    R, Gt, _ = keep.shape
    if n == 0:
        return np.broadcast_to(np.arange(4), (R, Gt, 4)), None
    if n == 1:
        p = (~keep).argmax(-1)  # (R, Gt)
        return (p[..., None] + 1 + np.arange(3)) & 3, p
    pos = np.sort(np.where(keep, np.arange(4), 4 + np.arange(4)), -1)[..., : 4 - n]
    return pos, pos.reshape(R, -1)


def _words(fields: np.ndarray, nw: int) -> np.ndarray:
    """(..., 16·nw) 2-bit fields -> (..., nw) u32, field i at bits 2(i % 16) of word i / 16."""
    f = fields.astype(np.uint64).reshape(*fields.shape[:-1], nw, 16)
    return (f << (2 * np.arange(16, dtype=np.uint64))).sum(-1).astype(np.uint32)


def _quantise(w: np.ndarray, dt: int, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """fp32 rows (R, in) -> (stored values (R, in), int8 row scales or None)."""
    if dt == 0:
        return w.astype(np.float32), None
    if dt == 1:
        if w.size and np.abs(w).max() > np.finfo(np.float16).max:
            raise ValueError(f"{what} has values beyond the fp16 range; compile with --dtype f32")
        return w.astype(np.float16), None
    amax = np.abs(w).max(1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _class_section(
    n: int, rows: np.ndarray, keep: np.ndarray, weight: np.ndarray, dt: int, K: int, P: int, what: str
) -> bytes:
    R = len(rows)
    nb = -(-R // B)
    Rp, Kp = nb * B, up(K, CHUNK)
    nch, Gt = Kp // CHUNK, Kp // 4
    q, scale = _quantise(np.asarray(weight, np.float32), dt, what)
    vals = np.zeros((Rp, Kp), STORE[dt])
    vals[:R, :K] = q
    kp = np.zeros((Rp, Kp), bool)
    kp[:R, : keep.shape[1]] = keep[:, :Kp]
    kp[:R, keep.shape[1] :] = True if n == 0 else False
    # groups past the last real one (zero padding to a whole chunk): any valid choice, zero values
    kp = kp.reshape(Rp, Gt, 4)
    pad_groups = kp.sum(-1) != 4 - n
    kp[pad_groups] = np.arange(4) < 4 - n
    pos, fields = _slot_positions(kp, n)  # (Rp, Gt, 4-n)
    v = np.take_along_axis(vals.reshape(Rp, Gt, 4), pos, -1)  # (Rp, Gt, 4-n) in slot order
    G_last = (K - CHUNK * (nch - 1) + 3) // 4
    fpg = 2 if n == 2 else 1  # code fields per group
    nw = code_bytes(n) // (4 * B)
    if n:
        f = fields.reshape(Rp, nch, 16 * fpg).copy()
        f[:, -1, G_last * fpg :] = 0  # fields past the last chunk's slots are 0
        f[R:] = 0  # padding rows: all-zero codes
        words = _words(f, nw)  # (Rp, nch, nw)
        codes = words.reshape(nb, B, nch, nw).transpose(0, 2, 3, 1).reshape(nb, nch, nw * B)
        codes = np.ascontiguousarray(codes).view(np.uint8)  # (nb, nch, code_bytes)
    S = 16 * (4 - n)
    sv = v.reshape(nb, B, nch, S).transpose(0, 2, 3, 1)  # (nb, nch, S, 16): slot-major, rows inside

    def values_bytes(x: np.ndarray) -> np.ndarray:  # (nb, k, S', 16) -> (nb, k, bytes)
        if dt == 2:  # pairs of slots, rows interleaved: byte 32u + 2r + (t & 1)
            x = x.reshape(*x.shape[:2], x.shape[2] // 2, 2, B).transpose(0, 1, 2, 4, 3)
        return np.ascontiguousarray(x).reshape(nb, x.shape[1], -1).view(np.uint8)

    full_n = nch if K % CHUNK == 0 else nch - 1
    full = np.zeros((nb, 0, record_bytes(n, dt, 16)), np.uint8)
    if full_n:
        full = np.concatenate(([codes[:, :full_n]] if n else []) + [values_bytes(sv[:, :full_n])], -1)
    tail = None
    if full_n < nch:
        Sl = slots(n, G_last, dt)
        t = np.zeros((nb, 1, Sl, B), STORE[dt])
        t[:, :, : G_last * (4 - n)] = sv[:, -1:, : G_last * (4 - n)]
        tb = [values_bytes(t)]
        if n:
            tb.insert(0, codes[:, -1:])
        tail = np.concatenate(tb, -1)[:, 0]
        tail = np.concatenate(
            [tail, np.zeros((nb, record_bytes(n, dt, G_last) - tail.shape[1]), np.uint8)], 1
        )
    stream = []
    cpp = P // CHUNK  # chunks per panel
    for p in range(-(-K // P)):
        c0, c1 = p * cpp, min((p + 1) * cpp, full_n)
        blk = full[:, c0:c1].reshape(nb, -1)
        if tail is not None and (p + 1) * cpp >= nch:
            blk = np.concatenate([blk, tail], 1)
        stream.append(blk.reshape(-1))
    stream = np.concatenate(stream).tobytes()
    index = np.full(Rp, -1, np.int32)
    index[:R] = rows
    sec = CLASS_HEADER.pack(
        n, R, nb, 0, 64, 64 + 64 * nb if dt == 2 else 0, stream_off(dt, nb), len(stream), 0, 0
    )
    sec += index.tobytes()
    if dt == 2:
        sc = np.zeros(Rp, np.float32)
        sc[:R] = scale
        sec += sc.tobytes()
    assert len(sec) == stream_off(dt, nb) and len(stream) == stream_bytes(n, dt, K, P, nb)
    return sec + stream


def pack_matrix(
    out: int, in_: int, classes, dtype: str, panel: int | None = None, what: str = "matrix"
) -> np.ndarray:
    """classes: [(n, rows (R,) int, keep (R, 4G) bool, weight (R, in) fp32 zero off keep)], n ascending,
    at most one per n, rows distinct -> the blob (uint8 array). A dense matrix is one n = 0 class."""
    dt = DTYPES[dtype]
    P = panel or default_panel(in_)
    if P % CHUNK:
        raise ValueError(f"panel {P} is not a multiple of {CHUNK}")
    offs, secs, at = [0, 0, 0, 0], [], 64
    for n, rows, keep, weight in classes:
        sec = _class_section(
            n, np.asarray(rows), np.asarray(keep, bool), np.asarray(weight), dt, in_, P, what
        )
        offs[n] = at
        secs.append(sec)
        at += len(sec)
    blob = HEADER.pack(MAGIC, VERSION, dt, out, in_, P, B, 0, *offs) + b"".join(secs)
    return np.frombuffer(blob, np.uint8)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class ClassV2:
    n: int
    rows: np.ndarray  # (R,) int32: the output row of each packed row
    keep: np.ndarray  # (R, 4G) bool: the positions stored (4 - n per group)
    values: np.ndarray  # (R, in) fp32: stored values at their input positions (int8: q), 0 elsewhere
    scale: np.ndarray | None  # (R,) fp32, int8 only


@dataclass
class MatrixV2:
    out: int
    in_: int
    dtype: str
    panel: int
    classes: list[ClassV2]
    nbytes: int


def header_of(blob) -> tuple:
    b = np.asarray(blob, np.uint8).tobytes()[: HEADER.size]
    if len(b) < HEADER.size:
        raise ValueError("shorter than the 64-byte matrix header")
    return HEADER.unpack(b)


def unpack_matrix(blob) -> MatrixV2:
    """The blob -> its classes; raises ValueError where a header or count is not what the layout says."""
    buf = np.ascontiguousarray(np.asarray(blob, np.uint8))
    magic, ver, dt, out, K, P, blk, _, *offs = header_of(buf)
    if magic != MAGIC or ver != VERSION or blk != B or dt not in ESIZE or not P or P % CHUNK:
        raise ValueError(
            f"not a v2 matrix blob (magic {magic:#x}, version {ver}, block {blk}, dtype {dt}, panel {P})"
        )
    Kp = up(K, CHUNK)
    nch, G4 = Kp // CHUNK, 4 * -(-K // 4)
    G_last = (K - CHUNK * (nch - 1) + 3) // 4
    classes, end = [], 64
    for n in range(4):
        o = offs[n]
        if not o:
            continue
        if o != end:
            raise ValueError(f"class n={n} at offset {o}, expected {end}")
        cn, R, nb, _, oi, osc, ost, sb, _, _ = CLASS_HEADER.unpack(buf[o : o + CLASS_HEADER.size].tobytes())
        if (
            cn != n
            or not R
            or nb != -(-R // B)
            or ost != stream_off(dt, nb)
            or sb != stream_bytes(n, dt, K, P, nb)
        ):
            raise ValueError(f"class n={n}: declared counts do not match the class")
        end = o + ost + sb
        if end > len(buf):
            raise ValueError(f"class n={n} runs past the end of the blob")
        Rp = nb * B
        index = buf[o + 64 : o + 64 + 4 * Rp].view(np.int32)
        scale = buf[o + osc : o + osc + 4 * Rp].view(np.float32) if dt == 2 else None
        # records back to (nb, nch, bytes): panel by panel, each block's run of chunks
        rb, cpp = record_bytes(n, dt, 16), P // CHUNK
        full_n = nch if K % CHUNK == 0 else nch - 1
        recs = np.zeros((nb, nch, rb), np.uint8)
        at = o + ost
        for p in range(-(-K // P)):
            bpb = block_panel_bytes(n, dt, K, P, p)
            seg = buf[at : at + nb * bpb].reshape(nb, bpb)
            c0, c1 = p * cpp, min((p + 1) * cpp, full_n)
            recs[:, c0:c1] = seg[:, : (c1 - c0) * rb].reshape(nb, c1 - c0, rb)
            if full_n < nch and (p + 1) * cpp >= nch:
                t = seg[:, (c1 - c0) * rb :]
                recs[:, -1, : t.shape[1]] = t
            at += nb * bpb
        cbytes, S = code_bytes(n), 16 * (4 - n)
        vb = recs[:, :, cbytes : cbytes + S * B * ESIZE[dt]].copy().view(STORE[dt])  # (nb, nch, S*16)
        if dt == 2:
            v = vb.reshape(nb, nch, S // 2, B, 2).transpose(0, 1, 2, 4, 3).reshape(nb, nch, S, B)
        else:
            v = vb.reshape(nb, nch, S, B)
        v = v.transpose(0, 3, 1, 2).reshape(Rp, nch * 16, 4 - n).astype(np.float32)  # (Rp, groups, slots)
        if n != 0:
            nw = cbytes // (4 * B)
            words = recs[:, :, :cbytes].copy().view(np.uint32).reshape(nb, nch, nw, B).transpose(0, 3, 1, 2)
            f = (
                words[..., None].astype(np.uint64) >> (2 * np.arange(16, dtype=np.uint64))
            ) & 3  # (nb,16,nch,nw,16)
            f = f.reshape(Rp, nch * 16 * nw).astype(np.int64)
            if n == 1:
                pos = (f.reshape(Rp, -1, 1) + 1 + np.arange(3)) & 3
            else:
                pos = f.reshape(Rp, nch * 16, 4 - n)
                if n == 2 and (pos[:R, : G4 // 4, 0] >= pos[:R, : G4 // 4, 1]).any():
                    raise ValueError(
                        "class n=2: two kept positions of a group are not distinct and ascending"
                    )
        if n == 0:
            W, kp = v, np.ones(v.shape, bool)
        else:  # scatter each kept value to its position in its group (flat indices: put_along_axis's
            # fancy indexing cost a quarter of a compile's time)
            W = np.zeros((Rp, nch * 16, 4), np.float32)
            kp = np.zeros((Rp, nch * 16, 4), bool)
            at = (4 * np.arange(Rp * nch * 16))[:, None] + pos.reshape(-1, 4 - n)
            W.reshape(-1)[at.reshape(-1)] = v.reshape(-1)
            kp.reshape(-1)[at.reshape(-1)] = True
        gl = (nch - 1) * 16 + G_last  # groups that exist (the tail chunk holds G_last)
        rows = index[:R].astype(np.int32)
        if (rows < 0).any() or (rows >= out).any():
            raise ValueError(f"class n={n}: a row index is out of range")
        classes.append(
            ClassV2(
                n,
                rows.copy(),
                kp[:R, : G4 // 4].reshape(R, G4),
                W[:R, :gl].reshape(R, -1)[:, :K].copy(),
                None if scale is None else scale[:R].copy(),
            )
        )
    if end != len(buf):
        raise ValueError(f"{len(buf)} bytes, the classes end at {end}")
    return MatrixV2(out, K, DTYPE_NAMES[dt], P, classes, len(buf))


def dense_of(m: MatrixV2) -> np.ndarray:
    """(out, in) fp32 weights the matrix computes (int8 dequantised: q · scale)."""
    W = np.zeros((m.out, m.in_), np.float32)
    for c in m.classes:
        W[c.rows] = c.values * c.scale[:, None] if c.scale is not None else c.values
    return W


def quantise_activations(x: np.ndarray) -> np.ndarray:
    """What the int8 kernels multiply with: x (..., in) rounded per chunk of 64 inputs to int16
    steps of s = max|x over the chunk| / 32767 (returned as fp32 q · s)."""
    K = x.shape[-1]
    xp = np.zeros((*x.shape[:-1], up(K, CHUNK)), np.float32)
    xp[..., :K] = x
    c = xp.reshape(*x.shape[:-1], -1, CHUNK)
    m = np.abs(c).max(-1, keepdims=True)
    s = np.where(m > 0, m / np.float32(32767), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(c * (np.float32(1) / s)), -32767, 32767)
    return (q * s).reshape(xp.shape)[..., :K]


def matvec(m: MatrixV2, W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y = W x for x (..., in) as the engine's kernels compute it: W = ``dense_of(m)``; int8 matrices
    multiply the activations rounded per chunk (``quantise_activations``), float sums in fp32."""
    xe = quantise_activations(x) if m.dtype == "int8" else x
    return xe.astype(np.float32) @ W.T


# ----------------------------------------------------------------------------------------------
# The compiler's plan <-> blobs


def classes_of_plan(lp) -> list:
    """A plan's LinearPlan (fp32: ``weight``, or ``classes`` of rows / keep / weight) -> the packer's
    classes; a dense layer is one n = 0 class of every row, in order."""
    import torch

    if lp.classes is None:
        W = lp.weight.float().numpy()
        G = -(-lp.in_features // 4)
        return [(0, np.arange(lp.out_features), np.ones((lp.out_features, 4 * G), bool), W)]
    return [
        (c.n, c.rows.numpy().astype(np.int64), c.keep.numpy(), c.weight.to(torch.float32).numpy())
        for c in lp.classes
    ]


def pack_plan_linear(lp, dtype: str, what: str) -> np.ndarray:
    return pack_matrix(lp.out_features, lp.in_features, classes_of_plan(lp), dtype, what=what)
