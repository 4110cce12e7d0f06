"""draft_vocab.json beside the weights: written atomically, read back, malformed files named in the error."""
import json

import pytest

from layerskip import draft_vocab
from layerskip.errors import LayerSkipError


def test_write_then_read_round_trips_in_rank_order(tmp_path):
    path = draft_vocab.write(tmp_path, [7, 0, 3])
    assert path == tmp_path / draft_vocab.FILE_NAME
    assert json.loads(path.read_text()) == {"ids": [7, 0, 3]}
    assert draft_vocab.read(tmp_path) == [7, 0, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [draft_vocab.FILE_NAME]  # no temp file left


def test_write_replaces_an_old_file(tmp_path):
    draft_vocab.write(tmp_path, [1, 2, 3])
    draft_vocab.write(tmp_path, [4])
    assert draft_vocab.read(tmp_path) == [4]


def test_read_without_a_file_is_none(tmp_path):
    assert draft_vocab.read(tmp_path) is None
    assert draft_vocab.read(tmp_path / "missing") is None


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"tokens": [1]}', '{"ids": 5}', '{"ids": [1, -2]}', '{"ids": [1, 2.0]}',
    '{"ids": [true]}', '{"ids": ["3"]}',
])
def test_a_malformed_file_is_an_error_naming_it(tmp_path, text):
    (tmp_path / draft_vocab.FILE_NAME).write_text(text)
    with pytest.raises(LayerSkipError, match=draft_vocab.FILE_NAME):
        draft_vocab.read(tmp_path)
