"""The batched streaming step: features, one encoder call, RNNT decoding, for many streams.

One instance serves one model at one lookahead on one device. `step` must be called from one
thread at a time (NeMo's streaming config is mutable module state); slot acquire/release are
thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import time
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from engines.api import (DEVICE_DONE, QUEUED, BadChunkError, ChunkWork, EngineError, EngineOverloadedError, ModelInfo,
                         PoolExhaustedError, ResultColumns, RowSamples, StepPlan, StepResult, StepTimings,
                         StreamStateLostError, pieces_text)
from engines.cudagraph_engine import batch_buckets
from engines.device_io import host_buffer, to_device
from engines.encoders import EncoderEngine, PoolRows
from engines.endpointing import Endpointer, event_frames
from engines.features import FeatureGraphs, StreamingFeaturizer
from engines.geometry import ChunkGeometry
from engines.models import LoadedModel
from engines.rnnt_decoder import GreedyRNNTDecoder
from engines.slot_allocator import SlotAllocator
from engines.slot_pool import SlotPool, StateSpec

log = logging.getLogger(__name__)


def geometry_of(model: LoadedModel, lookahead_ms: int, align_chunks: bool = True) -> ChunkGeometry:
    enc = model.nemo_model.encoder
    cfg = enc.streaming_cfg
    feat = model.nemo_model.preprocessor.featurizer
    chunk = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
    pre = cfg.pre_encode_cache_size[1] if isinstance(cfg.pre_encode_cache_size, list) else cfg.pre_encode_cache_size
    left_pad = feat.stft_pad_amount if feat.stft_pad_amount is not None else feat.n_fft // 2
    right_context = max(feat.n_fft - left_pad - feat.hop_length, 0)
    return ChunkGeometry(
        sample_rate=int(model.nemo_model.preprocessor._sample_rate), hop=feat.hop_length, n_fft=feat.n_fft,
        stft_left_pad=left_pad, chunk_frames=chunk, pre_encode_frames=pre,
        encoder_frames=cfg.valid_out_len, subsampling=enc.subsampling_factor, lookahead_ms=lookahead_ms,
        lead_in=right_context if align_chunks else 0)


class StreamingEngine:
    def __init__(self, model: LoadedModel, encoder: EncoderEngine, lookahead_ms: int, capacity: int,
                 max_batch: int, device: torch.device, dtype: torch.dtype, align_chunks: bool = True,
                 utterance_reset: str = "keep", ring_cache: bool = True, feature_graphs: bool = True,
                 decode_stream: bool = False):
        self.model = model
        self.encoder_engine = encoder
        # Set by engines.factory.build_engine: configured vs running engine, self-check, fallback.
        self.startup_report = None
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.max_batch = max_batch
        # engines.config.EngineConfig.utterance_reset, resolved: "keep", "decoder" or "all"
        self.utterance_reset = utterance_reset
        self.geometry = geometry_of(model, lookahead_ms, align_chunks)
        nemo = model.nemo_model
        enc = nemo.encoder
        self.eou_id = eou_token_id(model.pieces)
        self.model_info = ModelInfo(
            name=model.name, lookahead_ms=lookahead_ms, lookaheads_ms=model.lookaheads_ms,
            sample_rate=self.geometry.sample_rate, vocabulary_size=len(model.pieces),
            random_weights=model.random_weights, description=model.description,
            languages=model.languages, word_boundary=model.word_boundary,
            eou_token=model.pieces[self.eou_id] if self.eou_id is not None else "")
        self.allocator = SlotAllocator(capacity)
        self.featurizer = StreamingFeaturizer(nemo.preprocessor.featurizer, self.geometry, capacity, device)
        # On a GPU beside an encoder with batch buckets (its CUDA graphs), the features get a graph
        # per bucket too (engines/features.py FeatureGraphs); one that cannot be captured leaves
        # them eager. feature_graphs=False keeps them eager (A/B).
        buckets = getattr(encoder, "buckets", None)
        if feature_graphs and device.type == "cuda" and buckets:
            try:
                self.featurizer.graphs = FeatureGraphs(self.featurizer, tuple(buckets))
            except Exception as exc:  # noqa: BLE001 - a capture problem costs speed, not service
                log.warning("feature graphs not captured; features run eagerly",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
        self.decoder = GreedyRNNTDecoder(nemo.decoder, nemo.joint, model.blank_id,
                                         max_symbols=_max_symbols(nemo), eou_id=self.eou_id)
        # On a GPU a step's decode and commit may run on a CUDA stream of their own, of high
        # priority, so that the next step's features, gather and encoder (queued on the main
        # stream once this step's are: StepRun.next_at) run while this one decodes. The decode
        # loop waits on the host every few iterations, and the host then builds results: on one
        # stream the device idles through both. Whether that pays depends on the model, the
        # lookahead, the batch and the card, so start-up times both (engines.decode_overlap) and
        # switches with set_decode_stream; decode_stream=True makes the stream, in use from here.
        self._made_decode_stream = None
        if decode_stream and device.type == "cuda":
            self._made_decode_stream = torch.cuda.Stream(device=device,
                                                         priority=torch.cuda.Stream.priority_range()[1])
        self.decode_stream = self._made_decode_stream
        # The stage of a step (StepRun) from which the next step's device work may be queued
        # behind it (the engine worker reads it): QUEUED with a decode stream (the next encoder
        # runs beside this decode), else DEVICE_DONE (on one stream the next step would run
        # before this one's decode; on the CPU there is nothing to overlap). Either is correct
        # for two steps of different streams: the step reads only its own copies after QUEUED.
        self.next_at = QUEUED if self.decode_stream is not None else DEVICE_DONE
        self.endpointer = Endpointer(capacity, 1e3 * self.geometry.encoder_frame_seconds, device)
        n_layers, d = len(enc.layers), enc.d_model
        # An encoder engine may keep a different per-layer attention cache (e.g. projected K/V,
        # [L, 70, 2d]); it says so through `cache_channel_shape`.
        channel_shape = getattr(encoder, "cache_channel_shape", None) or (
            n_layers, enc.streaming_cfg.last_channel_cache_size, d)
        # An engine whose step only appends its new frames to the attention window says how many
        # (`cache_shift_frames`); the pool then keeps that cache as a ring and the commit writes
        # those frames only (engines/slot_pool.py). ring_cache=False writes whole windows (A/B).
        shift = int(getattr(encoder, "cache_shift_frames", 0) or 0) if ring_cache else 0
        self.ring_cache = shift > 0
        # An engine with a static attention-cache buffer that takes the ring's order (the
        # fast-cudagraph engine) gets its rows gathered straight into that buffer, unrotated.
        self.gather_into_encoder = self.ring_cache and getattr(encoder, "accepts_ring_order", False) \
            and hasattr(encoder, "cache_channel_buffer")
        # An engine that reads each row's attention cache in the pool itself (the fast-cudagraph
        # engine with its attention kernel, engines/step_attention.py) gets no gather of it at all.
        self.cache_in_place = self.ring_cache and getattr(encoder, "accepts_ring_order", False) \
            and getattr(encoder, "reads_cache_in_place", False)
        if getattr(encoder, "needs_cache_in_place", False) and not self.cache_in_place:
            raise ValueError(f"the {encoder.name} engine was built without a workspace for the attention cache "
                             f"(it reads each row's cache in the slot pool's ring): ring_cache must be on")
        specs = [
            StateSpec("cache_channel", tuple(channel_shape), 1, dtype, ring_shift=shift),
            StateSpec("cache_time", (n_layers, d, enc.conv_context_size[0]), 1, dtype),
            StateSpec("cache_len", (), 0, torch.int64),
            StateSpec("pre_encode", (self.featurizer.n_mels, self.geometry.pre_encode_frames), 0, torch.float32),
        ]
        for name, (shape, dim) in self.decoder.state_shapes().items():
            specs.append(StateSpec(name, shape, dim, dtype))
        for name, (shape, dim) in self.endpointer.state_shapes().items():
            specs.append(StateSpec(name, shape, dim, torch.float32))
        self.pool = SlotPool(specs, capacity, device)
        # host-side per-slot counters
        self.chunks_done = np.zeros(capacity, dtype=np.int64)
        self.frames_done = np.zeros(capacity, dtype=np.int64)
        self.text_started = np.zeros(capacity, dtype=bool)
        # each piece's text (its word-start marker a space), so a row's text is one join
        self._piece_text = [pieces_text([p], model.word_boundary) for p in model.pieces]
        self.finished = np.zeros(capacity, dtype=bool)
        # Benchmarks set this to attribute GPU time to phases (a device sync at each boundary);
        # profile_every does it for every Nth step while serving (EngineConfig.profile_every).
        self.sync_timings = False
        self.profile_every = 0
        self._steps_run = 0

    # -- slots ---------------------------------------------------------------------------------
    def acquire_slot(self) -> int:
        return self.allocator.acquire()

    def release_slot(self, slot: int) -> None:
        self.allocator.release(slot)

    def slots_in_use(self) -> int:
        return self.allocator.in_use()

    def executions(self) -> dict[str, int]:
        return {self.encoder_engine.name: self.encoder_engine.executions}

    # -- the step ------------------------------------------------------------------------------
    def _validate(self, plan: StepPlan) -> None:
        """Raises BadChunkError naming each bad row and why, EngineError for a plan over the
        batch limit. Read through the plan's columns as array operations (a scheduler's plan
        comes as columns: no ChunkWork per row); only bad rows are visited one by one, for their
        message. Finite samples are checked on the assembled windows, in one pass (_check_finite)."""
        ids, slots, samples = plan.stream_ids, plan.slots, plan.samples
        first, ended = np.asarray(plan.first, dtype=bool), np.asarray(plan.audio_ended, dtype=bool)
        n = len(slots)
        if isinstance(samples, RowSamples):  # one flat array (or a ring): its type is checked once, no view per row
            typed = np.full(n, bool(samples.typed))
            lengths = np.asarray(samples.lengths, dtype=np.int64)
        else:
            typed = np.fromiter((isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 1 for x in samples),
                                dtype=bool, count=n)
            lengths = np.fromiter((len(x) if t else 0 for x, t in zip(samples, typed.tolist())), dtype=np.int64,
                                  count=n)
        in_range = (slots >= 0) & (slots < self.capacity)
        allocated = np.zeros(n, dtype=bool)
        allocated[in_range] = self.allocator.used_mask(slots[in_range])
        safe = np.where(allocated, slots, 0)  # the per-slot books read at an allocated slot only
        finished = allocated & ~first & self.finished[safe]
        empty = (lengths == 0) & ~ended
        no_frames = np.zeros(n, dtype=bool)
        last = np.flatnonzero(allocated & typed & ~empty & ~finished & ended)
        if len(last):  # a last chunk that leaves nothing to decode
            g = self.geometry
            seen = np.where(first[last], g.lead_in, self.featurizer.samples_seen[safe[last]])
            k = np.where(first[last], 0, self.chunks_done[safe[last]])
            no_frames[last] = g.stft_frames_many(seen + lengths[last]) - k * g.chunk_frames <= 0
        # A slot's first row that passes every other check is the one it serves; its later rows
        # (allocated) appear twice, whatever else they hold.
        passes = allocated & typed & ~empty & ~finished & ~no_frames
        twice = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(passes)
        if len(rows) and n > 1:
            served, first_at = np.unique(slots[rows], return_index=True)  # sorted slots, their first passing row
            serving = rows[first_at]
            cand = np.flatnonzero(allocated)
            at = np.minimum(np.searchsorted(served, slots[cand]), len(served) - 1)
            has = served[at] == slots[cand]
            twice[cand[has]] = serving[at[has]] < cand[has]
        if n > self.max_batch:
            raise EngineError(f"plan has {n} chunks; max_batch is {self.max_batch}")
        bad_rows = np.flatnonzero(~(passes & ~twice))
        if len(bad_rows):
            reasons = []
            for i in bad_rows.tolist():
                if not allocated[i]:
                    why = f"slot {int(slots[i])} is not allocated (unknown stream)"
                elif twice[i]:
                    why = f"slot {int(slots[i])} appears twice in one step"
                elif not typed[i]:
                    why = "audio must be a 1-D float32 numpy array"
                elif empty[i]:
                    why = "empty chunk while the stream's audio continues"
                elif finished[i]:
                    why = "the stream has already been finalized"
                else:
                    why = "the chunk holds no audio frames (the stream is already complete)"
                reasons.append((ids[i], why))
            bad = dict(reasons)
            detail = "; ".join(f"{sid}: {why}" for sid, why in bad.items())
            raise BadChunkError(f"invalid chunks: {detail}", tuple(bad))

    @staticmethod
    def _check_finite(plan: StepPlan, windows: np.ndarray) -> None:
        """The windows hold the chunks' samples and history that passed this check before: one
        sum over the batch is finite unless a sample is not (or, rarely, the float32 sum
        overflows); only then are the rows checked one by one, to name the bad ones."""
        if np.isfinite(windows.sum()):
            return
        bad = tuple(sid for sid, x in zip(plan.stream_ids, plan.samples) if not np.isfinite(x).all())
        if bad:
            detail = "; ".join(f"{sid}: audio contains NaN or infinite samples" for sid in bad)
            raise BadChunkError(f"invalid chunks: {detail}", bad)

    def _frames_left(self, slot: int, samples: int, first: bool) -> int:
        """Frames a last chunk of `samples` samples leaves to decode."""
        g = self.geometry
        seen = g.lead_in if first else int(self.featurizer.samples_seen[slot])
        k = 0 if first else int(self.chunks_done[slot])
        return g.stft_frames(seen + samples) - k * g.chunk_frames

    def prepare(self, plan: StepPlan) -> "PreparedStep":
        """The step's host work before anything reaches the device: the plan checked, each row's
        waveform window assembled. Writes no stream's state (a fresh row's endpointing settings
        are set, idempotently), so a caller may prepare the next step while the device still
        runs this one, when the two steps hold different streams (the scheduler's steps do: a
        stream is in one submitted step at a time). Raises BadChunkError for a bad plan."""
        t0 = time.perf_counter()
        self._validate(plan)
        if not len(plan):
            return PreparedStep(plan, None, None, None, None, 0.0)
        slot_array = plan.slots
        fresh_host = plan.first
        chunk_index = np.where(fresh_host, 0, self.chunks_done[slot_array])
        slots = slot_array.tolist()
        for i in np.flatnonzero(fresh_host).tolist():  # idempotent: a retried first chunk sets the same row
            self.endpointer.configure(slots[i], plan.endpointing.get(i))
        # The windows are written straight into the host buffer the device copy reads (pinned on
        # a GPU): one pass over the batch's audio on the host, not a second into a pinned block.
        host = host_buffer((len(slots), self.featurizer.window_len), torch.float32, self.device)
        try:
            windows, audio_end, starts = self.featurizer.assemble(slots, chunk_index, plan.samples, plan.audio_ended,
                                                                  fresh_host, out=host.numpy())
        except ValueError as e:
            raise BadChunkError(str(e), tuple(plan.stream_ids)) from e
        self._check_finite(plan, windows)
        return PreparedStep(plan, chunk_index, windows, audio_end, starts, time.perf_counter() - t0, windows_host=host)

    def step(self, plan: "StepPlan | PreparedStep") -> StepResult:
        """Compute, then commit. Until the commit nothing of any stream is written, so an
        exception there leaves every slot as it was; out of device memory becomes
        EngineOverloadedError (the scheduler retries in smaller batches). A failure during the
        commit is StreamStateLostError: those streams cannot continue. `plan` may come prepared
        (`prepare`). The whole step at once; `start_step` runs it in stages."""
        run = self.start_step(plan)
        while run.advance():
            pass
        return run.result

    def start_step(self, plan: "StepPlan | PreparedStep") -> "StepRun":
        """The step as a StepRun, for a caller that interleaves two steps (the engine worker);
        `step` runs one to its end. Raises BadChunkError for a bad plan."""
        self._steps_run += 1
        sync = self.sync_timings or (self.profile_every > 0 and self._steps_run % self.profile_every == 0)
        if isinstance(plan, PreparedStep):
            prepared = dataclasses.replace(plan, ahead=True)
        else:
            prepared = self.prepare(plan)
        return StepRun(self, prepared, sync)

    def _stages(self, prepared: "PreparedStep", sync: bool):
        """The step, as a generator that yields twice (StepRun): once its device work up to the
        encoder is queued, with copies of everything the rest of the step reads (QUEUED: with a
        decode stream, the next step's device work may be queued from here on), once its decode
        has run and its commit is queued (DEVICE_DONE: the next step's device work may be queued
        from here on in any case, and this step's host part then runs while the device computes
        that one). Returns the StepResult once the commit has run on the device."""
        plan = prepared.plan
        if not len(plan):
            return StepResult(updates=(), engine=self.encoder_engine.name)
        # The plan's rows as arrays (its columns): no loop over rows here.
        slot_array = plan.slots
        slots = slot_array.tolist()
        fresh_host = plan.first
        chunk_index = prepared.chunk_index
        samples = plan.samples
        windows, audio_end, starts = prepared.windows, prepared.audio_end, prepared.starts
        wait = self.synchronize if sync else _no_wait
        # The assemble phase is the preparation, wherever it ran (in this call, or in the
        # engine worker while the previous step ran). Phases and the total are the step's own
        # work: the time spent at its yields (the caller's) is left out.
        t_assembled = time.perf_counter()
        t0 = t_assembled - prepared.seconds
        idx = to_device(slot_array, self.device, torch.long)
        # A new utterance restarts the model state the reset policy names (the waveform
        # history of the featurizer always carries on: the audio is one signal).
        reset_host = plan.new_utterance
        any_reset = bool(reset_host.any())
        if self.utterance_reset != "keep" and any_reset:
            restart_host = fresh_host | reset_host
        else:
            restart_host = fresh_host
        encoder_restart = restart_host if self.utterance_reset == "all" else fresh_host
        fresh = to_device(restart_host, self.device)
        feats = self.featurizer.compute(windows, audio_end, starts, chunk_index, host=prepared.windows_host)
        wait()
        t_feats = time.perf_counter()
        into, head, skip = None, None, ()
        if self.cache_in_place:
            head = self.pool.heads_of("cache_channel", idx)
            skip = ("cache_channel",)
        elif self.gather_into_encoder:
            into = {"cache_channel": self.encoder_engine.cache_channel_buffer(len(slots))}
            head = self.pool.heads_of("cache_channel", idx)
        state = self.pool.gather(idx, encoder_restart if encoder_restart.any() else None, into=into, skip=skip)
        if self.cache_in_place:
            state["cache_channel"] = PoolRows(self.pool.tensors["cache_channel"], idx)
        wait()
        t1 = time.perf_counter()

        x = torch.cat([state["pre_encode"], feats.new_frames], dim=-1)
        lengths = feats.valid_frames + self.geometry.pre_encode_frames
        encoded, enc_len, cc_next, ct_next, ccl_next = self.encoder_engine.step(
            x.to(self.dtype), lengths, state["cache_channel"], state["cache_time"], state["cache_len"],
            **({"cache_head": head} if head is not None else {}))
        # A full chunk yields encoder_frames outputs; a stream's short last chunk fewer.
        enc_len = torch.clamp(enc_len, max=self.geometry.encoder_frames)
        # The rest of the step reads copies, not the encoder's outputs: a graph encoder's are its
        # static buffers, which the next step's encoder overwrites once it is queued (at QUEUED
        # on a GPU with a decode stream). The copies are what the commit will write (the ring's
        # new frames, not whole windows) and the joint's projection of the frames.
        projected = self.decoder.project(encoded)
        P = self.geometry.pre_encode_frames
        staged = self.pool.stage({"cache_channel": cc_next, "cache_time": ct_next, "cache_len": ccl_next,
                                  "pre_encode": x[:, :, -P:] if P else x[:, :, :0]}, restart=encoder_restart)
        ready = self._event_behind()
        wait()
        t2 = time.perf_counter()
        yield QUEUED
        resumed = time.perf_counter()
        aside = resumed - t2

        decoding = {k: state[k] for k in ("dec_out", "dec_h", "dec_c", "ep_hist", "ep_flags") if k in state}
        with self._on_decode_stream(ready, idx, fresh, projected, enc_len, *decoding.values(), *staged.tensors()):
            dec_state = self.decoder.start_state(fresh, bool(restart_host.any()),
                                                 {k: decoding[k] for k in ("dec_out", "dec_h", "dec_c")})
            decoded = self.decoder.decode_projected(projected, enc_len, dec_state)
            endpoint = None
            events = ({}, {})
            if self.endpointer.enabled(slot_array):
                reset = to_device(reset_host, self.device) if any_reset else None
                endpoint = self.endpointer.step(slot_array, decoded.nonblank, decoded.eou, enc_len, reset,
                                                decoding["ep_hist"], decoding["ep_flags"])
                base = np.where(fresh_host, 0, self.frames_done[slot_array])
                events = event_frames(endpoint[0], base)
            enc_len_host = enc_len.cpu().numpy()
            t3 = time.perf_counter()

            # Success: commit every piece of state. Nothing above wrote any stream's state.
            try:
                self.pool.commit(idx, staged, {
                    **decoded.state,
                    **({"ep_hist": endpoint[1], "ep_flags": endpoint[2]} if endpoint is not None else {}),
                })
            except Exception as exc:
                raise _state_lost(plan, exc) from exc
            committed = self._event_behind(self.decode_stream)
        t_scattered = time.perf_counter()
        yield DEVICE_DONE
        aside += time.perf_counter() - t_scattered
        t_host = time.perf_counter()
        try:
            self.featurizer.commit(slots, samples, windows, starts, fresh_host)
            wait()
            t_committed = time.perf_counter()
            columns = self._result_columns(plan, chunk_index, audio_end, enc_len_host, decoded, events)
        except Exception as exc:
            raise _state_lost(plan, exc) from exc
        if committed is not None:
            # A later step of these streams may gather on the main stream: their state is in
            # the pool before this step's result is out.
            committed.synchronize()
        t4 = time.perf_counter()
        commit_s = (t_scattered - t3) + (t_committed - t_host)
        timings = StepTimings(features_ms=1e3 * (t1 - t0), encoder_ms=1e3 * (t2 - t1),
                              decode_ms=1e3 * (t3 - resumed), total_ms=1e3 * (t4 - t0 - aside),
                              assemble_ms=1e3 * (t_assembled - t0), gather_ms=1e3 * (t1 - t_feats),
                              commit_ms=1e3 * commit_s, results_ms=1e3 * (t4 - t_committed),
                              synced=sync, prepared_ahead=prepared.ahead)
        return StepResult.from_columns(columns, self.encoder_engine.name, timings)

    def _result_columns(self, plan: StepPlan, chunk_index: np.ndarray, audio_end: np.ndarray,
                        enc_len: np.ndarray, decoded, events: tuple[dict, dict] = ({}, {})) -> ResultColumns:
        """Advance the host counters (in bulk) and lay the step's results out as columns: token
        ids with per-row offsets, as array operations over the decode's label columns. Only the
        rows with new text are visited one by one (their text); no object per row."""
        g = self.geometry
        slot = plan.slots
        first = plan.first
        if first.any():
            self.frames_done[slot[first]] = 0
            self.text_started[slot[first]] = False
        base = self.frames_done[slot]
        k = np.asarray(chunk_index, dtype=np.int64)
        end_frames = g.stft_frames_many(audio_end)
        final = (audio_end >= 0) & ((k + 1) * g.chunk_frames >= end_frames)
        frames = base + enc_len
        self.chunks_done[slot] = k + 1
        self.frames_done[slot] = frames
        self.finished[slot] = final
        # the stream's own audio this step has consumed: a client knows its message is covered
        # once this reaches the message's end
        seconds = (self.featurizer.samples_seen[slot] - g.lead_in) / g.sample_rate
        starts, ends = events  # endpoint events as stream frames (found before the host part)
        n = len(slot)
        row_of = np.repeat(np.arange(n), decoded.label_counts)
        ids, token_frames = decoded.label_ids, decoded.label_frames
        if self.eou_id is not None:  # the end-of-utterance token is a signal for the endpointer, not text
            keep = ids != self.eou_id
            ids, token_frames, row_of = ids[keep], token_frames[keep], row_of[keep]
        token_frames = base[row_of] + token_frames
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=n), out=offsets[1:])
        id_list = ids.tolist()
        pieces, piece_text = self.model.pieces, self._piece_text
        texts = [piece_text[i] for i in id_list]
        text = [""] * n
        bounds = offsets.tolist()
        slots_list = slot.tolist()
        started = self.text_started
        for r in np.flatnonzero(np.diff(offsets)).tolist():  # the rows with tokens
            t = "".join(texts[bounds[r]:bounds[r + 1]])
            s = slots_list[r]
            if not started[s]:  # a stream's text does not start with a space
                t = t.lstrip(" ")
                started[s] = bool(t)
            text[r] = t
        return ResultColumns(stream_ids=plan.stream_ids, slots=slot.copy(), is_final=final,
                             frames_decoded=frames.astype(np.int64), audio_seconds=seconds.astype(np.float64),
                             text_delta=text, token_offsets=offsets, token_ids=ids.astype(np.int64, copy=False),
                             token_pieces=[pieces[i] for i in id_list], token_frames=token_frames.astype(np.int64),
                             starts=starts, ends=ends)

    # -- streams ---------------------------------------------------------------------------------
    def _event_behind(self, stream=None):
        """With a decode stream, an event behind the work queued so far on `stream` (the current
        stream when None); else None. The decode stream waits on such an event rather than on
        the main stream itself, whose next step may be queued by then."""
        if self.decode_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def _on_decode_stream(self, ready, *handed: torch.Tensor):
        """The decode stream as the current stream, after the main stream's work up to `ready`.
        The `handed` tensors, made on the main stream, are marked as used by the decode stream,
        so that the caching allocator gives none of their memory to the main stream before the
        decode stream's work on them has run."""
        if self.decode_stream is None:
            yield
            return
        self.decode_stream.wait_event(ready)
        for t in handed:
            if t is not None and t.is_cuda:
                t.record_stream(self.decode_stream)
        with torch.cuda.stream(self.decode_stream):
            yield

    def set_decode_stream(self, on: bool) -> None:
        """Decode on the CUDA stream made at construction (on) or on the main stream (off);
        between steps only, with none in flight. The next step is then begun at QUEUED or at
        DEVICE_DONE (next_at). On the CPU no stream is made: `on` only begins the next step at
        QUEUED, which is correct there too and orders the host work as a GPU's would (what the
        start-up's timing and the benchmark exercise on a CPU)."""
        if on and self.device.type == "cuda" and self._made_decode_stream is None:
            raise ValueError("this engine was built without a decode stream (decode_stream=False)")
        self.synchronize()
        self.decode_stream = self._made_decode_stream if on else None
        self.next_at = QUEUED if on else DEVICE_DONE

    def synchronize(self) -> None:
        """Wait for the device's queued work (a step returns before its commit has run on a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- self-check ------------------------------------------------------------------------------
    def warmup(self) -> str:
        """One step on silence through a temporary slot; proves the encoder engine executed."""
        before = self.encoder_engine.executions
        slot = self.acquire_slot()
        try:
            n = self.geometry.samples_needed(0)
            self.step(StepPlan(chunks=(ChunkWork("warmup", slot, np.zeros(n, np.float32), True, True),)))
        finally:
            self.release_slot(slot)
        if self.encoder_engine.executions <= before:
            raise EngineError(f"warm-up step did not execute the {self.encoder_engine.name} encoder engine")
        if self.device.type == "cuda":
            self.warm_batch_buckets()
        return self.encoder_engine.name

    def warm_batch_buckets(self) -> int:
        """Steps silent streams through every batch bucket (1, 2, 4, ... max_batch rows; each
        stream's first, middle and short last chunk), so the CUDA graphs a step can need (the
        decode loop's, one per bucket and frame count) are captured now and not while serving:
        a capture stalls the engine thread for tens of milliseconds, which showed as p95
        latency spikes whenever the load first reached a new batch size. Returns the steps run."""
        g = self.geometry
        n = g.samples_needed(1) + g.chunk_samples // 2  # two full chunks, then a short last one
        audio = np.zeros(n, np.float32)
        steps = 0
        for rows in batch_buckets(self.max_batch):  # the decode loop's buckets are powers of two too
            slots: list[int] = []
            try:
                while len(slots) < rows:
                    slots.append(self.acquire_slot())
            except PoolExhaustedError:  # fewer slots than rows: warm what fits
                pass
            try:
                for k in range(g.total_chunks(n)):
                    start, end = g.chunk_span(k, n, True)
                    self.step(StepPlan(chunks=tuple(
                        ChunkWork(f"warm-{i}", slot, audio[start:end], k == 0, end == n)
                        for i, slot in enumerate(slots))))
                    steps += 1
            finally:
                for slot in slots:
                    self.release_slot(slot)
            if len(slots) < rows:
                break
        return steps


    def measure_step_ms(self, rows: int, timed_steps: int = 3, give_up_ms: float | None = None) -> float:
        """The step's time as served (ms, the median of `timed_steps`) at `rows` silent streams
        in steady state, for `--max-batch auto` (engines.capacity.choose_max_batch): the first
        chunk and one middle chunk run untimed (they capture the bucket's CUDA graphs and fill the
        caches), then middle chunks are timed, each to the device's end of its work.

        Served, a step's preparation (`prepare`: the plan checked, the waveform windows
        assembled) runs while the step before it is on the device (the engine worker's
        read-ahead), so it is timed apart, and a step costs the larger of the two: the step from
        its prepared plan, or the preparation (where that is longer, the host sets the pace). At
        560 ms and 512 rows on an H100 the preparation was 7 of the whole step's 38 ms
        (bench/RESULTS.md, run 45): counted in the step, it hid that 1,024 rows carry 1.1x the
        rows per ms of 512. A timed step over `give_up_ms` ends the measurement at once (its
        time is the answer: clearly too slow, no need to pay for more). Every slot must be free:
        the engine is a probe of `rows` slots. Raises EngineOverloadedError when the device runs
        out of memory."""
        if not 1 <= rows <= min(self.capacity, self.max_batch) or timed_steps < 1:
            raise ValueError(f"cannot time {rows} rows on an engine of {self.capacity} slots, batch {self.max_batch}")
        g = self.geometry
        chunks = 2 + timed_steps
        n = g.samples_needed(chunks)  # one more chunk than run: no step is a stream's last
        audio = np.zeros(n, np.float32)
        slots = [self.acquire_slot() for _ in range(rows)]
        times: list[float] = []
        try:
            for k in range(chunks):
                start, end = g.chunk_span(k, n, False)
                plan = StepPlan(chunks=tuple(ChunkWork(f"measure-{i}", slot, audio[start:end], k == 0, False)
                                             for i, slot in enumerate(slots)))
                t_prepare = time.perf_counter()
                prepared = self.prepare(plan)
                prepare_ms = 1e3 * (time.perf_counter() - t_prepare)
                self.synchronize()
                t0 = time.perf_counter()
                self.step(prepared)
                self.synchronize()
                if k >= 2:
                    times.append(max(1e3 * (time.perf_counter() - t0), prepare_ms))
                    if give_up_ms is not None and times[-1] > give_up_ms:
                        break
        finally:
            for slot in slots:
                self.release_slot(slot)
        return float(np.median(times))


@dataclass(frozen=True)
class PreparedStep:
    """A plan checked and its waveform windows assembled (StreamingEngine.prepare): the host
    work of a step before anything reaches the device."""

    plan: StepPlan
    chunk_index: np.ndarray | None   # each row's chunk number
    windows: np.ndarray | None       # [rows, window samples]
    audio_end: np.ndarray | None     # framed samples where a finished stream ends, -1 while open
    starts: np.ndarray | None        # each window's absolute first sample
    seconds: float                   # host time the preparation took
    ahead: bool = False              # prepared before this step's own call (while another ran)
    windows_host: torch.Tensor | None = None  # the host tensor `windows` views (device_io.host_buffer)


class StepRun:
    """One step, run in stages (StreamingEngine.start_step): `advance` runs it to its next stage
    (QUEUED, DEVICE_DONE) and returns True, or runs its last part and returns False, with the
    StepResult in `result`. Between stages the caller may do other work: prepare the next step
    while this one is QUEUED, queue the next step's device work once this one has reached the
    engine's `next_at` (two steps of different streams only). Out of device memory becomes EngineOverloadedError,
    as in StreamingEngine.step."""

    def __init__(self, engine: StreamingEngine, prepared: PreparedStep, sync: bool):
        self._engine = engine
        self._rows = len(prepared.plan)
        self.synced = sync  # the device synchronized at each phase (profiling): nothing overlaps it
        self._stages = engine._stages(prepared, sync)
        self.stage: str | None = None
        self.result: StepResult | None = None
        self.finished = False
        self._queued: torch.cuda.Event | None = None  # recorded behind the work queued at QUEUED

    def advance(self) -> bool:
        if self.finished:
            return False
        try:
            self.stage = next(self._stages)
            if self.stage == QUEUED and self._engine.device.type == "cuda":
                self._queued = torch.cuda.Event()
                self._queued.record()
            return True
        except StopIteration as done:
            self.result = done.value
            self.stage = None
            self.finished = True
            return False
        except torch.cuda.OutOfMemoryError as exc:
            if self._engine.device.type == "cuda":
                torch.cuda.empty_cache()  # the failed step's blocks go back before the retry
            raise EngineOverloadedError(f"out of device memory at batch size {self._rows}: {exc}",
                                        batch_size=self._rows) from exc

    def device_busy(self) -> bool:
        """At QUEUED: whether the device is still running the work queued so far (asking does
        not wait). False on the CPU, where queued work has already run."""
        return self.stage == QUEUED and self._queued is not None and not self._queued.query()


def _no_wait() -> None:
    pass


def _state_lost(plan: StepPlan, exc: BaseException) -> StreamStateLostError:
    ids = tuple(plan.stream_ids)
    return StreamStateLostError(f"committing the step's state failed ({type(exc).__name__}: {exc}); "
                                f"the state of {len(ids)} streams is lost", ids)


EOU_PIECES = ("<EOU>", "<eou>")


def eou_token_id(pieces: list[str]) -> int | None:
    """The model's end-of-utterance token (NeMo's realtime EOU models emit "<EOU>"), if any."""
    for i, piece in enumerate(pieces):
        if piece in EOU_PIECES:
            return i
    return None


def _max_symbols(nemo_model) -> int:
    try:
        value = nemo_model.cfg.decoding.greedy.max_symbols
        return int(value) if value else 10
    except Exception:
        return 10
