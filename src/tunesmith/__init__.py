"""tunesmith: fine-tune pretrained transformers from one YAML file."""

__version__ = "0.1.0"
