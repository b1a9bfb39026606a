"""Ship a tuned model: fold the tuning into the base (`merge`), write it as transformers safetensors or GGUF
(`gguf`), and check that what was written computes what the tuned model computes (`verify`)."""
