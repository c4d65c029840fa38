"""Logging set-up and the options every long-running command shares (library modules only get loggers)."""
import argparse
import logging
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, [], a flag's False)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or (isinstance(default, list) and not default):
            return action.help
        return super()._get_help_string(action)


def add_config_options(parser: argparse.ArgumentParser, example: str, default_level: str = "INFO") -> None:
    """``--set KEY=VALUE`` (repeatable config overrides; ``example`` shows one) and ``--log-level``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, dotted key: --set {example}; repeatable")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default_level,
                        help="what is logged on stderr")
