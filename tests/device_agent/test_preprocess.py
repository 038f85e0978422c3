"""Text tokenization on the device: the vocabulary's own unknown and padding tokens, BERT-style or RoBERTa-style."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.preprocess import TextTokenizer


def _word_level_tokenizer(path, vocab: dict[str, int], unk: str):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(("unk", "pad"), [("[UNK]", "[PAD]"), ("<unk>", "<pad>")])
def test_unknown_and_padding_tokens_come_from_the_vocabulary(tmp_path, unk: str, pad: str):
    vocab = {"<s>": 0, pad: 1, "</s>": 2, unk: 3, "hello": 4, "world": 5}
    tokenizer = TextTokenizer(_word_level_tokenizer(tmp_path / "tokenizer.json", vocab, unk), 6, pad_to_max_length=True)
    assert tokenizer.unknown_id == 3
    encoded = tokenizer.encode(["hello zebra world"])
    np.testing.assert_array_equal(encoded["input_ids"], [[4, 3, 5, 1, 1, 1]])  # padded with the vocabulary's pad id, not 0
    np.testing.assert_array_equal(encoded["attention_mask"], [[1, 1, 1, 0, 0, 0]])


def test_a_file_that_is_not_a_tokenizer_is_a_user_error(tmp_path):
    from device_agent.errors import UserError

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a tokenizers JSON file"):
        TextTokenizer(tmp_path / "tokenizer.json", 8)


# --------------------------------------------------------------------------- spectral features of windows


def test_a_pure_sines_energy_falls_in_its_band():
    from device_agent.preprocess import spectral_features

    steps, bands = 64, 4  # 32 frequency bins past DC, 8 per band: band 2 holds cycles 17-24
    sine = np.sin(2 * np.pi * 20 * np.arange(steps) / steps)
    features = spectral_features(sine.reshape(1, 1, steps), bands)
    assert features.shape == (1, 5 + bands) and features.dtype == np.float32
    energy = np.expm1(features[0, 5:])
    assert energy.argmax() == 2
    np.testing.assert_allclose(energy[[0, 1, 3]], 0.0, atol=1e-4)
    np.testing.assert_allclose(energy[2], steps / 4, rtol=1e-5)  # |X_20|^2 / steps = (steps / 2)^2 / steps


def test_statistics_of_a_known_window_channel_by_channel():
    from device_agent.preprocess import spectral_features

    windows = np.array([[[1, 2, 3, 4], [0, 0, 0, 4]]], np.float32)
    features = spectral_features(windows, bands=1).reshape(2, 6)  # per channel: mean, std, RMS, skewness, kurtosis, band
    # centred [-1.5, -0.5, 0.5, 1.5]: variance 1.25, fourth moment 2.5625; spectrum past DC |X|^2 / 4 = 2 and 1
    np.testing.assert_allclose(features[0], [2.5, np.sqrt(1.25), np.sqrt(7.5), 0.0, 2.5625 / 1.5625 - 3, np.log1p(3.0)],
                               rtol=1e-5, atol=1e-6)
    # centred [-1, -1, -1, 3]: variance 3, third moment 6, fourth 21
    np.testing.assert_allclose(features[1, :5], [1.0, np.sqrt(3.0), 2.0, 6 / 3 ** 1.5, 21 / 9 - 3], rtol=1e-5)


def test_a_constant_channel_has_zero_skewness_kurtosis_and_band_energy():
    from device_agent.preprocess import spectral_features

    windows = np.stack([np.full((1, 16), 7.25), np.linspace(-1, 1, 16)[None]], axis=1).astype(np.float32)  # [1, 2, 16]
    constant, ramp = spectral_features(windows, bands=2).reshape(2, 7)
    np.testing.assert_allclose(constant, [7.25, 0.0, 7.25, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    assert ramp[1] > 0 and ramp[4] < 0 and np.all(np.isfinite(ramp))  # a ramp is flat-topped: negative excess kurtosis


@pytest.mark.parametrize("series, fragment", [
    (np.zeros((2, 16), np.float32), "windows must be [batch, channels, steps]; got [2, 16]"),
    (np.zeros((1, 2, 3, 16), np.float32), "got [1, 2, 3, 16]"),
    (np.where(np.arange(16) == 3, np.nan, 0.0).reshape(1, 1, 16), "NaN or infinite"),
    (np.where(np.arange(16) == 3, -np.inf, 0.0).reshape(1, 1, 16), "NaN or infinite"),
])
def test_bad_windows_are_user_errors(series, fragment: str):
    from device_agent.errors import UserError
    from device_agent.preprocess import spectral_features

    with pytest.raises(UserError) as raised:
        spectral_features(series, bands=2)
    assert fragment in str(raised.value)


def test_non_finite_float_inputs_are_refused_before_the_model():
    import numpy as np

    from device_agent.input_contract import check_feeds
    from device_agent.protocol import ProtocolError
    from tests.support.bundles import tiny_manifest

    feeds = {"x": np.array([[0.0, 1.0, np.nan, 2.0]], dtype=np.float32)}
    with pytest.raises(ProtocolError, match=r"input 'x' holds nan at \[0, 2\]; this model takes finite numbers"):
        check_feeds(tiny_manifest(), feeds, {})
