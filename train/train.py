"""Trains the demo model with NeMo's own training code: data, tokenizer, model, export.

Steps (each skipped when its output exists, unless --force):
1. synthesize eSpeak NG speech into data.dir (train/synth_data.py) if its manifests are missing;
2. train a SentencePiece BPE tokenizer on the training texts (Latin + Devanagari);
3. build an EncDecHybridRNNTCTCBPEModel (cache-aware streaming FastConformer encoder,
   multi-lookahead training through att_context_probs) and fit it with a Lightning Trainer;
4. write <out>/demo.nemo and the compact package engines' `builtin:demo` loads
   (<out>/demo/: model_config.yaml, tokenizer.model, vocab.txt, weights.pt in float16);
5. decode the held-out set offline at every lookahead and print WER per language.

Seeded (seed in the config): the same config on the same machine gives the same model, except
with a time budget (`budget_s`, below), which picks max_steps from the measured step time; the
chosen number is printed so the run can be repeated exactly with trainer.max_steps=N budget_s=0.

Usage:
  python train/train.py --config train/config.yaml --out runs/demo [--override extra.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

log = logging.getLogger("train")


def load_config(path: str, overrides: list[str], extra: list[str]):
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(path)
    for o in overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(o))
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra))
    return cfg


def ensure_data(cfg, force: bool) -> str:
    data_dir = os.path.abspath(cfg.data.dir)
    have = all(os.path.isfile(os.path.join(data_dir, f)) for f in ("train_manifest.json", "test_manifest.json"))
    if have and not force:
        log.info("data: using %s", data_dir)
        return data_dir
    if not cfg.data.synthesize:
        raise FileNotFoundError(f"no manifests in {data_dir} and data.synthesize is false")
    import synth_data
    t0 = time.time()
    texts = []
    if cfg.data.get("open_vocab"):
        # open-vocabulary sentences (train/open_text.py), written next to the audio
        # (data.texts: a file written beforehand, for hosts without wordfreq)
        texts_path = cfg.data.get("texts") or os.path.join(data_dir, "open_text.jsonl")
        if not os.path.isfile(texts_path):
            import open_text
            open_text.main(["--out", texts_path, "--train-per-lang", str(cfg.data.train_per_lang),
                            "--dev-per-lang", str(cfg.data.test_per_lang), "--seed", str(cfg.seed)])
        texts = ["--texts", texts_path]
    synth_data.main(["--out", data_dir, "--train-per-lang", str(cfg.data.train_per_lang),
                     "--test-per-lang", str(cfg.data.test_per_lang), "--seed", str(cfg.seed),
                     "--augment", str(cfg.data.augment),
                     "--workers", str(cfg.data.workers or os.cpu_count() or 1)] + texts)
    log.info("data: synthesized in %.0f s", time.time() - t0)
    return data_dir


def make_val_manifest(data_dir: str, per_lang: int, out_dir: str) -> str:
    rows, count = [], {}
    with open(os.path.join(data_dir, "test_manifest.json"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if count.get(row["lang"], 0) < per_lang:
                count[row["lang"]] = count.get(row["lang"], 0) + 1
                row["audio_filepath"] = os.path.join(data_dir, row["audio_filepath"])
                rows.append(row)
    path = os.path.join(out_dir, "val_manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def train_tokenizer(cfg, data_dir: str, out_dir: str) -> str:
    import sentencepiece as spm
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=os.path.join(data_dir, "train_text.txt"), model_prefix=os.path.join(tok_dir, "tokenizer"),
        vocab_size=int(cfg.tokenizer.vocab_size), model_type="bpe",
        character_coverage=float(cfg.tokenizer.character_coverage), bos_id=-1, eos_id=-1, unk_id=0,
        num_threads=1, shuffle_input_sentence=False, seed_sentencepiece_size=1000000,
        input_sentence_size=0, minloglevel=2, normalization_rule_name="identity")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    with open(os.path.join(tok_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(sp.id_to_piece(i) + "\n")
    os.remove(os.path.join(tok_dir, "tokenizer.vocab"))
    log.info("tokenizer: %d pieces in %s", sp.get_piece_size(), tok_dir)
    return tok_dir


class BudgetCallback:
    """Fits training into `budget_s` seconds: after `probe` steps it measures the step time and
    lowers max_steps (trainer and LR schedule together) so the cosine schedule ends on time."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch.callbacks import Callback

        class _Budget(Callback):
            def __init__(self, budget_s: float, probe: int = 40):
                self.budget_s, self.probe = budget_s, max(int(probe), 4)
                self.start_step = self.probe // 4
                self.t_start = None
                self.t_probe0 = None
                self.chosen = None

            def on_train_start(self, trainer, pl_module):
                self.t_start = time.time()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step = trainer.global_step
                if step == self.start_step:
                    self.t_probe0 = time.time()
                if step == self.probe and self.chosen is None and self.t_probe0 is not None:
                    per_step = (time.time() - self.t_probe0) / (self.probe - self.start_step)
                    # leave 8% for validation and the last steps' stragglers
                    left = self.budget_s * 0.92 - (time.time() - self.t_start)
                    n = int(min(trainer.max_steps, self.probe + max(left, 0) / per_step))
                    self.chosen = n
                    trainer.fit_loop.epoch_loop.max_steps = n
                    for cfg in trainer.lr_scheduler_configs:
                        sched = cfg.scheduler
                        if hasattr(sched, "max_steps"):
                            sched.max_steps = n
                    print(f"[budget] {per_step * 1000:.0f} ms/step -> max_steps={n}", flush=True)

        return _Budget(*args, **kwargs)


