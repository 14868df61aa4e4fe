"""Store keys of the shipped configs, pinned to literal values.

A refactor must leave every features, scores and heads key byte-identical (a changed key
orphans every entry already in users' stores); these values were computed on main's code
before the issue-18 refactor (after main's deliberate first=after_sink key change for sink
entries). Change them only together with a deliberate change of what a key covers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from stages.entries import config_scores_key, expected_heads_key, train_requests

CONFIGS = Path(__file__).resolve().parents[3] / "configs"

TINY = {
    "llama/train": "57cb7dffc61db1f4694ab42c2d489a79067547c55357fa87575c255955bcb544",
    "llama/dev": "679d23f8096958226e6866f7e5a11cae69505236da315272a83f57621582b026",
    "llama/test": "bf5ffec99c777c4d7c44e2b6f4945b5221d4432e0248b867a2aa3d4500091b0e",
    "bert/train": "280a983e2221bbe98797339c045bc1a947b2168cc79c95436131aab0e04bcc67",
    "bert/dev": "b403233eee48249e938100c9283c1431fa415d04ffbdb82c3af063ff064fdcc8",
    "bert/test": "2380ae90fe6f95d945e1acae104d1ef6b0278575ace3e3e19ebe9a6e96865517",
    "roberta/train": "1020da6cc43d39219a7240fba331276ed3f121d3d758d3c1c88d56f3cc03a7a3",
    "roberta/dev": "e34ebadb76b94c3e34d5a09e4c6bcea611f6a2042f36f8aef9d2aad27e3f6317",
    "roberta/test": "d19e82c857c6c380067993618dc531962f26853b088601ad9e9f158b1dcc7627",
    "t5/train": "030e8b7261eb990114e4aeb5db8af93a5a15a8292537fa0f3798c9692b7b6623",
    "t5/dev": "31c9a8bb201f2ecb3dc78f2d6949d758a0edd498c167257d1bc8d19e7d5ab082",
    "t5/test": "c652cd3fff3e331b93f16d514bc1df6f8ae8460e97c1c16c299eb59eb8562351",
    "scores": "d0ab9ed2d5ee8d782bfc874ffd2677eaad2c885b85f212603a7db19bf9071465",
    "heads": "1f5944aba496756ceaef9263b18657f93321156b9d3bf7f314bf00c20321565f",
}

DEFAULT = {
    "llama/train": "b95382cdf80f0b613db3c14c2fe030778ad26b6db4386dee41123175623f18a0",
    "llama/dev": "69613e1e73bfd28caf2e56428ec59927867e4e2359b382c364bdebc153f9cce4",
    "llama/test": "b391531661fc61657f87df3cf018df183e9a31eb76f8aa9d4268d222cdc82fdf",
    "bert/train": "7b7df86757133d7ffb92a94bd65afd0d1ebd3ae99f992b17cc38ce560d1e4a3e",
    "bert/dev": "15146f9fb78aba3d224445eb187a048328642ed24b2131ab404830c18e799002",
    "bert/test": "2f26e63e14423ae8e0120ca8635004d9bf726ef44a019e08e1060cf0d9480619",
    "mpnet/train": "7b2802a0343493552a299b41fdb02e2608b2ac6700a16b7f71695a20eb1d1de6",
    "mpnet/dev": "4c6ebaeb92b55f8e743e91631281af7acc3a5d0008f97cddc9eea3a7b555a84f",
    "mpnet/test": "124b4df8b675623a8b94e69eaa4979c2339d6fe09ea1a5a58d2057dafc30b642",
    "roberta/train": "1b2fe889737e0d0f32c3fcb90c2714d78ada2b5eead74dc1338d65e990142cf1",
    "roberta/dev": "0b0e64572a3b2a0d968eeceeb2dae2dbabd30ac879e5016ee3e2030d010584cb",
    "roberta/test": "873e40284f34acc3d60feda7d49c51f6dd05dccb0e1ef8436905bc8daa6f85e1",
    "t5/train": "8cf33eb83864c8e9ec2446aa3268992588c2f38928ece2342e077b777e868dda",
    "t5/dev": "1fb21a9841cdcc799b593a10f17374ab2655ccda80450985f9631e7854e4bf20",
    "t5/test": "56ead05e2036e5711a642080fa4c331acf81b8bddf14b1b91421bbc6f1c49fcd",
    "scores": "b5a09d3f6b370096c0d9b68044bc5912c70fcb1608a605e429432494be620692",
    "heads": "9c6f603cf0abfb442769d5078d0ca7f56a3e0e9ff630a26b369bbdda40cd96c1",
}


def config_keys(path: Path) -> dict[str, str]:
    """Every key ``make extract``/``score``/``train`` would write for the config at ``path``."""
    cfg = load_config(path)
    requests = train_requests(cfg)
    keys = {f"{r.model.name}/{r.split.name}": r.key for r in requests}
    keys["scores"] = config_scores_key(cfg, requests)
    keys["heads"] = expected_heads_key(cfg)
    return keys


@pytest.mark.parametrize(("name", "expected"), [("tiny.toml", TINY), ("default.toml", DEFAULT)], ids=["tiny", "default"])
def test_shipped_config_keys_are_pinned(name, expected):
    assert config_keys(CONFIGS / name) == expected
