"""`glr run`: the config, the stage engine, the stages, the run-folder layout, local validation, demo, report."""
