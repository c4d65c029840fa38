"""The command-line entry points, in one place: ``edge-agent``, ``cloud-runtime``, ``edgefl-sim``,
``device-profile``. Only these configure logging; the libraries below them only get loggers."""