def progress_callback(every: int):
    """Prints the training loss, learning rate and validation WER (the run has no logger)."""
    from lightning.pytorch.callbacks import Callback

    class _Progress(Callback):
        def __init__(self):
            self.t0 = time.time()
            self.t_end = None       # when the previous step ended
            self.wait = 0.0         # seconds between steps: waiting for the data loader
            self.t_window = time.time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.t_end is not None:
                self.wait += time.time() - self.t_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 and isinstance(outputs, dict) and "loss" in outputs:
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                now = time.time()
                window = max(now - self.t_window, 1e-9)
                print(f"[train] step {step} loss {float(outputs['loss']):.3f} lr {lr:.2e} "
                      f"{now - self.t0:.0f}s data-wait {100 * self.wait / window:.0f}%", flush=True)
                self.wait, self.t_window = 0.0, now
            self.t_end = time.time()

        def on_validation_end(self, trainer, pl_module):
            m = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            print(f"[val] step {trainer.global_step} {m}", flush=True)

    return _Progress()


def profile_callback(first: int, count: int):
    """Profiles `count` training steps from step `first` and prints where their time went
    (--profile): the numbers that say whether the loss, the model or the data loader is slow."""
    from lightning.pytorch.callbacks import Callback
    import torch

    class _Profile(Callback):
        def __init__(self):
            self.prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == first and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.prof is not None and trainer.global_step == first + count:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                print(f"[profile] steps {first}..{first + count}", flush=True)
                print(self.prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60),
                      flush=True)
                self.prof = False

    return _Profile()


def build_trainer(cfg, callbacks):
    import lightning.pytorch as pl
    from omegaconf import OmegaConf
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    return pl.Trainer(callbacks=callbacks, **tcfg)


def choose_loss(model, impl: str, trainer) -> None:
    """'numba' (NeMo's kernel), 'scan' (train/rnnt_loss.py) or 'auto': NeMo's on CUDA when it
    runs there and agrees with the reference, the scan loss otherwise (and always on CPU, where
    it is the faster one)."""
    import torch
    from rnnt_loss import numba_loss_works, use_scan_loss
    on_cuda = trainer.accelerator.__class__.__name__.lower().startswith("cuda")
    if impl == "auto":
        if on_cuda:
            ok, why = numba_loss_works(model, torch.device("cuda"))
            impl = "numba" if ok else "scan"
            log.info("loss: NeMo's Numba RNNT loss on CUDA: %s", why)
        else:
            impl = "scan"
    if impl == "scan":
        use_scan_loss(model)
    else:
        # NeMo would hand a half-precision joint to the Numba kernel where it deems fp16
        # supported; bf16 is not, and the joint of this small model is cheap in float32.
        model.loss._force_float32 = True
    log.info("loss: RNNT loss implementation %s", impl)


