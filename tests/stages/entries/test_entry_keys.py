"""Store keys of the shipped configs, pinned to literal values.

A refactor must leave every features, scores and heads key byte-identical (a changed key
orphans every entry already in users' stores); these values were computed before the
issue-18 refactor. Change them only together with a deliberate key version bump.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from stages.entries import config_scores_key, expected_heads_key, train_requests

CONFIGS = Path(__file__).resolve().parents[3] / "configs"

TINY = {
    "llama/train": "679714c76441d8d5188b638c4d16716906b7562a40453d7bf2dff663a54fa25a",
    "llama/dev": "e1d70a89365e036a1d28b907d488256ae87d8b092da1f0d59dd202c1292cc8ea",
    "llama/test": "919aef37d4e8479cddb350296878967927ec5c38001cb958caee6e0978b5fc33",
    "bert/train": "280a983e2221bbe98797339c045bc1a947b2168cc79c95436131aab0e04bcc67",
    "bert/dev": "b403233eee48249e938100c9283c1431fa415d04ffbdb82c3af063ff064fdcc8",
    "bert/test": "2380ae90fe6f95d945e1acae104d1ef6b0278575ace3e3e19ebe9a6e96865517",
    "roberta/train": "1020da6cc43d39219a7240fba331276ed3f121d3d758d3c1c88d56f3cc03a7a3",
    "roberta/dev": "e34ebadb76b94c3e34d5a09e4c6bcea611f6a2042f36f8aef9d2aad27e3f6317",
    "roberta/test": "d19e82c857c6c380067993618dc531962f26853b088601ad9e9f158b1dcc7627",
    "t5/train": "030e8b7261eb990114e4aeb5db8af93a5a15a8292537fa0f3798c9692b7b6623",
    "t5/dev": "31c9a8bb201f2ecb3dc78f2d6949d758a0edd498c167257d1bc8d19e7d5ab082",
    "t5/test": "c652cd3fff3e331b93f16d514bc1df6f8ae8460e97c1c16c299eb59eb8562351",
    "scores": "78070cb8718b659ef584c8ad777a7e2772cf2ad09fdc5e3f312fdf32a1d6bd34",
    "heads": "bd26609fe117293377bee3f43ee7f26a9098b3e51b6e04f9f474ad2203fa0144",
}

DEFAULT = {
    "llama/train": "71519501acc62bc5f38f4e772f201de8d365c44d7942690f52409157c8333767",
    "llama/dev": "01dac0cb35372f4e7e2ad3e73837ed21f5f5321b7e5c34da5b2ce1bc7d481fe2",
    "llama/test": "e43b2251acb8e4794bbd46287bdcd7918c5de637cc0dd1f11b709a2a3814c177",
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
    "scores": "6813d1db4c979837a0a411eb155c187764f51c807c62bff9ba432ab5b4a300c7",
    "heads": "814f6c0ceea1c2148a7bc308324622bb584fbf942ac129e180a30850ef9ad5c8",
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
