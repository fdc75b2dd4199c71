"""Word error rate of a served model per language at every lookahead, three ways:

- server:  streaming through a real gRPC server on loopback (server.service.app.AsrServer), many streams
           at once, audio sent as PCM16 WAV bytes in 100 ms messages, unpaced;
- engine:  streaming through engines.factory.build_engine + StreamingEngine.step directly, the
           streams batched in lockstep (every step carries each open stream's next chunk);
- offline: NeMo's own whole-utterance forward and greedy RNNT decoding of the same weights at the
           same attention context (what streaming should reproduce).

Usage:
  python train/evaluate.py --manifest data/demo/test_manifest.json            # builtin:demo
  python train/evaluate.py --examples examples/ --paths server,offline --lookaheads 160
Prints a table and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from wer import normalize, wer_by_lang  # noqa: E402

LOOKAHEADS = (1120, 560, 160, 80)
HELDOUT_VARIANT = "f3"  # train/synth_data.py's voice variant that speaks only in the test set


# -- data ---------------------------------------------------------------------------------------
def read_items(manifest: str | None, examples: str | None, limit_per_lang: int | None) -> list[dict]:
    """[{path, text, lang}] from a NeMo manifest or an examples folder (examples/manifest.json)."""
    if examples:
        manifest = os.path.join(examples, "manifest.json")
    base = os.path.dirname(os.path.abspath(manifest))
    items, count = [], {}
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            lang = row.get("lang", "?")
            if limit_per_lang and count.get(lang, 0) >= limit_per_lang:
                continue
            count[lang] = count.get(lang, 0) + 1
            path = row["audio_filepath"]
            items.append({"path": path if os.path.isabs(path) else os.path.join(base, path),
                          "text": row["text"], "lang": lang, "voice": row.get("voice", ""),
                          "build": row.get("build", "")})
    return items


def read_audio(path: str) -> np.ndarray:
    import soundfile as sf
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != 16000:
        raise ValueError(f"{path}: {sr} Hz; the evaluation reads 16 kHz files")
    return x.mean(axis=1).astype(np.float32)


# -- streaming through the engine ---------------------------------------------------------------
def engine_transcripts(engine, audios: list[np.ndarray], max_batch: int) -> list[str]:
    """Streams in lockstep: every step takes the next chunk of up to max_batch open streams."""
    from engines.api import ChunkWork, StepPlan
    g = engine.geometry
    texts = [""] * len(audios)
    pending = list(range(len(audios)))
    while pending:
        group, pending = pending[:max_batch], pending[max_batch:]
        slots = {i: engine.acquire_slot() for i in group}
        k = {i: 0 for i in group}
        open_ = set(group)
        try:
            while open_:
                work = []
                for i in sorted(open_):
                    x = audios[i]
                    span = g.chunk_span(k[i], x.size, True)
                    if span is None:
                        open_.discard(i)
                        continue
                    s, e = span
                    work.append(ChunkWork(f"s{i}", slots[i], x[s:e], first=k[i] == 0, audio_ended=e == x.size))
                if not work:
                    break
                for u in engine.step(StepPlan(tuple(work))).updates:
                    i = int(u.stream_id[1:])
                    texts[i] += u.text_delta
                    k[i] += 1
                    if u.is_final:
                        open_.discard(i)
        finally:
            for s in slots.values():
                engine.release_slot(s)
    return texts


# -- streaming through a real server ------------------------------------------------------------
class LoopbackServer:
    """An AsrServer on 127.0.0.1 (any free port) in its own event-loop thread."""

    def __init__(self, engine):
        from server.service.app import AsrServer, ServerSettings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=None)
        self.server = AsrServer(engine, settings)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=120)
        self.target = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def server_transcripts(target: str, paths: list[str], concurrency: int) -> list[str]:
    from client.sdk import AsrClient
    with AsrClient(target, timeout=600) as client:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda p: client.transcribe_file(p, chunk_ms=100.0).transcript, paths))


# -- offline ------------------------------------------------------------------------------------
def offline_transcripts(nemo_model, audios: list[np.ndarray], batch: int = 16) -> list[str]:
    import torch
    dev = next(nemo_model.parameters()).device
    dtype = next(nemo_model.encoder.parameters()).dtype
    out = []
    for i in range(0, len(audios), batch):
        group = audios[i:i + batch]
        n = max(len(a) for a in group)
        x = torch.zeros(len(group), n)
        for j, a in enumerate(group):
            x[j, :len(a)] = torch.from_numpy(a)
        lens = torch.tensor([len(a) for a in group])
        with torch.inference_mode():
            feats, flen = nemo_model.preprocessor(input_signal=x.to(dev), length=lens.to(dev))
            enc, elen = nemo_model.encoder(audio_signal=feats.to(dtype), length=flen)
            hyps = nemo_model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=elen)
        out += [h.text for h in hyps]
    return out


# -- driver -------------------------------------------------------------------------------------
def evaluate(model: str, items: list[dict], lookaheads, paths, concurrency: int = 16, device: str = "cpu",
             verbose: bool = False) -> dict:
    from engines.config import EngineConfig
    from engines.factory import build_engine
    refs = [it["text"] for it in items]
    langs = [it["lang"] for it in items]
    audios = [read_audio(it["path"]) for it in items]
    results: dict = {"model": model, "utterances": {l: langs.count(l) for l in sorted(set(langs))},
                     "audio_seconds": round(sum(a.size for a in audios) / 16000, 1), "wer": {}}
    for la in lookaheads:
        engine = build_engine(EngineConfig(model=model, engine="eager", device=device, lookahead_ms=la,
                                           max_streams=max(concurrency, 1) * 2, max_batch=max(concurrency, 1)))
        row, hyps_by_path = {}, {}
        for path in paths:
            t0 = time.time()
            if path == "server":
                with LoopbackServer(engine) as srv:
                    hyps = server_transcripts(srv.target, [it["path"] for it in items], concurrency)
            elif path == "engine":
                hyps = engine_transcripts(engine, audios, concurrency)
            elif path == "offline":
                hyps = offline_transcripts(engine.model.nemo_model, audios)
            else:
                raise ValueError(f"unknown path {path!r}")
            hyps_by_path[path] = hyps
            row[path] = wer_by_lang(refs, hyps, langs)
            # the voice variant training never heard (synth_data.HELDOUT_VARIANT), per language
            unheard = [i for i, it in enumerate(items) if it["voice"].endswith("+" + HELDOUT_VARIANT)]
            if unheard:
                row[path]["unheard_voice"] = wer_by_lang([refs[i] for i in unheard], [hyps[i] for i in unheard],
                                                         [langs[i] for i in unheard])
                row[path]["unheard_voice"]["utterances"] = len(unheard)
            # the unseen set (train/render_unseen.py): per eSpeak NG build
            for build in sorted({it["build"] for it in items if it["build"]}):
                idx = [i for i, it in enumerate(items) if it["build"] == build]
                row[path][f"build_{build}"] = wer_by_lang([refs[i] for i in idx], [hyps[i] for i in idx],
                                                          [langs[i] for i in idx])
            row[path]["seconds"] = round(time.time() - t0, 1)
            if verbose:
                for it, h in zip(items, hyps):
                    if normalize(h) != normalize(it["text"]):
                        print(f"  [{la} {path}] {os.path.basename(it['path'])}: ref={it['text']!r} hyp={h!r}")
        if "offline" in hyps_by_path:
            for path, hyps in hyps_by_path.items():
                if path != "offline":
                    same = sum(normalize(a) == normalize(b) for a, b in zip(hyps, hyps_by_path["offline"]))
                    row[path]["same_as_offline"] = round(same / max(len(hyps), 1), 4)
        results["wer"][la] = row
        print(f"lookahead {la} ms: " + "; ".join(f"{p} {v}" for p, v in row.items()), flush=True)
    return results


def print_table(results: dict) -> None:
    langs = sorted(results["utterances"])
    print(f"\nWER, {results['model']}, {results['utterances']} utterances, {results['audio_seconds']} s of audio")
    head = f"{'lookahead':>10} {'path':>8} " + " ".join(f"{l:>7}" for l in langs) + f" {'=offline':>9}"
    print(head)
    for la, row in results["wer"].items():
        for path, v in row.items():
            same = v.get("same_as_offline")
            print(f"{la:>8}ms {path:>8} " + " ".join(f"{100 * v[l]:6.2f}%" for l in langs)
                  + (f" {100 * same:8.1f}%" if same is not None else f" {'':>9}"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:demo")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="NeMo manifest with audio_filepath, text, lang")
    src.add_argument("--examples", help="a folder with manifest.json (examples/)")
    ap.add_argument("--lookaheads", default=",".join(map(str, LOOKAHEADS)))
    ap.add_argument("--paths", default="server,engine,offline")
    ap.add_argument("--limit-per-lang", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true", help="print every wrong transcript")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    import torch
    torch.set_num_threads(args.threads)
    items = read_items(args.manifest, args.examples, args.limit_per_lang)
    results = evaluate(args.model, items, [int(x) for x in args.lookaheads.split(",")],
                       args.paths.split(","), args.concurrency, args.device, args.verbose)
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
