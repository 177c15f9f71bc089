"""--network_args / network flag parsing: accepted forms and errors that name the argument."""

from __future__ import annotations

import pytest
from lora_helpers import QWEN

from tsumugi.errors import UserError
from tsumugi.networks.lora_factory import parse_network_args
from tsumugi.networks.lora_qwen_image import create_network


def test_parse_all_keys():
    args = parse_network_args(
        [
            "exclude_patterns=[r'.*(?=txt).*', '.*img_mod.*']",
            "include_patterns=['.*to_q']",
            "rank_dropout=0.1",
            "module_dropout=0",
            "loraplus_lr_ratio=8",
            "verbose=True",
        ]
    )
    assert args.exclude_patterns == [".*(?=txt).*", ".*img_mod.*"]  # '=' inside the value is kept
    assert args.include_patterns == [".*to_q"]
    assert args.rank_dropout == 0.1 and args.module_dropout is None
    assert args.loraplus_lr_ratio == 8.0 and args.verbose is True
    assert parse_network_args(None).exclude_patterns == []
    assert parse_network_args(["verbose=false"]).verbose is False


@pytest.mark.parametrize(
    ("item", "names"),
    [
        ("rank_dropout=abc", "rank_dropout"),
        ("rank_dropout=1.5", "rank_dropout"),
        ("module_dropout=-0.1", "module_dropout"),
        ("loraplus_lr_ratio=0", "loraplus_lr_ratio"),
        ("loraplus_lr_ratio=x", "loraplus_lr_ratio"),
        ("exclude_patterns=.*mod.*", "exclude_patterns"),
        ("exclude_patterns=[1, 2]", "exclude_patterns"),
        ("include_patterns=['(unclosed']", "include_patterns"),
        ("verbose=maybe", "verbose"),
        ("use_dora=True", "use_dora"),
        ("rank_dropout", "key=value"),
    ],
)
def test_parse_errors_name_the_arg(item, names):
    with pytest.raises(UserError, match=names):
        parse_network_args([item])


def test_duplicate_key():
    with pytest.raises(UserError, match="rank_dropout: given twice"):
        parse_network_args(["rank_dropout=0.1", "rank_dropout=0.2"])


def test_flag_errors():
    dit = QWEN.make_dit()
    with pytest.raises(UserError, match="--network_dropout"):
        create_network(dit, 4, 1.0, 1.0, None)
    with pytest.raises(UserError, match="--network_dim"):
        create_network(dit, 0, 1.0, None, None)
    net = create_network(dit, None, None, 0.0, ["conv_dim=4", "conv_alpha=1"])
    m = net.modules_list()[0]
    assert m.rank == 4 and float(m.alpha) == 4.0 and m.dropout is None
