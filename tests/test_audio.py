"""Audio: log-mel features against transformers' Gemma 4 feature extractor, WAV reading and bad files,
``audio_encoder.onnx`` against the reference (with the padding rules)."""

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.errors import MediaError
from gemma4_onnx.runtime.audio_features import MAX_SAMPLES, SAMPLE_RATE, audio_features, log_mel, read_wav
from gemma4_onnx.runtime.multimodal import MultimodalModel

VARIANTS = ["tiny-e2b", pytest.param("tiny-e4b", marks=pytest.mark.slow)]  # same tower config


def noise(samples: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(samples) * 0.2).clip(-1, 1).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


@pytest.mark.parametrize("samples", [400, 16_000, 16_123, 2 * MAX_SAMPLES])
def test_log_mel_matches_transformers(samples: int) -> None:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    clip = noise(samples)
    expected = Gemma4AudioFeatureExtractor()([clip], return_tensors="np")
    features, mask = log_mel(clip)
    np.testing.assert_array_equal(mask, expected["input_features_mask"][0])
    np.testing.assert_allclose(features, expected["input_features"][0], rtol=0, atol=1e-5)


def test_wav_reading(tmp_path: Path) -> None:
    clip = noise(8000)
    mono = read_wav(write_wav(tmp_path / "mono.wav", clip))
    np.testing.assert_allclose(mono.samples, clip, atol=1 / 16384)
    stereo = read_wav(write_wav(tmp_path / "stereo.wav", np.repeat(clip, 2), channels=2))
    np.testing.assert_allclose(stereo.samples, mono.samples, atol=1e-7)
    features = audio_features(tmp_path / "mono.wav")
    assert features.features.shape[1] % 4 == 0 and features.mask.shape == features.features.shape[:2]
    assert features.soft_tokens == int(features.mask[0, ::2][::2].sum()) and not features.truncated


def _ten_hour_header(path: Path) -> Path:
    """A WAV whose header claims 10 hours of 16 kHz audio, followed by 40 s of real samples."""
    data = (noise(40 * SAMPLE_RATE) * 32767).astype("<i2").tobytes()
    claimed = 10 * 3600 * SAMPLE_RATE * 2
    header = b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16) + b"data" + struct.pack("<I", claimed)
    path.write_bytes(header + data)
    return path


def test_long_audio_is_truncated_to_30_seconds(tmp_path: Path) -> None:
    features = audio_features(_ten_hour_header(tmp_path / "long.wav"))
    assert features.truncated
    assert features.mask.sum() == (MAX_SAMPLES + 160 - 321) // 160 + 1  # 2999 valid frames: 30 s
    assert features.soft_tokens == 750


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b""), "not a readable PCM WAV"),
    (lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk"), "not a readable PCM WAV"),
    (lambda p: write_wav(p, noise(4410), rate=44_100), "44100 Hz"),
    (lambda p: write_wav(p, noise(0)), "has no samples"),
    (lambda p: write_wav(p, noise(100)), "too short"),
], ids=["zero-byte", "corrupt", "44.1kHz", "empty", "too-short"])
def test_bad_audio_is_refused(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(MediaError, match=message):
        audio_features(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_audio_soft_tokens_match_transformers(variant: str, exported) -> None:
    """Two clip lengths; the runtime's frames (padded to a multiple of 4, plus 8 more masked frames) give
    the reference's valid soft tokens."""
    from gemma4_onnx.exporter.checkpoint import Checkpoint
    from gemma4_onnx.exporter.multimodal_reference import audio_soft_tokens
    from gemma4_onnx.exporter.reference import load_reference_model

    checkpoint, package = exported(variant)
    model = MultimodalModel(package)
    reference = load_reference_model(Checkpoint.open(checkpoint))
    for samples in (4_000, 24_321):
        features, mask = log_mel(noise(samples, seed=samples))
        expected = audio_soft_tokens(reference, features[None], mask[None])
        extra = -len(mask) % 4 + 8
        padded = np.concatenate([features, np.zeros((extra, 128), np.float32)])[None]
        padded_mask = np.concatenate([mask, np.zeros(extra, bool)])[None]
        soft, valid = model.session("audio_encoder").run(None, {"input_features": padded,
                                                                "input_features_mask": padded_mask})
        actual = soft[0][valid[0]]
        assert actual.shape == expected.shape
        assert float(np.abs(expected - actual).max() / np.abs(expected).max()) <= tolerances.SOFT_TOKEN_FP32_RELATIVE
