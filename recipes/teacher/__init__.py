"""The embedded teacher: an OpenAI-compatible server with R1-style traces for the embedded task."""
