"""Model loading: a user's .nemo file, or a built-in architecture with seeded random weights.

Built-in models exist because no model hub is reachable from where this runs: tests and
benchmarks need the real NeMo modules at the real shapes. Their weights are random, so their
transcripts are noise; they are never a substitute for a trained .nemo.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch

from engines.config import LOOKAHEAD_TO_RIGHT_CONTEXT

log = logging.getLogger(__name__)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTIN_TOKENIZER = os.path.join(ASSETS, "builtin_bpe1024")
ATT_CONTEXTS = [[70, 13], [70, 6], [70, 1], [70, 0]]


@dataclass(frozen=True)
class BuiltinSpec:
    n_layers: int
    d_model: int
    n_heads: int
    subsampling_channels: int
    ff_expansion: int
    pred_hidden: int
    joint_hidden: int
    description: str


BUILTINS = {
    "tiny": BuiltinSpec(2, 64, 4, 64, 2, 64, 64,
                        "2-layer cache-aware FastConformer RNNT, random weights (tests, CPU)"),
    "nemotron-0.6b": BuiltinSpec(24, 1024, 8, 256, 4, 640, 640,
                                 "Nemotron speech streaming 0.6B shape, random weights (benchmarks)"),
}


@dataclass(frozen=True)
class TrainedSpec:
    folder: str          # under engines/assets/: model_config.yaml, weights.pt, tokenizer.model, vocab.txt
    languages: tuple[str, ...]
    description: str
    # engines.config.EngineConfig.utterance_reset for this model: the demo model was trained on
    # single utterances, and after a pause its encoder context (the previous utterance and the
    # silence) throws it off, so each utterance starts from a fresh state.
    utterance_reset: str = "keep"


# Built-in models with trained weights shipped in the package (train/train.py writes the folder).
TRAINED = {
    "demo": TrainedSpec("demo", ("en", "hi"),
                        "demo model: small cache-aware FastConformer hybrid RNNT/CTC trained on synthetic "
                        "eSpeak NG English and Hindi speech (train/); not for real-world audio",
                        utterance_reset="all"),
}
_TRAINED_CLASSES = ("EncDecHybridRNNTCTCBPEModel", "EncDecRNNTBPEModel")


def load_trained_builtin(name: str) -> torch.nn.Module:
    """Rebuilds a TRAINED model from its package folder: the NeMo config, the tokenizer next to
    it, and a plain state dict (float16 on disk, loaded with weights_only: no pickled code)."""
    import nemo.collections.asr.models as asr_models
    from omegaconf import OmegaConf

    folder = os.path.join(ASSETS, TRAINED[name].folder)
    weights = os.path.join(folder, "weights.pt")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"builtin:{name}: {weights} is missing (train it with train/train.py)")
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    cls_name = str(blob["target"]).rsplit(".", 1)[-1]
    if cls_name not in _TRAINED_CLASSES:
        raise ValueError(f"builtin:{name}: unexpected model class {blob['target']!r}")
    cfg = OmegaConf.load(os.path.join(folder, "model_config.yaml"))
    cfg.tokenizer.dir = folder
    model = getattr(asr_models, cls_name)(cfg=cfg)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


@dataclass
class LoadedModel:
    """A NeMo RNNT model ready for streaming at one lookahead, plus what the engine needs."""

    name: str
    nemo_model: torch.nn.Module
    pieces: list[str]        # token id -> text piece ("▁" marks a word start in BPE vocabularies)
    word_boundary: str       # piece prefix that starts a word ("▁" for BPE, "" for char models)
    blank_id: int
    random_weights: bool
    description: str
    lookaheads_ms: tuple[int, ...]
    checksum: str            # identifies the weights, for export caches
    utterance_reset: str = "keep"  # the model's own EngineConfig.utterance_reset ("auto" resolves to it)
    languages: tuple[str, ...] = ()  # BCP-47 primary languages it was trained on; () unknown (any hint taken)


def _builtin_cfg(spec: BuiltinSpec):
    from omegaconf import OmegaConf

    encoder = dict(
        _target_="nemo.collections.asr.modules.ConformerEncoder", feat_in=128, feat_out=-1,
        n_layers=spec.n_layers, d_model=spec.d_model, subsampling="dw_striding", subsampling_factor=8,
        subsampling_conv_channels=spec.subsampling_channels, causal_downsampling=True,
        ff_expansion_factor=spec.ff_expansion, self_attention_model="rel_pos", n_heads=spec.n_heads,
        att_context_size=ATT_CONTEXTS, att_context_style="chunked_limited", att_context_probs=None,
        xscaling=True, untie_biases=True, pos_emb_max_len=5000, conv_kernel_size=9,
        conv_norm_type="layer_norm", conv_context_size="causal",
        dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)
    cfg = dict(
        sample_rate=16000,
        model_defaults=dict(enc_hidden=spec.d_model, pred_hidden=spec.pred_hidden),
        tokenizer=dict(dir=BUILTIN_TOKENIZER, type="bpe"),
        preprocessor=dict(
            _target_="nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            sample_rate=16000, normalize="NA", window_size=0.025, window_stride=0.01, window="hann",
            features=128, n_fft=512, log=True, frame_splicing=1, dither=0.0, pad_to=0, pad_value=0.0),
        encoder=encoder,
        decoder=dict(
            _target_="nemo.collections.asr.modules.RNNTDecoder", normalization_mode=None,
            random_state_sampling=False, blank_as_pad=True, vocab_size=None,
            prednet=dict(pred_hidden=spec.pred_hidden, pred_rnn_layers=1, t_max=None, dropout=0.0)),
        joint=dict(
            _target_="nemo.collections.asr.modules.RNNTJoint", log_softmax=None, preserve_memory=False,
            fuse_loss_wer=False, fused_batch_size=4, num_classes=None, vocabulary=None,
            jointnet=dict(joint_hidden=spec.joint_hidden, activation="relu", dropout=0.0,
                          encoder_hidden=spec.d_model, pred_hidden=spec.pred_hidden)),
        # Random weights tend to repeat one label up to the per-frame cap; a low cap keeps
        # their transcripts closer to a real model's rate of labels per frame.
        decoding=dict(strategy="greedy_batch", greedy=dict(max_symbols=3)),
        loss=dict(loss_name="default"))
    return OmegaConf.create(cfg)


def speechlike_audio(seconds: float, seed: int, sample_rate: int = 16000):
    """Deterministic audio with speech-like structure: voiced syllables (a harmonic series on a
    gliding pitch, shaped by two formant-like resonances), fricative noise bursts and pauses.
    numpy float32 in [-1, 1]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    out = np.zeros(n, dtype=np.float64)
    t0 = 0
    while t0 < n:
        kind = rng.random()
        dur = int(rng.uniform(0.06, 0.25) * sample_rate)
        seg = np.arange(min(dur, n - t0))
        if kind < 0.6:  # voiced syllable
            f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * seg / sample_rate))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formants = rng.uniform([300, 900], [900, 2500])
            sig = np.zeros(len(seg))
            for h in range(1, 25):
                freq = h * f0
                gain = sum(1.0 / (1 + ((freq - f) / 120.0) ** 2) for f in formants) / h ** 0.5
                sig += gain * np.sin(h * phase)
        elif kind < 0.8:  # fricative
            sig = rng.standard_normal(len(seg)) * 0.3
            sig = np.diff(sig, prepend=0.0)
        else:  # pause
            sig = rng.standard_normal(len(seg)) * 0.002
        env = np.hanning(len(seg)) if len(seg) > 1 else np.ones(len(seg))
        out[t0:t0 + len(seg)] = sig * env
        t0 += len(seg)
    peak = np.max(np.abs(out)) or 1.0
    return (0.5 * out / peak).astype(np.float32)


