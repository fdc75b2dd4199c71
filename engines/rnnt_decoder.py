"""Batched greedy RNNT decoding, each stream carrying its own prediction-network state.

Per-stream decoder state lives in the slot pool: the prediction network's output for the last
emitted label and its LSTM state after it. A step decodes only the step's new encoder frames,
so the cost per step does not grow with the stream's length, and no history is re-decoded.

The loop is the label-looping form of greedy search over the whole batch at once: every
iteration runs the joint for each row's current frame; rows that emit a label advance their
prediction network, rows that emit blank (or reach `max_symbols` labels on one frame) move to
the next frame. It yields the same labels as NeMo's greedy_batch decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeOutput:
    labels: list[list[int]]   # per row, new labels in order
    frames: list[list[int]]   # per row, the chunk-relative encoder frame of each label
    state: dict[str, torch.Tensor]  # new per-row decoder state (pred_out, h, c)


class GreedyRNNTDecoder:
    def __init__(self, decoder, joint, blank_id: int, max_symbols: int = 10):
        self.decoder = decoder
        self.joint = joint
        self.blank_id = blank_id
        self.max_symbols = max_symbols
        self.pred_hidden = decoder.pred_hidden
        self.pred_layers = decoder.pred_rnn_layers
        self.sync_every = 4

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """name -> (shape without slot dim, slot dim) for the slot pool."""
        return {
            "dec_out": ((self.pred_hidden,), 0),
            "dec_h": ((self.pred_layers, self.pred_hidden), 1),
            "dec_c": ((self.pred_layers, self.pred_hidden), 1),
        }

    def _predict(self, labels: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        g, (h2, c2) = self.decoder.predict(labels[:, None], (h, c), add_sos=False, batch_size=labels.shape[0])
        return g[:, 0, :], h2, c2

    @torch.inference_mode()
    def start_state(self, fresh: torch.Tensor, any_fresh: bool,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For rows starting a stream, the state after the start-of-sequence (blank) label."""
        if not any_fresh:
            return state
        B = fresh.shape[0]
        blank = torch.full((B,), self.blank_id, dtype=torch.long, device=fresh.device)
        zeros = torch.zeros_like(state["dec_h"])
        g0, h0, c0 = self._predict(blank, zeros, zeros.clone())
        m = fresh[:, None]
        return {
            "dec_out": torch.where(m, g0.to(state["dec_out"].dtype), state["dec_out"]),
            "dec_h": torch.where(m[None], h0.to(state["dec_h"].dtype), state["dec_h"]),
            "dec_c": torch.where(m[None], c0.to(state["dec_c"].dtype), state["dec_c"]),
        }

    @torch.inference_mode()
    def decode(self, encoded: torch.Tensor, lengths: torch.Tensor, state: dict[str, torch.Tensor]) -> DecodeOutput:
        """encoded [B, D, T] (NeMo's encoder layout), lengths [B]; state rows in batch order."""
        B, _, T = encoded.shape
        dev = encoded.device
        f = self.joint.project_encoder(encoded.transpose(1, 2))  # [B, T, H]
        g = state["dec_out"]
        h, c = state["dec_h"], state["dec_c"]
        rows = torch.arange(B, device=dev)
        t = torch.zeros(B, dtype=torch.long, device=dev)
        symbols = torch.zeros(B, dtype=torch.long, device=dev)
        emitted_labels, emitted_frames, emitted_mask = [], [], []
        active = t < lengths
        blank = torch.full_like(t, self.blank_id)
        # Testing for termination costs a device-to-host sync, so test every few iterations;
        # the iterations past the end are no-ops because every row is masked.
        while True:
            for _ in range(self.sync_every):
                ft = f[rows, t.clamp(max=T - 1)]  # [B, H]
                logits = self.joint.joint_after_projection(ft[:, None, :], self.joint.project_prednet(g)[:, None, :])
                k = logits[:, 0, 0, :].argmax(dim=-1)
                emit = active & (k != self.blank_id)
                emitted_labels.append(k)
                emitted_frames.append(t)
                emitted_mask.append(emit)
                g2, h2, c2 = self._predict(torch.where(emit, k, blank), h, c)
                m = emit[:, None]
                g = torch.where(m, g2.to(g.dtype), g)
                h = torch.where(m[None], h2.to(h.dtype), h)
                c = torch.where(m[None], c2.to(c.dtype), c)
                symbols = symbols + emit.long()
                advance = active & (~emit | (symbols >= self.max_symbols))
                t = t + advance.long()
                symbols = torch.where(advance, torch.zeros_like(symbols), symbols)
                active = t < lengths
            if not bool(active.any()):
                break
        labels: list[list[int]] = [[] for _ in range(B)]
        frames: list[list[int]] = [[] for _ in range(B)]
        if emitted_labels:
            L = torch.stack(emitted_labels, 1).cpu().tolist()
            F = torch.stack(emitted_frames, 1).cpu().tolist()
            M = torch.stack(emitted_mask, 1).cpu().tolist()
            for b in range(B):
                for lab, fr, ok in zip(L[b], F[b], M[b]):
                    if ok:
                        labels[b].append(lab)
                        frames[b].append(fr)
        return DecodeOutput(labels=labels, frames=frames, state={"dec_out": g, "dec_h": h, "dec_c": c})
