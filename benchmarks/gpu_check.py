"""One-command GPU check of the Triton kernel library (fits a 10-minute GPU run).

    python benchmarks/gpu_check.py [--out DIR] [--skip-tests]

1. Runs ``pytest tests/kernels`` on CUDA (a subprocess, interpreter off).
2. Engine on CUDA (Triton kernels through ``kernels/ops.py``): greedy tokens of the CUDA-graph decode step
   (``generation/cuda_graphs.py``) must equal the eager step's, fp32, left-padded batches in several batch
   buckets, a Llama and a Mistral with a sliding window; HF's tokens and decode ms/token (eager vs
   graphs) are printed alongside.
3. Measures device-to-device copy bandwidth, then times every kernel with ``triton.testing.do_bench``
   at realistic sizes (Llama-3-8B-like: hidden 4096, 32 / 8 heads of 128, intermediate 14336) next to
   the torch op it replaces, and prints: kernel, shape, time (us), GB/s (bytes the op must move /
   time), fraction of the copy bandwidth, torch time (us), speed-up over torch. The rows named ``ops.*``
   time the entry points the engine calls on CUDA (``kernels/ops.py``, dispatch included): the fused
   residual + RMSNorm and rotary + KV-cache write against the op-by-op reference they replace, and the
   small-batch GEMM dispatch (``ops.linear``, M = 1..32) on each Llama-3-8B linear against ``F.linear``.
4. Decode of a ~1B Llama (bf16, prompt 128, 128 new tokens, batch 1 and 16): HF eager, HF static cache +
   ``torch.compile``, ours: ms/token, tokens/s, bandwidth utilisation (weight bytes per step x steps/s over the
   copy bandwidth, read + write) and the ratio to HF eager.
5. Offload with the GPU computing (pinned host tier, disk tier through pinned staging): tiny Llama, fp32,
   tokens and logits against HF.
With ``--out DIR`` the tables are also written to DIR/gpu_check.md. Without a GPU it prints a line saying
so and exits 0, so it is safe to run anywhere.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def start_tests(log: Path) -> subprocess.Popen:
    """``pytest tests/kernels`` on CUDA in a subprocess (interpreter off), spread over 8 workers when pytest-xdist is
    there (each compiles its own kernels); output to ``log``. Runs beside the correctness checks, before the timings."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    workers = []
    try:
        import xdist  # noqa: F401
        workers = ["-n", "8"]
    except ImportError:
        pass
    print(f"== pytest tests/kernels on CUDA {' '.join(workers)} (log {log})", flush=True)
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, "tests/kernels"],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_tests(proc: subprocess.Popen, log: Path, t0: float, timeout_s: float) -> int:
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        proc.kill()
        print(f"pytest timed out after {time.time() - t0:.0f}s")
        rc = 124
    tail = log.read_text().strip().splitlines()[-15:]
    print("\n".join(tail))
    print(f"== pytest exit code {rc} after {time.time() - t0:.0f}s", flush=True)
    return rc