def _calibrate_joint(model, seed: int) -> None:
    """Make random weights behave enough like a speech model for tests to mean something.

    A random encoder's output barely changes from frame to frame, so a random joint emits the
    same label everywhere, or nothing. On speech-like audio we centre and scale the joint's
    encoder projection (labels then follow the audio), strengthen the prediction network's
    projection (labels then depend on each stream's decoder state), and shift the blank bias
    so that about a third of the frames start with a label. Transcripts are gibberish but
    non-empty, and batching or state mistakes change them.
    """
    audio = torch.from_numpy(speechlike_audio(3.0, seed=seed + 1))[None]
    joint = model.joint
    with torch.inference_mode():
        feats, flen = model.preprocessor(input_signal=audio, length=torch.tensor([audio.shape[1]]))
        enc, _ = model.encoder(audio_signal=feats, length=flen)
        proj = joint.project_encoder(enc.transpose(1, 2))[0]
    mean, scale = proj.mean(0), 1.0 / proj.std(0).mean()
    with torch.no_grad():
        joint.enc.weight.mul_(scale)
        joint.enc.bias.sub_(mean).mul_(scale)
        joint.pred.weight.mul_(3.0)
        joint.pred.bias.mul_(3.0)
    with torch.inference_mode():
        g, _ = model.decoder.predict(None, None, add_sos=False, batch_size=1)
        f = joint.project_encoder(enc.transpose(1, 2))
        logits = joint.joint_after_projection(f, joint.project_prednet(g))[0, :, 0]
    final = joint.joint_net[-1]
    blank = logits.shape[-1] - 1
    margin = logits[:, :blank].max(dim=-1).values - logits[:, blank]
    with torch.no_grad():
        final.bias[blank] += torch.quantile(margin.float(), 0.66).to(final.bias.dtype)


