"""NeMo-Run launchers: executors, stage tasks, the pipeline experiment."""
