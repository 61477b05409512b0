"""WAV files → the audio encoder's inputs, as transformers' Gemma 4 feature extractor makes them.

Gemma 4 reads 16 kHz mono audio as log-mel frames (architecture doc §1.4, §3.13): 20 ms windows every
10 ms with 160 zeros prepended (semicausal), a periodic Hann window, the *magnitude* of a 512-point FFT,
128 HTK mel filters over 0–8 kHz without area normalisation, log(mel + 0.001). Samples are padded to a
multiple of 128; a frame is valid iff the last sample of its 321-sample window is real; invalid frames
are zero. The encoder needs a frame count that is a multiple of 4: more masked zero frames are added,
which leaves the valid outputs unchanged.

Bad media: unreadable, empty or non-PCM WAV files and other sample rates raise ``MediaError`` (resample
to 16 kHz first); clips longer than 30 s are truncated to their first 30 s, as transformers does, and
only those samples are read from the file.
"""

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma4_onnx.errors import MediaError

SAMPLE_RATE = 16_000
MAX_SAMPLES = 480_000  # 30 s
PAD_MULTIPLE = 128
FRAME = 320
HOP = 160
FFT = 512
MEL_BINS = 128
MEL_FLOOR = 1e-3
MAX_HZ = 8000.0
FRAME_MULTIPLE = 4


@dataclass(frozen=True)
class AudioClip:
    samples: np.ndarray  # float32 in [-1, 1], at most MAX_SAMPLES
    truncated: bool  # the file was longer than MAX_SAMPLES


def read_wav(path: Path) -> AudioClip:
    """A 16 kHz PCM WAV file as float samples (channels averaged)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"audio {path} does not exist")
    try:
        with wave.open(str(path), "rb") as wav:
            rate, channels, width, frames = wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()
            if rate != SAMPLE_RATE:
                raise MediaError(f"audio {path} is sampled at {rate} Hz; Gemma 4 reads {SAMPLE_RATE} Hz: resample it "
                                 "first (e.g. ffmpeg -i in.wav -ar 16000 out.wav)")
            raw = wav.readframes(min(frames, MAX_SAMPLES))
    except MediaError:
        raise
    except (wave.Error, EOFError, OSError) as exc:
        raise MediaError(f"audio {path} is not a readable PCM WAV file ({exc})") from None
    samples = _pcm_to_float(raw, width, channels, path)
    if samples.size == 0:
        raise MediaError(f"audio {path} has no samples")
    return AudioClip(samples, frames > MAX_SAMPLES)


def _pcm_to_float(raw: bytes, width: int, channels: int, path: Path) -> np.ndarray:
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:
        values = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        values = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        ints = bytes3[:, 0].astype(np.int32) | bytes3[:, 1].astype(np.int32) << 8 | bytes3[:, 2].astype(np.int32) << 16
        values = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    elif width == 4:
        values = (np.frombuffer(raw, "<i4") / float(1 << 31)).astype(np.float32)
    else:
        raise MediaError(f"audio {path} has {8 * width}-bit samples; only 8/16/24/32-bit PCM is read")
    return values.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_filters() -> np.ndarray:
    """[257, 128] triangular HTK filters, peak 1 (no area normalisation), float64."""
    edges_mel = np.linspace(_hz_to_mel(0.0), _hz_to_mel(MAX_HZ), MEL_BINS + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = np.linspace(0, SAMPLE_RATE // 2, FFT // 2 + 1)
    offsets = edges[None, :] - bins[:, None]  # [257, 130]
    widths = np.diff(edges)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [T, 128] float32 with invalid frames zeroed, mask [T] bool) for one clip."""
    samples = np.asarray(samples, dtype=np.float32)[:MAX_SAMPLES]
    padded_length = -(-len(samples) // PAD_MULTIPLE) * PAD_MULTIPLE
    real = np.zeros(padded_length + HOP, dtype=np.int32)
    real[HOP:HOP + len(samples)] = 1
    wave_ = np.zeros(padded_length + HOP, dtype=np.float32)
    wave_[HOP:HOP + len(samples)] = samples
    count = (len(wave_) - (FRAME + 1)) // HOP + 1
    if count <= 0:
        return np.zeros((0, MEL_BINS), np.float32), np.zeros(0, bool)
    starts = np.arange(count) * HOP
    frames = wave_[starts[:, None] + np.arange(FRAME)[None, :]]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)).astype(np.float32)
    magnitude = np.abs(np.fft.rfft(frames * window, n=FFT, axis=-1))
    features = np.log(magnitude @ mel_filters() + MEL_FLOOR).astype(np.float32)
    mask = real[starts + FRAME].astype(bool)
    return features * mask[:, None], mask


@dataclass(frozen=True)
class AudioFeatures:
    features: np.ndarray  # [1, T, 128], T a multiple of 4
    mask: np.ndarray  # [1, T] bool
    soft_tokens: int  # valid audio soft tokens: the mask after two stride-2 halvings
    truncated: bool


def audio_features(path: Path) -> AudioFeatures:
    clip = read_wav(path)
    features, mask = log_mel(clip.samples)
    tokens = int(mask[::2][::2].sum())
    if tokens == 0:
        raise MediaError(f"audio {path} is too short ({len(clip.samples)} samples): it yields no audio token")
    extra = -len(mask) % FRAME_MULTIPLE
    features = np.concatenate([features, np.zeros((extra, MEL_BINS), np.float32)])
    mask = np.concatenate([mask, np.zeros(extra, bool)])
    return AudioFeatures(features[None], mask[None], tokens, clip.truncated)
