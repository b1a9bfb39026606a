"""Using a tuned model: `chat` on stdin/stdout, `serve` (an OpenAI-compatible HTTP API) and `runs` (the run
folders as a table)."""
