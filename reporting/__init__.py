"""The study report: statistics, figures and the notebook template the report stage executes."""