def warm_start(model, package: str, tok_dir: str) -> None:
    """Starts from an earlier model package of the same architecture whose tokenizer may differ:
    every tensor that does not depend on the vocabulary is copied; the rows of the three that do
    (prediction-network embedding, joint output, CTC output) are copied for the pieces both
    tokenizers share and for the blank (the last row), the rest keep their fresh initialization."""
    import torch
    blob = torch.load(os.path.join(package, "weights.pt"), map_location="cpu", weights_only=True)
    old = blob["state_dict"]
    with open(os.path.join(package, "vocab.txt"), encoding="utf-8") as f:
        old_pieces = [line.rstrip("\n") for line in f]
    with open(os.path.join(tok_dir, "vocab.txt"), encoding="utf-8") as f:
        new_pieces = [line.rstrip("\n") for line in f]
    old_index = {p: i for i, p in enumerate(old_pieces)}
    rows = [(i, old_index[p]) for i, p in enumerate(new_pieces) if p in old_index]
    rows.append((len(new_pieces), len(old_pieces)))  # blank
    state = model.state_dict()
    copied = mapped = 0
    for k, v in state.items():
        if k not in old:
            continue
        w = old[k].to(v.dtype)
        if w.shape == v.shape and (w.dim() == 0 or w.shape[0] != len(old_pieces) + 1):
            state[k] = w
            copied += 1
        elif w.dim() >= 1 and w.shape[0] == len(old_pieces) + 1 and v.shape[0] == len(new_pieces) + 1 \
                and w.shape[1:] == v.shape[1:]:
            fresh = v.clone()
            for i, j in rows:
                fresh[i] = w[j]
            state[k] = fresh
            mapped += 1
    model.load_state_dict(state, strict=True)
    log.info("warm start from %s: %d tensors copied, %d vocabulary tensors mapped (%d of %d pieces shared)",
             package, copied, mapped, len(rows) - 1, len(new_pieces))


def snapshot_callback(model_dir_fn):
    """Exports the compact package after every validation, so a run cut short by its time limit
    still leaves its latest weights behind (--snapshot-to)."""
    from lightning.pytorch.callbacks import Callback

    class _Snapshot(Callback):
        def on_validation_end(self, trainer, pl_module):
            try:
                path = model_dir_fn(pl_module)
                print(f"[snapshot] step {trainer.global_step} -> {path}", flush=True)
            except Exception as e:  # a snapshot must never stop training
                print(f"[snapshot] failed: {e}", flush=True)

    return _Snapshot()


