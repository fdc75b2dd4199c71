"""NeMo configurations of the cache-aware streaming models users serve, written from their
published model cards and architecture listings (random weights: the weights themselves cannot
be fetched here). Each builds with NeMo, saves as a `.nemo` and is what `asr-server --model
file.nemo` must load and serve (tests/gpu/test_gpu_checkpoints.py, tests/test_published_configs.py).

- `nemotron-en-0.6b`: Nemotron speech streaming en 0.6B. Cache-aware FastConformer, 24 layers,
  d_model 1024, 8 heads, feed-forward x4, no biases in the layers' linear and convolution
  modules (`use_bias: false`), depthwise-striding subsampling x8 with 256 channels, causal
  convolutions (kernel 9) with LayerNorm, attention context [[70,13],[70,6],[70,1],[70,0]]
  (1120, 560, 160, 80 ms); RNNT with a 2-layer LSTM prediction network of 640 and a joint of 640;
  1024 BPE pieces. About 0.6 B parameters.
- `fastconformer-hybrid-large-streaming`: the FastConformer hybrid large streaming family
  (`stt_*_fastconformer_hybrid_large_streaming_*`, NeMo's
  `fastconformer_hybrid_transducer_ctc_bpe_streaming` recipe): 17 layers, d_model 512, 8 heads,
  feed-forward x4, with biases, the same subsampling and context set, RNNT (1-layer LSTM of 640,
  joint 640) plus an auxiliary CTC decoder; 1024 BPE pieces. About 114 M parameters.
- `parakeet-realtime-eou-120m`: parakeet realtime EOU 120M v1: 17 layers, d_model 512, 8 heads,
  one attention context [70,1] (160 ms), RNNT (1-layer LSTM of 640, joint 640); the vocabulary is
  1024 BPE pieces followed by two control pieces, `<EOU>` (id 1024: end of utterance) and `<EOB>`
  (id 1025), blank last (1026). About 120 M parameters.

`layers=` builds the same configuration with fewer layers (CPU tests).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from engines.models import BUILTIN_TOKENIZER

EOU_PIECES = ("<EOU>", "<EOB>")
CONTEXTS = [[70, 13], [70, 6], [70, 1], [70, 0]]


@dataclass(frozen=True)
class Published:
    name: str
    model_class: str         # nemo.collections.asr.models.<model_class>
    n_layers: int
    d_model: int
    n_heads: int
    use_bias: bool
    att_context_size: list
    pred_layers: int
    hybrid: bool             # an auxiliary CTC decoder
    eou: bool                # <EOU>/<EOB> appended to the vocabulary
    lookahead_ms: int        # a lookahead the model supports (for tests)
    params_m: float          # published parameter count, millions (approximate)


PUBLISHED = {
    "nemotron-en-0.6b": Published("nemotron-en-0.6b", "EncDecRNNTBPEModel", 24, 1024, 8, False, CONTEXTS, 2,
                                  False, False, 160, 600),
    "fastconformer-hybrid-large-streaming": Published(
        "fastconformer-hybrid-large-streaming", "EncDecHybridRNNTCTCBPEModel", 17, 512, 8, True, CONTEXTS, 1,
        True, False, 560, 114),
    "parakeet-realtime-eou-120m": Published("parakeet-realtime-eou-120m", "EncDecRNNTBPEModel", 17, 512, 8, True,
                                            [70, 1], 1, False, True, 160, 120),
}


def eou_tokenizer(directory: str | os.PathLike) -> Path:
    """The builtin 1024-piece SentencePiece model with `<EOU>` and `<EOB>` appended as
    user-defined pieces (ids 1024 and 1025), written to `directory`."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((Path(BUILTIN_TOKENIZER) / "tokenizer.model").read_bytes())
    for piece in EOU_PIECES:
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
    vocab = [p.piece for p in proto.pieces]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return directory


