"""The project's measurements: one file per question, each with its own command (see README.md)."""
