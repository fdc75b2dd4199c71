"""The step's attention alone, one layer: engines/step_attention.py's kernel under each launch
(`Tuning`: keys per block, warps, stages) against PyTorch's path in the fast step (the row's
cache gathered out of the slot pool into a workspace, the bias made, SDPA), at the shape of a
model's step. Picks the launch that step_attention.TUNING should hold.

  python bench/attention_bench.py --d-model 1024 --heads 8 --cache 70 --frames 2,7 \\
      --batches 256,512,1024 --out bench/results/attention_h100.json

Inputs are random (never zeros), the pool holds twice the batch's slots and the rows sit at
random slots with random ring heads and full caches, as in steady serving. Every launch's output
is checked against PyTorch's (fp16: max |x - ref| at most 2e-2, relative to outputs of order 1)
and a launch that differs is reported, not timed. Times are the median of
triton.testing.do_bench (CUDA events). `floor_ms` is the bytes the kernel must read (the rows'
cached K/V, their new K/V and queries, the positional columns) and write over --bandwidth-tbs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client.provenance import source_revision  # noqa: E402
from engines.step_attention import CacheTable, StepShape, Tuning, format_tuning, step_attention  # noqa: E402


def _inputs(B: int, T: int, C: int, d: int, H: int, dtype, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rp = -(-(C + 2 * T - 1) // 8) * 8
    shape = StepShape(frames=T, cache=C, d_model=d, n_heads=H, rel_pad=rp)
    S = 2 * B
    pool = torch.randn(1, S, C, 2 * d, generator=g).to(device, dtype)
    slots = torch.randperm(S, generator=g)[:B].to(device)
    heads = torch.randint(0, C, (B,), generator=g).to(device)
    cache_len = torch.full((B,), C, device=device)
    enc_len = torch.full((B,), T, device=device)
    qkv = torch.randn(B * T, 3 * d + H * rp, generator=g).to(device, dtype)
    new = torch.randn(B, T, 2 * d, generator=g).to(device, dtype)
    # chunked_limited as the 0.6b model's: every query frame sees the whole cache and its chunk
    chunk_ok = torch.ones(T, C + T, dtype=torch.int8, device=device)
    table = CacheTable.empty(1, device)
    table.point_at(pool)
    return dict(shape=shape, pool=pool, slots=slots, heads=heads, cache_len=cache_len, enc_len=enc_len,
                qkv=qkv, new=new, chunk_ok=chunk_ok, table=table)


def _torch_path(x):
    """PyTorch's path: the rows' caches gathered (in time order) into a workspace beside the new
    K/V, the bias (positional term plus masks) written out, SDPA. Every row here has a whole
    chunk (no padded query frame to zero)."""
    shape, B = x["shape"], x["slots"].numel()
    T, C, d, H, rp = shape.frames, shape.cache, shape.d_model, shape.n_heads, shape.rel_pad
    dk, N = d // H, C + T
    time = (torch.arange(C, device=x["slots"].device)[None, :] + x["heads"][:, None]) % C
    work = torch.empty(B, N, 2 * d, dtype=x["new"].dtype, device=x["new"].device)
    mask_bias = torch.zeros(B, 1, T, N, dtype=x["new"].dtype, device=x["new"].device)

    def run():
        work[:, :C] = x["pool"][0][x["slots"][:, None], time]
        work[:, C:] = x["new"]
        qkv = x["qkv"]
        cols = qkv.shape[1]
        bd = qkv.as_strided((B, H, T, N), (T * cols, rp, cols - 1, 1), qkv.storage_offset() + 3 * d + T - 1)
        bias = bd + mask_bias
        q = qkv[:, :d].view(B, T, H, dk).transpose(1, 2)
        k = work[:, :, :d].view(B, N, H, dk).transpose(1, 2)
        v = work[:, :, d:].view(B, N, H, dk).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(B * T, d)
    return run


def _kernel(x, tune: Tuning):
    out = torch.empty(x["slots"].numel() * x["shape"].frames, x["shape"].d_model, dtype=x["qkv"].dtype,
                      device=x["qkv"].device)

    def run():
        return step_attention(x["qkv"], x["new"], x["table"], 0, x["slots"], x["heads"], x["cache_len"],
                              x["enc_len"], x["chunk_ok"], x["shape"], out=out, tuning=tune)
    return run


def _floor_ms(B, T, C, d, H, rp, elt, tbs) -> float:
    read = B * (C * 2 * d + T * 2 * d + T * d + T * H * rp) * elt
    return 1e3 * (read + B * T * d * elt) / (tbs * 1e12)


def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn):  # the interpreter: one timed call, to check the script, not to measure
        import time
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--cache", type=int, default=70)
    ap.add_argument("--frames", default="2,7", help="new frames a step (2 at 160 ms, 7 at 560 ms)")
    ap.add_argument("--batches", default="256,512,1024")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--block-n", default="0,16,32,64", help="keys per block (0: the whole cache)")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--products", default="dot,fma", help="tensor-core products (dot), broadcast sums (fma), or both")
    ap.add_argument("--orders", default="rows,heads",
                    help="the programs' launch order (engines.step_attention.Tuning.order): rows, heads, or both")
    ap.add_argument("--fma-block-n", default="8,16,32", help="keys per block of the fma launches")
    ap.add_argument("--fma-max-frames", type=int, default=4,
                    help="fma launches only up to this many new frames (their registers hold frames x keys x head)")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.0, help="device memory TB/s, for the floor")
    ap.add_argument("--device", default="cuda", help="cpu: a check of the script under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tuning-out", default=None,
                    help="write the best launch by new frames (least summed time over the batches) as "
                         "engines.step_attention.parse_tuning reads it")
    args = ap.parse_args()
    import triton
    import triton.testing

    device = torch.device(args.device)
    bench = _timer(device)
    revision = source_revision()  # before the run: the source that runs
    dtype = getattr(torch, args.dtype)
    d, H, C = args.d_model, args.heads, args.cache
    tunes = []
    products = args.products.split(",")
    for prod in products:
        blocks = args.fma_block_n if prod == "fma" else args.block_n
        for bn, w, st, order in itertools.product(map(int, blocks.split(",")), map(int, args.warps.split(",")),
                                                  map(int, args.stages.split(",")), args.orders.split(",")):
            if bn == 0 and st > 1:
                continue  # one block: no loop to pipeline
            tunes.append(Tuning(block_n=bn, num_warps=w, num_stages=st, products=prod, order=order))
    rows = []
    for T in map(int, args.frames.split(",")):
        for B in map(int, args.batches.split(",")):
            x = _inputs(B, T, C, d, H, dtype, device, seed=B + T)
            ref_fn = _torch_path(x)
            ref = ref_fn().float()
            torch_ms = bench(ref_fn)
            floor = _floor_ms(B, T, C, d, H, x["shape"].rel_pad, torch.finfo(dtype).bits // 8, args.bandwidth_tbs)
            best = None
            for tune in tunes:
                if tune.products == "fma" and T > args.fma_max_frames:
                    continue
                fn = _kernel(x, tune)
                try:
                    got = fn().float()
                except Exception as e:  # a launch Triton cannot build (registers, shared memory)
                    rows.append(dict(frames=T, batch=B, **tune.__dict__, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                err = (got - ref).abs().max().item()
                row = dict(frames=T, batch=B, **tune.__dict__, max_err=err, torch_ms=torch_ms, floor_ms=floor)
                if not math.isfinite(err) or err > 2e-2:
                    row["error"] = f"differs from PyTorch's by {err}"
                else:
                    row["kernel_ms"] = bench(fn)
                    if best is None or row["kernel_ms"] < best["kernel_ms"]:
                        best = row
                rows.append(row)
                print(json.dumps(row), flush=True)
            if best:
                print(f"T'={T} B={B}: PyTorch's path {torch_ms:.3f} ms, floor {floor:.3f} ms, best kernel "
                      f"{best['kernel_ms']:.3f} ms (block_n={best['block_n']}, warps={best['num_warps']}, "
                      f"stages={best['num_stages']}, {best['products']}, {best['order']} first)", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"source_revision": revision,
                               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "triton": triton.__version__, "d_model": d, "heads": H, "cache": C,
                               "dtype": args.dtype, "rows": rows}, f, indent=1)
    # the launch with the least total time over the batches, for each frame count
    print("\n| new frames | block_n | warps | stages | products | order | "
          + " | ".join(f"B={b} ms" for b in args.batches.split(",")) + " | sum |")
    print("|---|---|---|---|---|---|" + "---|" * (len(args.batches.split(",")) + 1))
    chosen = {}
    for T in map(int, args.frames.split(",")):
        timed = {}
        for r in rows:
            if r["frames"] == T and "kernel_ms" in r:
                launch = (r["block_n"], r["num_warps"], r["num_stages"], r["products"], r["order"])
                timed.setdefault(launch, {})[r["batch"]] = r["kernel_ms"]
        full = {k: v for k, v in timed.items() if len(v) == len(args.batches.split(","))}
        ranked = sorted(full.items(), key=lambda kv: sum(kv[1].values()))
        if ranked:
            chosen["few" if T <= 4 else "many"] = format_tuning(Tuning(*ranked[0][0]))
        for k, v in ranked[:6]:
            print(f"| {T} | {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | "
                  + " | ".join(f"{v[int(b)]:.3f}" for b in args.batches.split(","))
                  + f" | {sum(v.values()):.3f} |")
        torch_row = {r["batch"]: r["torch_ms"] for r in rows if r["frames"] == T and "torch_ms" in r}
        print(f"| {T} | PyTorch (gather + bias + SDPA) | | | | | "
              + " | ".join(f"{torch_row.get(int(b), float('nan')):.3f}" for b in args.batches.split(",")) + " | |")
    text = ",".join(f"{k}={v}" for k, v in chosen.items())
    print(f"\nbest launch: {text}")
    if args.tuning_out:
        with open(args.tuning_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