def export_compact(model, out_dir: str, tok_dir: str) -> str:
    """The package `engines.models` rebuilds `builtin:demo` from: no pickles, float16 weights."""
    import torch
    from omegaconf import OmegaConf
    dst = os.path.join(out_dir, "demo")
    os.makedirs(dst, exist_ok=True)
    cfg = OmegaConf.create(OmegaConf.to_container(model.cfg, resolve=True))
    for key in ("train_ds", "validation_ds", "test_ds"):
        cfg.pop(key, None)
    cfg.tokenizer.dir = "."  # the loader points it at the package folder
    cfg.preprocessor.dither = 0.0
    # inference never computes the loss; this one is constructible everywhere (no Numba needed)
    cfg.loss = {"loss_name": "pytorch"}
    with open(os.path.join(dst, "model_config.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# target: {type(model).__module__}.{type(model).__name__}\n")
        f.write(OmegaConf.to_yaml(cfg))
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    torch.save({"target": f"{type(model).__module__}.{type(model).__name__}", "state_dict": state},
               os.path.join(dst, "weights.pt"))
    for name in ("tokenizer.model", "vocab.txt"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(dst, name))
    return dst


def offline_wer(model, data_dir: str, max_per_lang: int | None = None) -> dict:
    """Offline (whole-utterance) greedy RNNT decoding at every lookahead of the model."""
    import torch
    import soundfile as sf
    from wer import wer_by_lang
    rows = []
    with open(os.path.join(data_dir, "test_manifest.json"), encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
    if max_per_lang:
        seen = {}
        rows = [r for r in rows if seen.setdefault(r["lang"], []).append(1) or len(seen[r["lang"]]) <= max_per_lang]
    model.eval()
    dev = next(model.parameters()).device
    results = {}
    for ctx in model.encoder.att_context_size_all:
        model.encoder.set_default_att_context_size(list(ctx))
        hyps = []
        for i in range(0, len(rows), 32):
            batch = rows[i:i + 32]
            audio = [sf.read(os.path.join(data_dir, r["audio_filepath"]), dtype="float32")[0] for r in batch]
            n = max(len(a) for a in audio)
            x = torch.zeros(len(audio), n)
            for j, a in enumerate(audio):
                x[j, :len(a)] = torch.from_numpy(a)
            lens = torch.tensor([len(a) for a in audio])
            with torch.inference_mode():
                feats, flen = model.preprocessor(input_signal=x.to(dev), length=lens.to(dev))
                enc, elen = model.encoder(audio_signal=feats, length=flen)
                hyp = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=elen)
            hyps += [h.text for h in hyp]
        lookahead = (ctx[1] + 1) * 80  # right context in 80 ms encoder frames, plus the frame itself
        results[lookahead] = wer_by_lang([r["text"] for r in rows], hyps, [r["lang"] for r in rows])
    model.encoder.set_default_att_context_size(list(model.encoder.att_context_size_all[0]))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    ap.add_argument("--override", action="append", default=[], help="YAML merged over the config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--force-data", action="store_true", help="resynthesize even if manifests exist")
    ap.add_argument("--budget-s", type=float, default=None, help="training time budget (overrides budget_s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--init-from", default=None,
                    help="a model package folder (weights.pt, tokenizer.model, vocab.txt) from an earlier run of "
                         "the same config: training continues from its weights with its tokenizer")
    ap.add_argument("--warm-start", default=None,
                    help="a model package folder of the same architecture (e.g. engines/assets/demo): start from its "
                         "weights with this run's own tokenizer (vocabulary rows mapped by piece)")
    ap.add_argument("--snapshot-to", default=None,
                    help="export the compact package into this folder after every validation")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which the run must have exported its package: the training budget "
                         "shrinks to fit (a device call's wall-clock limit)")
    ap.add_argument("--deadline-reserve-s", type=float, default=45.0,
                    help="seconds kept before --deadline for the last validation and the export")
    ap.add_argument("--no-eval", action="store_true",
                    help="skip the offline evaluation at the end (evaluate.py does it later, through the engine)")
    ap.add_argument("--no-nemo", action="store_true", help="write only the compact package, not demo.nemo")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N training steps from step 60 and print the table")
    ap.add_argument("extra", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import numpy as np
    if not hasattr(np, "row_stack"):  # removed in NumPy 2.x; the GPU host's Numba CUDA loss path calls it
        np.row_stack = np.vstack
    import torch
    import lightning.pytorch as pl
    from omegaconf import OmegaConf, open_dict
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel

    if args.threads:
        torch.set_num_threads(args.threads)
    # float32 training on a GPU: TF32 tensor cores for matmuls (the model is small and the
    # step bound by Python, so full precision costs little; no autocast casts per step)
    torch.set_float32_matmul_precision("high")
    cfg = load_config(args.config, args.override, args.extra)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)

    t0 = time.time()
    data_dir = ensure_data(cfg, args.force_data)
    if args.init_from:
        tok_dir = os.path.join(out_dir, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        for name in ("tokenizer.model", "vocab.txt"):
            shutil.copy(os.path.join(args.init_from, name), os.path.join(tok_dir, name))
    else:
        tok_dir = train_tokenizer(cfg, data_dir, out_dir)
    val_manifest = make_val_manifest(data_dir, int(cfg.data.val_per_lang), out_dir)
    with open_dict(cfg):
        cfg.model.train_ds.manifest_filepath = os.path.join(data_dir, "train_manifest.json")
        cfg.model.validation_ds.manifest_filepath = val_manifest
        cfg.model.tokenizer.dir = tok_dir
    OmegaConf.save(cfg, os.path.join(out_dir, "config_resolved.yaml"))

    budget = args.budget_s if args.budget_s is not None else float(cfg.get("budget_s", 0) or 0)
    if args.deadline:
        # a device call has a hard wall-clock limit: whatever synthesis took, leave time to export
        left = args.deadline - time.time() - args.deadline_reserve_s
        budget = min(budget, left) if budget > 0 else left
        log.info("deadline: %.0f s left for training", left)
        if left < 30:
            raise SystemExit(f"only {left:.0f} s left before the deadline: not training")
    callbacks = [progress_callback(int(cfg.trainer.log_every_n_steps))]
    if args.profile:
        callbacks.append(profile_callback(60, args.profile))  # after the budget probe
    if budget > 0:
        callbacks.append(BudgetCallback(budget, int(cfg.get("budget_probe_steps", 40))))
    if args.snapshot_to:
        def _snap(m):
            was_training = m.training
            path = export_compact(m, args.snapshot_to, tok_dir)
            m.train(was_training)
            return path
        callbacks.append(snapshot_callback(_snap))
    trainer = build_trainer(cfg, callbacks)
    from nemo.collections.asr.losses import rnnt as nemo_rnnt
    if str(cfg.get("loss_impl", "auto")) == "scan" or not nemo_rnnt.NUMBA_RNNT_AVAILABLE:
        # NeMo's default (Numba) loss cannot even be constructed without Numba: build the model
        # with the always-available pure-PyTorch loss, which choose_loss() then replaces.
        log.info("loss: Numba RNNT loss %s", "available" if nemo_rnnt.NUMBA_RNNT_AVAILABLE else "NOT available")
        with open_dict(cfg):
            cfg.model.loss.loss_name = "pytorch"
            cfg.loss_impl = "scan"
    model = EncDecHybridRNNTCTCBPEModel(cfg=cfg.model, trainer=trainer)
    if args.init_from:
        blob = torch.load(os.path.join(args.init_from, "weights.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v)
                               for k, v in blob["state_dict"].items()}, strict=True)
        log.info("init: weights from %s", args.init_from)
    elif args.warm_start:
        warm_start(model, args.warm_start, tok_dir)
    choose_loss(model, str(cfg.get("loss_impl", "auto")), trainer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters", n_params / 1e6)
    t1 = time.time()
    trainer.fit(model)
    t2 = time.time()
    if trainer.global_step % int(cfg.trainer.val_check_interval or 1) != 0:
        trainer.validate(model, verbose=False)  # the final weights' validation WER, for the summary
    log.info("trained %d steps in %.0f s (data+tokenizer %.0f s)", trainer.global_step, t2 - t1, t1 - t0)

    model.eval()
    model = model.float()
    compact = export_compact(model, out_dir, tok_dir)
    log.info("wrote %s", compact)
    if args.snapshot_to:
        log.info("wrote %s", export_compact(model, args.snapshot_to, tok_dir))
    nemo_path = os.path.join(out_dir, "demo.nemo")
    if not args.no_nemo:
        try:
            model.save_to(nemo_path)
            log.info("wrote %s", nemo_path)
        except Exception as e:  # the compact package above is what ships
            log.error("saving %s failed: %s", nemo_path, e)
    results = {}
    if not args.no_eval:
        try:
            results = offline_wer(model, data_dir)
        except Exception as e:
            log.exception("offline evaluation failed")
            results = {"error": f"{type(e).__name__}: {e}"}
    val = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    summary = {"steps": trainer.global_step, "last_val": val, "train_seconds": round(t2 - t1, 1), "params": n_params,
               "offline_wer": results}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
