"""Models: find and load base models and tokenizers, packaged samples, structure helpers."""
