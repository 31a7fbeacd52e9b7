"""Synthetic verifiable task families and a tiny character-level tokenizer, all generated locally."""
