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
