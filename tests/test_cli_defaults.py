"""The command line leaves size, CFG, steps and guidance scale to the flow and the objective unless given."""
import pytest

from rectifid_core.cli import build_parser

REQUIRED = ["--flow", "f", "--subject", "face=a.jpg", "--prompt", "p"]


def test_auto_is_the_default_and_numbers_pass_through():
    parser = build_parser()
    args = parser.parse_args(REQUIRED)
    assert (args.width, args.height, args.cfg, args.scale, args.steps) == (None, None, None, None, None)
    args = parser.parse_args(REQUIRED + ["--width", "768", "--height", "AUTO", "--cfg", "4.5", "--scale", "auto",
                                         "--steps", "8"])
    assert (args.width, args.height, args.cfg, args.scale, args.steps) == (768, None, 4.5, None, 8)


def test_a_value_that_is_neither_auto_nor_a_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(REQUIRED + ["--steps", "eight"])
    assert exit_info.value.code == 2
    assert "expected 'auto' or an integer, got 'eight'" in capsys.readouterr().err


def test_memory_takes_the_modes_and_partial_with_a_step_count(capsys):
    parser = build_parser()
    assert parser.parse_args(REQUIRED).memory == "auto"
    for value in ("partial", "partial:2", "recompute_vae"):
        assert parser.parse_args(REQUIRED + ["--memory", value]).memory == value
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(REQUIRED + ["--memory", "partial:0"])
    assert exit_info.value.code == 2
    assert "unknown memory mode 'partial:0'" in capsys.readouterr().err
