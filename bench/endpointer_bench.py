"""The endpointer's step on the CPU (engines/endpointing.py): milliseconds per step, event extraction
included, at a few batch sizes and frames per step. Its cost is mostly op launches, so the CPU
figure tracks the host time the step adds on a GPU too.

    python -m bench.endpointer_bench
"""
import time, numpy as np, torch
from engines.endpointing import Endpointer, event_frames
from engines.api import EndpointingParams
torch.set_num_threads(1)
for B, T in [(1,2),(64,2),(256,2),(256,7)]:
    e = Endpointer(1024, 80.0, torch.device("cpu"))
    for s in range(B): e.configure(s, EndpointingParams(stop_history_ms=320))
    slots = np.arange(B)
    nb = torch.rand(B, T); valid = torch.full((B,), T); hist = torch.rand(B, e.history_frames); flags = torch.zeros(B, 2)
    for _ in range(20): ev, h, f = e.step(slots, nb, None, valid, None, hist, flags); event_frames(ev, np.zeros(B, dtype=np.int64))
    t = time.perf_counter(); n = 200
    for _ in range(n): ev, h, f = e.step(slots, nb, None, valid, None, hist, flags); event_frames(ev, np.zeros(B, dtype=np.int64))
    print(B, T, f"{1e3*(time.perf_counter()-t)/n:.3f} ms")
