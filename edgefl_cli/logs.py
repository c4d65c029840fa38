"""Logging set-up and the options every long-running command shares (library modules only get loggers)."""
import argparse
import logging
import re
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


MAX_MESSAGE_CHARS = 2000  # a log line's message is cut here (the rest counted): a device's 145 KB field is no line
# control characters, line and paragraph separators, and the invisible format characters that reorder or hide
# text on a terminal (bidi overrides and isolates, zero-width characters, the BOM)
_FORMAT = "\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff"
_CONTROL = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_FORMAT}]")
_TRACEBACK_CONTROL = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_FORMAT}]")  # a traceback keeps newline and tab


def _escape(match: re.Match) -> str:
    c = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or f"\\x{ord(c):02x}"


class OneLineFormatter(logging.Formatter):
    """Each record on one line of bounded length: control characters in the message (newlines, the ESC of
    terminal sequences) are escaped and a message past :data:`MAX_MESSAGE_CHARS` is cut, so text a device sent
    (a rejected field's value, a name) can neither forge log lines nor rewrite the terminal. A traceback keeps
    its lines, each indented by two spaces with its control characters escaped: its exception's message may
    quote a device's text, and no line of it can pass for a record (records start at the first column)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, _cut(record.message))
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    """A traceback's lines, two spaces in, control characters other than newline and tab escaped, each cut at
    :data:`MAX_MESSAGE_CHARS` (an exception's message may quote a device's 100 KB field)."""
    return "\n".join("  " + _TRACEBACK_CONTROL.sub(_escape, _cut(line)) for line in text.split("\n"))


def _cut(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"


def setup_logging(level: str = "INFO") -> None:
    """stderr, one line per record (:class:`OneLineFormatter`), at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


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