def build_builtin(name: str, seed: int = 0):
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; choose one of {', '.join([*TRAINED, *BUILTINS])}")
    torch.manual_seed(seed)
    model = EncDecRNNTBPEModel(cfg=_builtin_cfg(BUILTINS[name]))
    model.eval()
    _calibrate_joint(model, seed)
    return model


def _weights_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(tuple(value.shape)).encode())
    return h.hexdigest()[:16]


def _vocabulary(model) -> tuple[list[str], str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "tokenizer") and hasattr(tokenizer.tokenizer, "id_to_piece"):
        sp = tokenizer.tokenizer
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())], "▁"
    if tokenizer is not None:
        return list(tokenizer.ids_to_tokens(list(range(tokenizer.vocab_size)))), "▁"
    labels = list(model.decoder.vocabulary) if hasattr(model.decoder, "vocabulary") else list(model.joint.vocabulary)
    return labels, ""


def _supported_lookaheads(encoder) -> tuple[int, ...]:
    right_to_ms = {v: k for k, v in LOOKAHEAD_TO_RIGHT_CONTEXT.items()}
    out = []
    for ctx in encoder.att_context_size_all:
        if ctx[1] in right_to_ms:
            out.append(right_to_ms[ctx[1]])
    return tuple(sorted(set(out)))


def load_model(spec: str, lookahead_ms: int, seed: int = 0) -> LoadedModel:
    """Load `builtin:<name>` or a .nemo path and set it up for streaming at `lookahead_ms`."""
    from nemo.collections.asr.models import ASRModel, EncDecRNNTModel
    from nemo.collections.asr.parts.mixins.streaming import StreamingEncoder

    utterance_reset = "keep"
    if spec.startswith("builtin:") and spec.split(":", 1)[1] in TRAINED:
        name = spec.split(":", 1)[1]
        model = load_trained_builtin(name)
        random_weights, description, languages = False, TRAINED[name].description, TRAINED[name].languages
        utterance_reset = TRAINED[name].utterance_reset
    elif spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        model = build_builtin(name, seed=seed)
        random_weights, description = True, BUILTINS[name].description
        languages = ("en", "hi")  # random weights: the languages of the demo it stands in for
    else:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist (pass builtin:tiny or a .nemo path)")
        # .nemo files are pickles: trusted input only.
        model = ASRModel.restore_from(spec, map_location="cpu")
        model.eval()
        name, random_weights = os.path.basename(spec), False
        description = f"{type(model).__name__} from {os.path.basename(spec)}"
        languages = ()  # a .nemo file does not say which languages it serves
    if not isinstance(model, EncDecRNNTModel):
        raise ValueError(f"{spec}: {type(model).__name__} is not an RNNT or hybrid RNNT/CTC model")
    if hasattr(model, "cur_decoder") and model.cur_decoder != "rnnt":
        model.change_decoding_strategy(decoder_type="rnnt")
    encoder = model.encoder
    if not isinstance(encoder, StreamingEncoder) or getattr(encoder, "att_context_style", "") != "chunked_limited":
        raise ValueError(f"{spec}: the encoder is not a cache-aware (chunked_limited) streaming encoder")
    preproc = model.preprocessor.featurizer
    if preproc.normalize not in (None, "NA", "None"):
        raise ValueError(f"{spec}: feature normalization {preproc.normalize!r} cannot be computed incrementally")
    lookaheads = _supported_lookaheads(encoder)
    if lookahead_ms not in lookaheads:
        raise ValueError(f"{spec}: lookahead {lookahead_ms} ms not supported; this model has {lookaheads}")
    right = LOOKAHEAD_TO_RIGHT_CONTEXT[lookahead_ms]
    ctx = next(c for c in encoder.att_context_size_all if c[1] == right)
    encoder.set_default_att_context_size(list(ctx))
    pieces, boundary = _vocabulary(model)
    return LoadedModel(
        name=spec, nemo_model=model, pieces=pieces, word_boundary=boundary,
        blank_id=model.decoder.blank_idx, random_weights=random_weights, description=description,
        lookaheads_ms=lookaheads, checksum=_weights_checksum(model), languages=languages,
        utterance_reset=utterance_reset)
