"""The competition's contract: the `id,landmarks` submission format, `solution.csv`,
the GAP metric and the tables passed between stages. pandas/numpy only; imports nothing of ours."""