def _bench(fn, graph: bool = False) -> float:
    if not torch.cuda.is_available():   # --cpu-smoke: one call, wall time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:   # replayed from a CUDA graph: the GPU time, without Python's launch overhead
        try:
            return do_bench_cudagraph(fn, rep=50) * 1e3
        except Exception:
            torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=50) * 1e3   # us


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write), the roof the memory-bound kernels aim at."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def cases(dev: str = "cuda", tiny: bool = False):
    """(kernel, shape, triton fn, torch fn or None, bytes the op must move). ``tiny``: CPU smoke sizes."""
    from lightning_dsinfer.kernels import reference as ref
    from lightning_dsinfer.kernels.activations import gated_act
    from lightning_dsinfer.kernels.decode_attention import decode_attention
    from lightning_dsinfer.kernels.layer_norm import layer_norm
    from lightning_dsinfer.kernels.moe_gemm import moe_gemm
    from lightning_dsinfer.kernels.moe_routing import moe_route
    from lightning_dsinfer.kernels.prefill_attention import prefill_attention
    from lightning_dsinfer.kernels.rms_norm import rms_norm
    from lightning_dsinfer.kernels.rotary import rotary_qkv
    from lightning_dsinfer.kernels.small_gemm import small_gemm, small_gemm_int4, small_gemm_int8

    bf = torch.bfloat16
    F = torch.nn.functional
    hid, inter, hq, hkv, d = (64, 96, 4, 2, 16) if tiny else (4096, 14336, 32, 8, 128)
    big, ctx, cache_len = (8, 32, 64) if tiny else (4096, 2048, 4096)   # prefill tokens, decode context
    gemm_shapes = ((64, 128), (96, 128)) if tiny else ((4096, 4096), (14336, 4096))
    n_exp = 8 if tiny else 64
    out = []

    for m in (16, big):
        x, r = torch.randn(m, hid, device=dev, dtype=bf), torch.randn(m, hid, device=dev, dtype=bf)
        w, bb = torch.randn(hid, device=dev, dtype=bf), torch.randn(hid, device=dev, dtype=bf)
        out.append(("rms_norm+residual", f"[{m}, {hid}] bf16", lambda x=x, r=r, w=w: rms_norm(x, w, 1e-6, residual=r),
                    lambda x=x, r=r, w=w: F.rms_norm(x + r, (hid,), w, 1e-6), 4 * m * hid * 2))
        out.append(("layer_norm+residual", f"[{m}, {hid}] bf16",
                    lambda x=x, r=r, w=w, bb=bb: layer_norm(x, w, bb, 1e-5, residual=r),
                    lambda x=x, r=r, w=w, bb=bb: F.layer_norm(x + r, (hid,), w, bb, 1e-5), 4 * m * hid * 2))

    for b, t in ((16, 1), (1, ctx)):
        qkv = torch.randn(b, t, hq + 2 * hkv, d, device=dev, dtype=bf)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        cos, sin = ref.rotary_tables(d, cache_len, device=dev)
        pos = torch.arange(t, device=dev)[None].expand(b, t).contiguous()
        kc = torch.zeros(b, hkv, cache_len, d, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)
        st = torch.zeros(b, dtype=torch.int32, device=dev)
        nbytes = b * t * (2 * (hq + hkv) * d + 3 * hkv * d) * 2
        out.append(("rotary+kv_write", f"B={b} T={t} {hq}/{hkv}x{d}",
                    lambda q=q, k=k, v=v, cos=cos, sin=sin, pos=pos, kc=kc, vc=vc, st=st:
                    rotary_qkv(q, k, cos, sin, pos, v, k_cache=kc, v_cache=vc, cache_start=st),
                    lambda q=q, k=k, v=v, cos=cos, sin=sin, pos=pos, kc=kc, vc=vc, st=st:
                    ref.rotary_qkv_cache_write(q, k, v, cos, sin, pos, kc, vc, st) if b == 1 else None, nbytes))

    out += engine_op_cases(dev, tiny)

    for m in (16, big):
        gu = torch.randn(m, 2 * inter, device=dev, dtype=bf)
        out.append(("silu_gate (SwiGLU)", f"[{m}, 2x{inter}] bf16", lambda gu=gu: gated_act(gu, None, "silu"),
                    lambda gu=gu: ref.silu_and_mul(gu), 3 * m * inter * 2))

    for b in (1, 16):
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        q = torch.randn(b, hq, d, device=dev, dtype=bf)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        out.append(("decode_attention", f"B={b} ctx={ctx} {hq}/{hkv}x{d}",
                    lambda q=q, kc=kc, vc=vc, lens=lens: decode_attention(q, kc, vc, lens),
                    lambda q=q, kc=kc, vc=vc: ref.attention(q[:, :, None], kc, vc, None, d ** -0.5),
                    2 * kc.numel() * 2 + 2 * q.numel() * 2))

    # multi-head latent attention's decode (DeepSeek-V3 / Kimi-K2: 128 heads on one 576-wide latent row, values its
    # first 512 columns, read from the same tile)
    heads, width, rank = (16, 48, 32) if tiny else (128, 576, 512)
    for b in (1, 16):
        kc = torch.randn(b, 1, ctx, width, device=dev, dtype=bf)
        q = torch.randn(b, heads, width, device=dev, dtype=bf)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        out.append(("decode_attention MLA", f"B={b} ctx={ctx} {heads}x{width}/{rank}",
                    lambda q=q, kc=kc, lens=lens: decode_attention(q, kc, kc[..., :rank], lens),
                    lambda q=q, kc=kc: ref.attention(q[:, :, None], kc, kc, None, width ** -0.5)[..., :rank],
                    kc.numel() * 2 + q.numel() * 2))

    # Gated DeltaNet's decode step (Qwen3.5: 16 key / 48 value heads of 128): the fp32 state read and written once
    from lightning_dsinfer.kernels.gated_delta import delta_step
    from lightning_dsinfer.modules.gated_deltanet import delta_rule

    hk_, hv_, dk_ = (2, 4, 16) if tiny else (16, 48, 128)
    for b in (1, 16):
        qkv = torch.randn(b, 2 * hk_ * dk_ + hv_ * dk_, device=dev, dtype=bf)
        ba = torch.randn(b, 2 * hv_, device=dev, dtype=bf)
        a_log, dt = torch.randn(hv_, device=dev, dtype=bf), torch.randn(hv_, device=dev, dtype=bf)
        state = torch.randn(b, hv_, dk_, dk_, device=dev) * 0.1

        def torch_step(qkv=qkv, ba=ba, a_log=a_log, dt=dt, state=state, b=b):
            qq, kk, vv = qkv.split([hk_ * dk_, hk_ * dk_, hv_ * dk_], -1)
            g = -a_log.float().exp() * F.softplus(ba[:, hv_:].float() + dt)
            return delta_rule(qq.view(b, 1, hk_, dk_), kk.view(b, 1, hk_, dk_), vv.view(b, 1, hv_, dk_),
                              g[:, None], torch.sigmoid(ba[:, :hv_])[:, None], state)
        out.append(("gated_delta decode step", f"B={b} {hk_}/{hv_}x{dk_} fp32 state",
                    lambda qkv=qkv, ba=ba, a_log=a_log, dt=dt, state=state:
                    delta_step(qkv, ba, a_log, dt, state, hk_, dk_), torch_step, 2 * state.numel() * 4))

    # Mamba-2's decode step (Nemotron-H 8B: 128 heads of 64, 8 groups, state 128; the convolution, the scan on the
    # fp32 state read and written once, the gated norm), against the module's torch ops on the same inputs
    from lightning_dsinfer.kernels import ops as kops
    from lightning_dsinfer.modules.gated_deltanet import causal_conv, ssd_scan

    mh, mp_, mg, mn = (4, 16, 2, 16) if tiny else (128, 64, 8, 128)
    mc = mh * mp_ + 2 * mg * mn
    for b in (1, 16):
        proj = torch.randn(b, mh * mp_ + mc + mh, device=dev, dtype=bf)
        hist, conv = torch.randn(b, mc, 3, device=dev, dtype=bf), torch.randn(mc, 4, device=dev, dtype=bf) * 0.3
        cbias, dtb = torch.randn(mc, device=dev, dtype=bf), torch.randn(mh, device=dev, dtype=bf)
        alog, dd, nw = torch.randn(mh, device=dev, dtype=bf), torch.randn(mh, device=dev, dtype=bf), \
            torch.ones(mh * mp_, device=dev, dtype=bf)
        state = torch.randn(b, mh, mp_, mn, device=dev) * 0.1

        def torch_mamba(proj=proj, hist=hist, conv=conv, cbias=cbias, dtb=dtb, alog=alog, dd=dd, nw=nw, state=state,
                        b=b):
            z, xbc, dt_ = proj.split([mh * mp_, mc, mh], -1)
            xbc = F.silu(causal_conv(torch.cat((hist, xbc[:, :, None]), -1), conv, 1, cbias))[:, :, 0]
            x_, bb, cc = xbc.split([mh * mp_, mg * mn, mg * mn], -1)
            bb, cc = (v.view(b, 1, mg, mn).repeat_interleave(mh // mg, 2) for v in (bb, cc))
            y, _ = ssd_scan(x_.view(b, 1, mh, mp_), F.softplus(dt_ + dtb)[:, None], -alog.float().exp(), bb, cc, state)
            y = (y + x_.view(b, 1, mh, mp_).float() * dd.float()[:, None]).view(b, -1).to(bf)
            gated = (y.float() * F.silu(z.float())).view(b, mg, -1)
            return nw * (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).view(b, -1).to(bf)
        out.append(("mamba2 decode step", f"B={b} {mh}x{mp_} g{mg} N={mn} fp32 state",
                    lambda proj=proj, hist=hist, conv=conv, cbias=cbias, dtb=dtb, alog=alog, dd=dd, nw=nw,
                    state=state: kops.mamba2_step(proj, hist, conv, cbias, dtb, alog, dd, nw, state, mg, 1e-5,
                                                  (0.0, float("inf"))),
                    torch_mamba, 2 * state.numel() * 4))

    # Mamba-1's selective scan (FalconMamba 7B: 8192 channels, state 16): a decode step (T = 1, the fp32 state read and
    # written once) and a 128-token prompt's (the state in registers over the tokens), against the module's torch
    # recurrence on the same inputs
    from lightning_dsinfer.kernels.mamba1 import scan as mamba1_scan

    mi, mn1 = (64, 16) if tiny else (8192, 16)
    for b, tt in (((1, 4),) if tiny else ((1, 1), (16, 1), (1, 128))):
        x1, dt1 = torch.randn(b, tt, mi, device=dev, dtype=bf), torch.randn(b, tt, mi, device=dev, dtype=bf)
        z1, bc1 = torch.randn(b, tt, mi, device=dev, dtype=bf), torch.randn(b, tt, 2 * mn1, device=dev, dtype=bf)
        dtb1, alog1, dd1 = (torch.randn(mi, device=dev, dtype=bf), torch.randn(mi, mn1, device=dev, dtype=bf) * 0.5,
                            torch.randn(mi, device=dev, dtype=bf))
        state1 = torch.randn(b, mi, mn1, device=dev) * 0.1

        def torch_mamba1(x1=x1, z1=z1, dt1=dt1, bc1=bc1, dtb1=dtb1, alog1=alog1, dd1=dd1, state1=state1, tt=tt):
            bb, cc = bc1.split([mn1, mn1], -1)
            dts, a, h, ys = F.softplus(dt1.float() + dtb1.float()), -alog1.float().exp(), state1, []
            for i in range(tt):
                h = torch.exp(dts[:, i, :, None] * a) * h + dts[:, i, :, None] * bb[:, i, None].float() * \
                    x1[:, i, :, None].float()
                ys.append((h.to(bf).float() * cc[:, i, None].float()).sum(-1).to(bf))
            return ((torch.stack(ys, 1).float() + x1.float() * dd1.float()) * F.silu(z1.float())).to(bf)
        out.append(("mamba1 scan", f"B={b} T={tt} {mi}xN{mn1} fp32 state",
                    lambda x1=x1, z1=z1, dt1=dt1, bc1=bc1, dtb1=dtb1, alog1=alog1, dd1=dd1, state1=state1:
                    mamba1_scan(x1, z1, dt1, bc1, dtb1, alog1, dd1, state1),
                    torch_mamba1, 2 * state1.numel() * 4 + 4 * x1.numel() * 2))

    t = ctx
    qkv = torch.randn(1, t, hq + 2 * hkv, d, device=dev, dtype=bf)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out.append(("prefill_attention (compute-bound)", f"B=1 T={t} {hq}/{hkv}x{d}",
                lambda: prefill_attention(q, k, v),
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                (2 * hq + 2 * hkv) * t * d * 2))

    for n, kdim in gemm_shapes:
        w = torch.randn(n, kdim, device=dev, dtype=bf) * 0.02
        q8, s8 = ref.quantize_int8_per_channel(w)
        p4, s4 = ref.quantize_int4_groupwise(w, 32 if tiny else 128)
        for m in (1, 16):
            x = torch.randn(m, kdim, device=dev, dtype=bf)
            io = (m * kdim + m * n) * 2
            out.append(("gemm bf16", f"M={m} {n}x{kdim}", lambda x=x, w=w: small_gemm(x, w),
                        lambda x=x, w=w: F.linear(x, w), w.numel() * 2 + io))
            out.append(("gemm int8 w-only", f"M={m} {n}x{kdim}", lambda x=x, q8=q8, s8=s8: small_gemm_int8(x, q8, s8),
                        lambda x=x, w=w: F.linear(x, w), q8.numel() + s8.numel() * 4 + io))
            out.append(("gemm int4 g128", f"M={m} {n}x{kdim}",
                        lambda x=x, p4=p4, s4=s4: small_gemm_int4(x, p4, s4, 32 if tiny else 128),
                        lambda x=x, w=w: F.linear(x, w), p4.numel() + s4.numel() * 4 + io))

    for tok in (16, big):
        logits = torch.randn(tok, n_exp, device=dev, dtype=bf)
        out.append(("moe_route softmax top8", f"T={tok} E={n_exp}", lambda lg=logits: moe_route(lg, 8),
                    lambda lg=logits: torch.topk(torch.softmax(lg.float(), -1), 8), logits.numel() * 2 + tok * 8 * 16))

    e, k_top, tok, n, kdim = 8, 2, 16 if tiny else 64, 2 * inter // 4, hid   # Mixtral-like, 4-way sliced
    _, _, _, offsets, sorted_ids, _ = ref.moe_route(torch.randn(tok, e, device=dev), k_top)
    x = torch.randn(tok, kdim, device=dev, dtype=bf)
    w = torch.randn(e, n, kdim, device=dev, dtype=bf) * 0.02
    out.append(("moe_gemm (grouped)", f"T={tok} E={e} k={k_top} {n}x{kdim}",
                lambda: moe_gemm(x, w, sorted_ids, offsets, k_top), None,
                w.numel() * 2 + (tok * kdim + tok * k_top * n) * 2))
    return out


def engine_op_cases(dev: str = "cuda", tiny: bool = False):
    """The fused forms the engine calls through ``kernels/ops.py`` (rows of :func:`cases`), each against the
    op-by-op reference composition it replaces (what the engine ran on CUDA before the fused forms)."""
    from lightning_dsinfer.kernels import ops
    from lightning_dsinfer.kernels import reference as ref

    bf = torch.bfloat16
    F = torch.nn.functional
    hid, inter, hq, hkv, d = (64, 96, 4, 2, 16) if tiny else (4096, 14336, 32, 8, 128)
    ctx, cache_len = (32, 64) if tiny else (2048, 4096)
    out = []

    for m in (1, 16):   # decode rows: o_proj / down_proj output + residual -> the next RMSNorm
        x, r = torch.randn(m, hid, device=dev, dtype=bf), torch.randn(m, hid, device=dev, dtype=bf)
        w = torch.randn(hid, device=dev, dtype=bf)
        out.append(("ops.add_rms_norm", f"[{m}, {hid}] bf16", lambda x=x, r=r, w=w: ops.add_rms_norm(x, r, w, 1e-6),
                    lambda x=x, r=r, w=w: ref.add_rms_norm(x, r, w, 1e-6), 4 * m * hid * 2))

    for b, t in ((1, 1), (16, 1), (1, ctx)):   # qkv as the QKV GEMM writes it, rows of the engine's Step
        qkv = torch.randn(b, t, hq + 2 * hkv, d, device=dev, dtype=bf)
        ang = torch.rand(b, t, 1, d // 2, device=dev) * 6
        cos = torch.cat((ang.cos(), ang.cos()), -1).to(bf)
        sin = torch.cat((-ang.sin(), ang.sin()), -1).to(bf)
        kc = torch.zeros(b, hkv, cache_len, d, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)
        col = cache_len // 2
        nbytes = b * t * (2 * (hq + hkv) * d + 3 * hkv * d) * 2
        out.append(("ops.rotary_write_kv", f"B={b} T={t} {hq}/{hkv}x{d}",
                    lambda qkv=qkv, cos=cos, sin=sin, kc=kc, vc=vc, col=col:
                    ops.rotary_write_kv(qkv, hq, cos, sin, kc, vc, col),
                    lambda qkv=qkv, cos=cos, sin=sin, kc=kc, vc=vc, col=col:
                    ref.rotary_write_kv(qkv, hq, cos, sin, kc, vc, col), nbytes))

    linears = ((("qkv", (hq + 2 * hkv) * d, hid), ("o", hid, hq * d), ("gate_up", 2 * inter, hid),
                ("down", hid, inter)) if not tiny else (("qkv", (hq + 2 * hkv) * d, hid), ("down", hid, inter)))
    for name, n, kdim in linears:
        w = torch.randn(n, kdim, device=dev, dtype=bf) * 0.02
        for m in (1, 8, 32):
            x = torch.randn(m, kdim, device=dev, dtype=bf)
            out.append((f"ops.linear {name}", f"M={m} {n}x{kdim} bf16", lambda x=x, w=w: ops.linear(x, w),
                        lambda x=x, w=w: F.linear(x, w), (n * kdim + m * kdim + m * n) * 2))

    # Deep-Fusion GEMMs of a decode step (ops.norm_linear): residual add + RMSNorm + QKV, and residual add + RMSNorm +
    # gate/up + SwiGLU, each one kernel; the torch column runs the three / four ops it replaces.
    nw = torch.randn(hid, device=dev, dtype=bf)
    for name, n, gated in (("add+norm+qkv", (hq + 2 * hkv) * d, False), ("add+norm+gate_up+silu", 2 * inter, True)):
        w = torch.randn(n, hid, device=dev, dtype=bf) * 0.02
        for m in (1, 16):
            x, r = torch.randn(m, hid, device=dev, dtype=bf), torch.randn(m, hid, device=dev, dtype=bf)

            def unfused(x=x, r=r, w=w, gated=gated):
                y = F.linear(ref.add_rms_norm(x, r, nw, 1e-6)[0], w)
                return ref.silu_and_mul(y) if gated else y

            out.append((f"ops.norm_linear {name}", f"M={m} {n}x{hid} bf16",
                        lambda x=x, r=r, w=w, gated=gated: ops.norm_linear(r, x, nw, 1e-6, w, gated=gated),
                        unfused, (n * hid + 3 * m * hid + m * (n // 2 if gated else n)) * 2))
    return out


def left_padded(lengths, vocab: int, g: torch.Generator):
    """(ids, attention_mask) of prompts of the given lengths, left-padded with id 0, tokens in [3, vocab)."""
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


def check_decode_graphs(dev: str = "cuda", tiny: bool = False) -> int:
    """Graph-replayed decode tokens == eager decode tokens (fp32): a Llama, a Mistral with a sliding window and a
    Mixtral (routing and grouped expert GEMMs inside the graph). Returns 1 on a mismatch.

    ``tiny`` (CPU smoke, with ``cuda_graphs.emulate()`` and ``ops.force_triton()`` around the call): small
    sizes (hidden 32, 2 heads of 16 over 1 KV head: the interpreter's time grows with the widths; the Mistral
    window 8, which the 9-token prompt and its steps cross), one left-padded batch, no timing.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

    import lightning_dsinfer as dsi

    common = dict(hidden_size=32 if tiny else 512, intermediate_size=48 if tiny else 1024,
                  num_hidden_layers=2 if tiny else 4, num_attention_heads=2 if tiny else 8,
                  num_key_value_heads=1 if tiny else 2,
                  vocab_size=97 if tiny else 1000, max_position_embeddings=512, initializer_range=0.05,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    window = 8 if tiny else 16
    configs = [("llama", LlamaConfig(**common)),
               (f"mistral window {window}", MistralConfig(**common, sliding_window=window)),
               ("mixtral 4 experts top 2", MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))]
    batches = [[9, 4, 6]] if tiny else [[20], [20, 7, 13], [5, 9, 17, 3, 11, 20, 8, 14]]
    new = 4 if tiny else 24
    g = torch.Generator().manual_seed(0)
    rc = 0
    old_env = os.environ.get("DSINFER_CUDA_GRAPHS")
    for name, cfg in configs:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg).eval().to(dev)
        opt = dsi.init_inference(copy.deepcopy(hf), max_seq_len=64 if tiny else 128, max_batch_size=8)
        for lengths in batches:
            ids, mask = left_padded(lengths, cfg.vocab_size, g)
            kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False)
            os.environ["DSINFER_CUDA_GRAPHS"] = "0"
            eager = opt.generate(**kw)
            os.environ["DSINFER_CUDA_GRAPHS"] = "1"
            graph = opt.generate(**kw)
            with torch.no_grad():
                ref = hf.generate(**kw)
            runner = getattr(opt._dsinfer_engine, "_decode_graphs", None)
            used = runner is not None and runner.current is not None and (tiny or runner.current.graph is not None)
            same = torch.equal(graph, eager)
            rc = rc or int(not (same and used))
            print(f"{'ok  ' if same and used else 'FAIL'}  graphs {name} B={len(lengths)}: graph == eager {same}, "
                  f"graph captured {used}, == HF {torch.equal(graph, ref)}", flush=True)
        if not tiny:
            for b in (1, 8):
                kw = dict(input_ids=torch.randint(3, cfg.vocab_size, (b, 32), device=dev), max_new_tokens=64,
                          min_new_tokens=64, do_sample=False)
                ms = {}
                for mode in ("0", "1"):
                    os.environ["DSINFER_CUDA_GRAPHS"] = mode
                    opt.generate(**kw)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    opt.generate(**kw)
                    torch.cuda.synchronize()
                    ms[mode] = (time.perf_counter() - t0) * 1e3 / 64
                print(f"      {name} B={b} decode+prefill ms/token: eager {ms['0']:.2f}, graphs {ms['1']:.2f} "
                      f"({ms['0'] / ms['1']:.2f}x)", flush=True)
    if old_env is None:
        os.environ.pop("DSINFER_CUDA_GRAPHS", None)
    else:
        os.environ["DSINFER_CUDA_GRAPHS"] = old_env
    return rc


def check_offload(dev: str = "cuda") -> int:
    """Offload with the GPU as the compute device (issue 5's CUDA side: pinned host tier with side-stream copies,
    disk tier through pinned staging): tiny Llamas in fp32 under budgets that stream most units, greedy tokens
    == HF's and logits within 2e-4 for a left-padded batch: both tiers; the disk tier with a ring of slots per unit
    size (MLP halves 2.6x the attention halves); both tiers with int8 weights (against HF with the same
    quantise-dequantise); a Mixtral on the host tier (router + experts stream as the MLP unit). Returns 1 on a
    mismatch or error."""
    import tempfile

    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    import lightning_dsinfer as dsi
    from lightning_dsinfer.kernels import reference as kref

    def fake_quantised(model):
        q = copy.deepcopy(model)
        with torch.no_grad():
            for layer in q.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    w8, sc = kref.quantize_int8_per_channel(lin.weight)
                    lin.weight.copy_(kref.dequantize_int8(w8, sc))
        return q

    # (label, tier, config overrides, init_inference options, int8)
    cases = [("cpu", "cpu", {}, {"max_memory": "640KiB"}, False),
             ("nvme", "nvme", {}, {"max_memory": "640KiB"}, False),
             ("nvme, slots per unit size", "nvme", {"intermediate_size": 256, "num_hidden_layers": 6},
              {"max_memory": "3800KiB"}, False),
             ("cpu, int8", "cpu", {}, {"max_memory": "600KiB", "quantize": "int8"}, True),
             ("nvme, int8", "nvme", {}, {"max_memory": "600KiB", "quantize": "int8"}, True),
             ("cpu, mixtral (4 experts, top 2)", "cpu", {"num_local_experts": 4, "num_experts_per_tok": 2},
              {"max_memory": "1200KiB"}, False)]
    rc = 0
    for label, tier, overrides, options, int8 in cases:
        kind = MixtralConfig if "num_local_experts" in overrides else LlamaConfig
        cfg = kind(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2), **overrides})
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg).eval()
        want = fake_quantised(hf) if int8 else hf
        ids, mask = left_padded([12, 5, 9], cfg.vocab_size, torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = want(input_ids=ids, attention_mask=mask).logits
            ref_tokens = want.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        try:
            with tempfile.TemporaryDirectory() as folder:
                opt = dsi.init_inference(copy.deepcopy(hf), offload=tier, offload_path=folder, max_batch_size=3,
                                         max_seq_len=64, device=dev, **options)
                engine = opt._dsinfer_engine
                streamed = len(engine.decoder.streamer.order)
                ring = engine.working_set.ring
                got = opt(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
                tokens = opt.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=8,
                                      do_sample=False).cpu()
                err = (got[mask.bool()] - ref[mask.bool()]).abs().max().item()
                ok = err < 2e-4 and torch.equal(tokens, ref_tokens) and streamed >= 2
                if "unit size" in label:
                    ok = ok and bool(engine.working_set.class_slots)
                del opt, engine
        except Exception as exc:   # report and go on
            print(f"FAIL  offload {label} on {dev}: {type(exc).__name__}: {exc}", flush=True)
            rc = 1
            continue
        rc = rc or int(not ok)
        print(f"{'ok  ' if ok else 'FAIL'}  offload {label} on {dev}: max|dlogits| {err:.1e}, greedy == "
              f"{'fake-quantised ' if int8 else ''}HF {torch.equal(tokens, ref_tokens)}, {streamed} units streamed, "
              f"ring {ring}", flush=True)
    return rc


def llama_1b(dev: str = "cuda", tiny: bool = False):
    """TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 / 4 heads, intermediate 5632, vocab 32000; from_config,
    bf16) on ``dev``; ``tiny``: CPU smoke sizes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97) if tiny else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().to(dev)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def decode_ms(model, ids, new: int, dev: str, repeats: int = 2, warmup: bool = True,
              **extra) -> tuple[float, torch.Tensor]:
    """Decode ms per step = (t(new tokens) - t(1 token)) / (new - 1), best of ``repeats``, after a warm-up (and
    compile) of both shapes (``warmup=False``: none, for the CPU smoke, whose times mean nothing); and the tokens
    of the last ``new``-token run."""
    def gen(n):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, **extra)
    for n in (new, 1) if warmup else ():
        gen(n)
    times = {}
    for n in (1, new):
        best = float("inf")
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            out = gen(n)
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    return (times[new] - times[1]) / (new - 1) * 1e3, out


def decode_comparison(dev: str = "cuda", tiny: bool = False, compile_hf: bool = True, copy_gbs: float = 0.0,
                      hf=None, deadline: float = float("inf"), tuned: dict | None = None, hf_compile_row: bool = True,
                      batches: tuple[int, ...] | None = None):
    """End-to-end decode of the ~1B Llama (:func:`llama_1b`), prompt 128, 128 new tokens, batch 1 and 16: ours
    (bf16 and int8 weights) first, then HF eager and HF with a static cache (``generate`` compiles its forward
    with ``torch.compile`` for a static cache on CUDA; ``compile_hf=False`` turns that off). Returns (markdown
    rows, rc, {(impl, batch): ms}); rc 1 when a row failed. ``tiny``: CPU smoke sizes (batch 1 and 2), no compile,
    no warm-up.
    Rows that would start after ``deadline`` (time.time()) are skipped and say so. ``batches`` overrides the batch
    sizes."""
    from decode import hf_decode_bytes          # benchmarks/decode.py: the same count for the CPU benchmark

    import lightning_dsinfer as dsi
    from lightning_dsinfer.kernels import ops

    hf = hf if hf is not None else llama_1b(dev, tiny)
    vocab = hf.config.vocab_size
    prompt, new = (8, 2) if tiny else (128, 128)     # (CPU smoke: one decode step after the prompt's token)
    ours = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=prompt + new, max_batch_size=16)
    ours8 = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=prompt + new, max_batch_size=16,
                               quantize="int8")
    hf_bytes = hf_decode_bytes(hf)
    impls = [("dsinfer", ours, {}, ours._dsinfer_engine.decoder.weight_bytes_per_token),
             ("dsinfer int8", ours8, {}, ours8._dsinfer_engine.decoder.weight_bytes_per_token),
             ("HF eager", hf, {}, hf_bytes),
             ("HF static cache" + (" + torch.compile" if compile_hf and not tiny else ""), hf,
              dict(cache_implementation="static", disable_compile=not compile_hf), hf_bytes)]
    if tuned:   # the same engine with the GEMM configs of kernels/small_gemm.py's heuristic instead of the table
        impls.insert(1, ("dsinfer, heuristic GEMM configs", ours, {}, impls[0][3]))
    # the same engine with the norms and SwiGLU as their own kernels (ops.gemm_fusion(False)): the A/B of the fusion
    impls.insert(1, ("dsinfer, norm / SwiGLU not fused into GEMMs", ours, {}, impls[0][3]))
    if not hf_compile_row:
        impls = impls[:-1]
    rows, rc, ms_of = [], 0, {}
    for b in (batches or ((1, 2) if tiny else (1, 16))):
        ids = torch.randint(3, vocab, (b, prompt), generator=torch.Generator().manual_seed(b)).to(dev)
        tokens, batch_rows = {}, []
        for name, model, extra, nbytes in impls:
            if time.time() > deadline - (120 if "compile" in name else 0):   # compiling takes a minute or two
                batch_rows.append([name, str(b), "skipped (time)", "", "", ""])
                print(" | ".join(batch_rows[-1]), flush=True)
                continue
            try:
                if tuned:
                    from lightning_dsinfer.kernels import small_gemm
                    small_gemm.install_table(torch.device(dev), {} if "heuristic" in name else tuned)
                    if hasattr(model, "_dsinfer_engine"):
                        model._dsinfer_engine._decode_graphs = None   # recapture with these configs
                if hasattr(model, "_dsinfer_engine"):
                    model._dsinfer_engine._decode_graphs = None       # capture again with this row's settings
                with ops.gemm_fusion("not fused" not in name):
                    ms, tokens[name] = decode_ms(model, ids, new, dev, 1 if tiny else 2, warmup=not tiny, **extra)
                ms_of[(name, b)] = ms
                util = nbytes / (ms * 1e-3) / (copy_gbs * 1e9) if copy_gbs else float("nan")
                batch_rows.append([name, str(b), f"{ms:.2f}", f"{b * 1e3 / ms:.0f}", f"{util:.2f}", ""])
            except Exception as exc:   # report and go on
                batch_rows.append([name, str(b), "error", type(exc).__name__, str(exc)[:60], ""])
                rc = 1
            print(" | ".join(batch_rows[-1]), flush=True)
        for row in batch_rows:
            if ("HF eager", b) in ms_of and (row[0], b) in ms_of:
                row[5] = f"{ms_of[('HF eager', b)] / ms_of[(row[0], b)]:.2f}x"
        rows += batch_rows
        if b == 1 and "HF eager" in tokens and "dsinfer" in tokens and not torch.equal(tokens["HF eager"], tokens["dsinfer"]):
            print("note: batch-1 greedy tokens of dsinfer differ from HF eager (bf16 roundings)", flush=True)
    del ours, ours8
    return rows, rc, ms_of


def offload_throughput(hf, resident_ms: dict, deadline: float = float("inf"), dev: str = "cuda"):
    """Issue 5's GPU side, measured: the ~1B Llama (bf16) with device memory for a quarter of its weights.
    Ours: the pinned host tier (side-stream copies into a ring of device slots) and the disk tier (O_DIRECT reads
    into pinned staging, then the same copies). Baseline: HF + accelerate with the same device budget
    (``infer_auto_device_map`` + ``dispatch_model``: the layers that do not fit stay in CPU memory and are moved to
    the GPU by a hook at each forward). Batch 1 and 16, prompt 128, 32 new tokens. Prints decode ms per step,
    new tokens/s, bytes streamed per step over the step (GB/s) against the pinned host-to-device copy bandwidth
    (or, for the disk tier, the O_DIRECT read of its unit files), and step / max(transfer, compute), with compute
    the resident bf16 step of :func:`decode_comparison`. Returns (markdown rows, rc). ``dev="cpu"``: the CPU smoke
    (tiny model, no timing meaning, accelerate keeps everything on the CPU)."""
    import gc
    import tempfile

    import lightning_dsinfer as dsi

    hf = hf.to("cpu")
    weight_bytes = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    cuda = dev == "cuda"
    budget = weight_bytes // 4 if cuda else 640 * 1024   # CPU smoke: a budget that streams the tiny model
    host = torch.empty(256 * 2**20 if cuda else 2**20, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty_like(host, device=dev)
    h2d = host.numel() / (_bench(lambda: dst.copy_(host, non_blocking=True)) * 1e-6) / 1e9
    del host, dst
    print(f"== offload on CUDA: {weight_bytes / 2**20:.0f} MiB of bf16 weights, device budget {budget / 2**20:.0f} "
          f"MiB, pinned host-to-device copy {h2d:.1f} GB/s", flush=True)
    prompt, new = (128, 32) if cuda else (8, 4)
    rows, rc = [], 0
    root = tempfile.mkdtemp(prefix="dsinfer-offload-", dir=os.environ.get("OFFLOAD_DIR", "/tmp"))

    def row(name, b, ms, streamed, ref_gbs, what):
        compute = resident_ms.get(("dsinfer", b), float("nan"))
        ref_gbs = ref_gbs or float("nan")   # a read too small to time (CPU smoke)
        transfer = streamed / (ref_gbs * 1e9) * 1e3
        rows.append([name, str(b), f"{ms:.1f}", f"{b * 1e3 / ms:.1f}", f"{streamed / 2**20:.0f}",
                     f"{streamed / (ms * 1e-3) / 1e9:.1f}", f"{streamed / (ms * 1e-3) / 1e9 / ref_gbs:.2f} of {what}",
                     f"{ms / max(transfer, compute):.2f}" if compute == compute and transfer == transfer else "-"])
        print(" | ".join(rows[-1]), flush=True)

    for tier in ("cpu", "nvme"):
        for b in (1, 16):
            if time.time() > deadline:
                rows.append([f"dsinfer offload={tier}", str(b), "skipped (time)", "", "", "", "", ""])
                continue
            try:
                folder = os.path.join(root, tier)   # written once, reused by the second batch size
                opt = dsi.init_inference(copy.deepcopy(hf), offload=tier, offload_path=folder, device=dev,
                                         dtype=torch.bfloat16, max_memory=budget, max_batch_size=b,
                                         max_seq_len=prompt + new)
                streamer = opt._dsinfer_engine.decoder.streamer
                streamed = (sum(streamer.store.stored_bytes(u) for u in streamer.order) if tier == "nvme"
                            else sum(streamer.layouts[u].nbytes for u in streamer.order))
                ref_gbs, what = h2d, "pinned H2D"
                if tier == "nvme":
                    from offload import direct_read_bandwidth, disk_pattern
                    files = [streamer.store.path(u) for u in streamer.order]
                    pattern, _ = disk_pattern(files, repeats=1)
                    ref_gbs, what = direct_read_bandwidth(files, pattern) / 1e9, "disk O_DIRECT"
                ids = torch.randint(3, hf.config.vocab_size, (b, prompt), generator=torch.Generator().manual_seed(b))
                ms, _ = decode_ms(opt, ids.to(dev), new, dev, repeats=1)
                row(f"dsinfer offload={tier} ({opt._dsinfer_engine.working_set.ring})", b, ms, streamed, ref_gbs, what)
                del opt, streamer
            except Exception as exc:
                import traceback
                traceback.print_exc()
                rows.append([f"dsinfer offload={tier}", str(b), "error", type(exc).__name__, str(exc)[:80], "", "", ""])
                print(" | ".join(rows[-1]), flush=True)
                rc = 1
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:                   # the test extra has no accelerate (the bench extra does)
        rows.append(["HF + accelerate", "", "not installed: pip install -e '.[bench]'", "", "", "", "", ""])
        deadline = 0.0
    if time.time() < deadline:
        try:
            acc = copy.deepcopy(hf)
            device_map = infer_auto_device_map(acc, max_memory={0: budget, "cpu": 64 * 2**30} if cuda else
                                               {"cpu": 64 * 2**30},
                                               no_split_module_classes=acc._no_split_modules)
            acc = dispatch_model(acc, device_map=device_map)
            on_cpu = sum(t.numel() * t.element_size() for n, t in acc.state_dict().items()
                         if device_map.get(_owner(device_map, n)) == "cpu")
            for b in (1, 16):
                if time.time() > deadline:
                    break
                ids = torch.randint(3, hf.config.vocab_size, (b, prompt), generator=torch.Generator().manual_seed(b))
                ms, _ = decode_ms(acc, ids.to(dev), new, dev, repeats=1)
                row("HF + accelerate (CPU offload)", b, ms, on_cpu, h2d, "pinned H2D")
            del acc
        except Exception as exc:
            rows.append(["HF + accelerate", "", "error", type(exc).__name__, str(exc)[:80], "", "", ""])
            print(" | ".join(rows[-1]), flush=True)
            rc = 1
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return rows, rc


def _owner(device_map: dict, name: str) -> str:
    """The device_map entry (a module prefix) that holds parameter ``name``."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return key
    return ""


def markdown(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md")
    ap.add_argument("--skip-tests", action="store_true", help="only time the kernels")
    ap.add_argument("--test-timeout", type=int, default=300, help="seconds from the start for the kernel tests")
    ap.add_argument("--budget-s", type=float, default=0, help="skip timing rows that would start after this many "
                    "seconds (0: no limit)")
    ap.add_argument("--skip-offload-bench", action="store_true")
    ap.add_argument("--skip-kernel-table", action="store_true")
    ap.add_argument("--skip-hf-compile", action="store_true", help="no HF static cache + torch.compile row")
    ap.add_argument("--skip-offload-check", action="store_true", help="no offload parity checks on CUDA")
    ap.add_argument("--tune-budget-s", type=float, default=120,
                    help="seconds for benchmarks/tune_gemm.py's sweep before the decode rows (0: no tuning)")
    ap.add_argument("--no-compile", action="store_true", help="HF static-cache row without torch.compile")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run every benchmark case once at tiny sizes in the Triton interpreter "
                         "(checks this script, not speed)")
    args = ap.parse_args()
    if args.cpu_smoke and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules import triton
        sys.path.insert(0, str(REPO))
        from lightning_dsinfer.kernels import interpreter
        interpreter.install()
        failed = 0
        from lightning_dsinfer.generation import cuda_graphs
        from lightning_dsinfer.kernels import ops
        with ops.force_triton():   # the ops.* rows through the kernels, as on CUDA
            for kernel, shape, fn, torch_fn, _ in cases("cpu", tiny=True):
                try:
                    fn()
                    if torch_fn is not None:
                        torch_fn()
                    print(f"ok    {kernel} {shape}")
                except Exception as exc:
                    failed += 1
                    print(f"FAIL  {kernel} {shape}: {type(exc).__name__}: {exc}")
            fused = {op for op, path in ops.dispatch_counts if path == "triton"}
            if not {"add_rms_norm", "rotary_write_kv", "linear", "norm_linear"} <= fused:
                failed += 1
                print(f"FAIL  ops.* rows did not reach the kernels: {dict(ops.dispatch_counts)}")
        with ops.force_triton(), cuda_graphs.emulate():
            failed += check_decode_graphs("cpu", tiny=True)
        from tune_gemm import tune
        table, tune_rows = tune(dev="cpu")
        ok = len(table) == 12 and len(tune_rows) == 12     # 3 variants x 2 weight kinds x 2 row counts
        failed += int(not ok)
        print(f"{'ok  ' if ok else 'FAIL'}  tune: {len(table)} configs, {len(tune_rows)} rows")
        # One decode comparison, as the GPU run makes it after its tuning: every row kind (bf16, unfused norms /
        # SwiGLU, heuristic GEMM configs, int8, HF eager, HF static cache) at batch 1; the table's rows are
        # bookkeeping only (on a CPU no table is read, the interpreter takes its own tiles); the decode steps in the
        # emulated CUDA-graph step, as on CUDA.
        with ops.force_triton(), cuda_graphs.emulate():
            rows, rc, ms_of = decode_comparison("cpu", tiny=True, tuned=table, batches=(1,))
        failed += rc
        print(f"{'ok  ' if not rc else 'FAIL'}  decode comparison with a tuned table: {len(rows)} rows")
        rows, rc = offload_throughput(llama_1b("cpu", tiny=True).float(), ms_of, dev="cpu")
        failed += rc
        print(markdown(["impl", "batch", "ms", "tok/s", "MiB", "GB/s", "of ref", "step/max"], rows))
        print(f"{'ok  ' if not rc else 'FAIL'}  offload throughput: {len(rows)} rows")
        failed += check_offload("cpu")
        return 1 if failed else 0
    if not torch.cuda.is_available():
        print("gpu_check: no GPU (torch.cuda.is_available() is False); nothing to check, exiting 0.")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    t_start = time.time()
    deadline = t_start + args.budget_s if args.budget_s else float("inf")
    out = args.out if args.out is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    report = out / "gpu_check.md"
    import transformers
    import triton
    name = torch.cuda.get_device_name()
    report.write_text(f"# gpu_check\n\nDevice: {name}; torch {torch.__version__}, triton {triton.__version__}, "
                      f"transformers {transformers.__version__}.\n\n")

    def section(title, text):
        with report.open("a") as f:
            f.write(f"## {title}\n\n{text}\n\n")
        print(f"\n## {title}\n{text}\n", flush=True)

    log = out / "pytest_cuda.log"
    tests = None if args.skip_tests else start_tests(log)
    rc = 0
    print("== engine decode: CUDA graphs vs eager", flush=True)
    try:
        rc = check_decode_graphs() or rc
    except Exception as exc:   # report and go on to the kernel timings
        print(f"FAIL  graphs: {type(exc).__name__}: {exc}", flush=True)
        rc = rc or 1
    if not args.skip_offload_check:
        print("== offload on CUDA (both tiers, slots per unit size, int8)", flush=True)
        rc = check_offload() or rc
    if tests is not None:
        test_rc = wait_tests(tests, log, t_start, args.test_timeout - (time.time() - t_start))
        section("kernel tests on CUDA", f"pytest tests/kernels exit code {test_rc}: "
                + (log.read_text().strip().splitlines() or ["(no output)"])[-1])
        rc = rc or test_rc
    copy_gbs = copy_bandwidth()
    print(f"== {name}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    tuned = None
    if args.tune_budget_s:
        import json

        from tune_gemm import HEADER, tune

        from lightning_dsinfer.kernels import small_gemm
        print(f"== tuning the small-batch GEMM ({args.tune_budget_s:.0f}s)", flush=True)
        measured, tune_rows = tune(deadline=min(deadline, time.time() + args.tune_budget_s), copy_gbs=copy_gbs,
                                   log=lambda line: print(line, flush=True))
        # what this run measured over the shipped table (shapes the budget did not reach keep their shipped configs)
        tuned = {**small_gemm.tuned_table(torch.device("cuda")), **measured} or None
        if tuned:
            small_gemm.install_table(torch.device("cuda"), tuned)
            (out / small_gemm.table_path(name).name).write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
        section("small-batch GEMM configs measured on this GPU (CUDA-graph replay; written to "
                f"{small_gemm.table_path(name).name})", markdown(HEADER, tune_rows))
    print("== decode, ~1B Llama bf16, prompt 128, 128 new tokens", flush=True)
    hf_cpu = llama_1b("cpu")          # kept on the CPU, untouched by torch.compile, for the offload rows
    decode_rows, decode_rc, ms_of = decode_comparison(compile_hf=not args.no_compile, copy_gbs=copy_gbs,
                                                      hf=copy.deepcopy(hf_cpu).to("cuda"), deadline=deadline,
                                                      tuned=tuned, hf_compile_row=not args.skip_hf_compile)
    rc = rc or decode_rc
    section(f"decode, ~1B Llama bf16 (TinyLlama-1.1B shape), prompt 128, 128 new tokens; copy BW {copy_gbs:.0f} GB/s",
            markdown(["impl", "batch", "decode ms/token", "tokens/s", "bw util (of copy BW)", "vs HF eager"],
                     decode_rows))
    if not args.skip_kernel_table and time.time() < deadline:
        rows = []
        for kernel, shape, fn, torch_fn, nbytes in cases():
            try:
                graph = not kernel.startswith("ops.")
                us = _bench(fn, graph)
                gbs = nbytes / (us * 1e-6) / 1e9
                t_us = _bench(torch_fn, graph) if torch_fn is not None and torch_fn() is not None else float("nan")
                rows.append([kernel, shape, f"{us:.1f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.2f}",
                             f"{t_us:.1f}", f"{t_us / us:.2f}x" if t_us == t_us else "-"])
            except Exception as exc:  # keep timing the others; the failure is in the table
                rows.append([kernel, shape, "error", type(exc).__name__, str(exc)[:60], "", ""])
                rc = rc or 1
        section("kernels (GB/s counts the bytes each op must move: weights, KV cache, inputs, outputs; "
                "kernel rows replayed from a CUDA graph, ops.* rows launched from Python)",
                markdown(["kernel", "shape", "time (us)", "GB/s", "of copy BW", "torch (us)", "speed-up"], rows))
    if not args.skip_offload_bench and time.time() < deadline:
        off_rows, off_rc = offload_throughput(hf_cpu, ms_of, deadline)
        rc = rc or off_rc
        section("offload on CUDA, ~1B Llama bf16, device budget a quarter of the weights, prompt 128, 32 new tokens",
                markdown(["impl", "batch", "decode ms/step", "tokens/s", "MiB streamed/step", "GB/s",
                          "of reference", "step / max(transfer, compute)"], off_rows))
    print(f"\ngpu_check done in {time.time() - t_start:.0f}s, rc={rc}; report {report}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
