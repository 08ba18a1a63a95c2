"""NeMo Curator pipelines that build long chain-of-thought corpora."""
