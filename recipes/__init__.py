"""NeMo Reasoning Recipes: curate, distill, reinforce, evaluate, export and launch reasoning LLMs."""

__version__ = "0.1.0"
