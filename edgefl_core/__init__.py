"""edgefl's torch-free shared core: the wire protocol, the transport seam, data and the config loader.

Both sides import it (``edge_sdk`` on devices, ``cloud_runtime`` in the cloud); it imports neither,
nor torch (``tests/test_architecture.py`` and the import-linter contracts in ``pyproject.toml``
enforce that). See ``docs/ARCHITECTURE.md``.
"""
