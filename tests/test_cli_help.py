"""``--help`` of the long-running commands documents ``--set`` and ``--log-level`` with its default."""
import argparse

import pytest

from edgefl_cli.agent import main as agent_main
from edgefl_cli.logs import add_config_options
from edgefl_cli.runtime import main as runtime_main
from edgefl_cli.sim import main as sim_main


@pytest.mark.parametrize("main, argv, example", [
    (runtime_main, ["serve", "--help"], "--set server.epochs=2"),
    (agent_main, ["--help"], "--set upload.max_bytes_per_s=500000"),
    (sim_main, ["--help"], "--set server.epochs=2"),
])
def test_help_documents_set_and_log_level(capsys, main, argv, example):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "override a config value, dotted key" in text and example in text and "repeatable" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text and "(default: INFO)" in text
    assert "(default: [])" not in text and "(default: None)" not in text


def test_sim_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        sim_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/latest)" in text and "(default: mqtt)" in text


def test_log_level_takes_either_case_and_refuses_others(capsys):
    parser = argparse.ArgumentParser()
    add_config_options(parser, "a.b=1")
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args([]).log_level == "INFO" and parser.parse_args([]).overrides == []
    assert parser.parse_args(["--set", "a=1", "--set", "b=2"]).overrides == ["a=1", "b=2"]
    with pytest.raises(SystemExit) as exit_:
        sim_main(["--config", "x.yaml", "--log-level", "verbose"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_names_every_subcommand(capsys):
    """A README walk-through found ``device-profile compare`` and ``edge-agent program list`` missing from
    ``--help``: a user reading the help alone could not find them."""
    from edgefl_cli.profile import main as profile_main
    for main, wanted in ((profile_main, "device-profile compare"), (agent_main, "edge-agent program list")):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        assert wanted in " ".join(capsys.readouterr().out.split())
