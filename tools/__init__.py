"""Command-line entry points and run tooling (simulator, reports)."""
