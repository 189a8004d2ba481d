"""Data files of the evaluation suite (prompt-attack templates)."""
