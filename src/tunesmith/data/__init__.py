"""Data: read sources into splits, check them, tokenize, collate."""
