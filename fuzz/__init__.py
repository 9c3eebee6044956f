"""Coverage-guided fuzzing of the protocol core (see fuzz/README.md)."""