def make_cfg(spec: Published, tokenizer_dir: str, layers: int | None = None):
    from omegaconf import OmegaConf

    d = spec.d_model
    encoder = dict(
        _target_="nemo.collections.asr.modules.ConformerEncoder", feat_in=128, feat_out=-1,
        n_layers=layers or spec.n_layers, d_model=d, subsampling="dw_striding", subsampling_factor=8,
        subsampling_conv_channels=256, causal_downsampling=True, ff_expansion_factor=4,
        self_attention_model="rel_pos", n_heads=spec.n_heads, att_context_size=spec.att_context_size,
        att_context_style="chunked_limited", att_context_probs=None, xscaling=True, untie_biases=True,
        pos_emb_max_len=5000, conv_kernel_size=9, conv_norm_type="layer_norm", conv_context_size="causal",
        use_bias=spec.use_bias, dropout=0.1, dropout_pre_encoder=0.1, dropout_emb=0.0, dropout_att=0.1)
    cfg = dict(
        sample_rate=16000,
        model_defaults=dict(enc_hidden=d, pred_hidden=640),
        tokenizer=dict(dir=str(tokenizer_dir), type="bpe"),
        preprocessor=dict(
            _target_="nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            sample_rate=16000, normalize="NA", window_size=0.025, window_stride=0.01, window="hann",
            features=128, n_fft=512, log=True, frame_splicing=1, dither=1e-5, pad_to=0, pad_value=0.0),
        encoder=encoder,
        decoder=dict(
            _target_="nemo.collections.asr.modules.RNNTDecoder", normalization_mode=None,
            random_state_sampling=False, blank_as_pad=True, vocab_size=None,
            prednet=dict(pred_hidden=640, pred_rnn_layers=spec.pred_layers, t_max=None, dropout=0.2)),
        joint=dict(
            _target_="nemo.collections.asr.modules.RNNTJoint", log_softmax=None, preserve_memory=False,
            fuse_loss_wer=True, fused_batch_size=4, num_classes=None, vocabulary=None,
            jointnet=dict(joint_hidden=640, activation="relu", dropout=0.2, encoder_hidden=d, pred_hidden=640)),
        decoding=dict(strategy="greedy_batch", greedy=dict(max_symbols=10)),
        loss=dict(loss_name="default"))
    if spec.hybrid:
        cfg["aux_ctc"] = dict(
            ctc_loss_weight=0.3,
            decoder=dict(_target_="nemo.collections.asr.modules.ConvASRDecoder", feat_in=d, num_classes=-1,
                         vocabulary=[]),
            decoding=dict(strategy="greedy"))
    return OmegaConf.create(cfg)


def build(name: str, work_dir: str | os.PathLike, layers: int | None = None, seed: int = 0):
    """The NeMo model of `name` with random weights, its joint calibrated like the builtin
    random models' (engines.models._calibrate_joint: transcripts of speech-like audio are
    non-empty and follow the audio, so exactness tests cannot pass on empty output)."""
    import torch
    import nemo.collections.asr.models as asr_models

    from engines.models import _calibrate_joint

    spec = PUBLISHED[name]
    work_dir = Path(work_dir)
    if spec.eou:
        tok = eou_tokenizer(work_dir / f"{name}-tokenizer")
    else:
        tok = work_dir / f"{name}-tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.model", "vocab.txt"):
            shutil.copy(Path(BUILTIN_TOKENIZER) / f, tok / f)
    torch.manual_seed(seed)
    model = getattr(asr_models, spec.model_class)(cfg=make_cfg(spec, str(tok), layers))
    model.eval()
    _calibrate_joint(model, seed)
    return model


def save(name: str, path: str | os.PathLike, layers: int | None = None, seed: int = 0) -> Path:
    """Build `name` and write it as a .nemo with NeMo's own save_to."""
    path = Path(path)
    model = build(name, path.parent, layers=layers, seed=seed)
    model.save_to(str(path))
    return path
