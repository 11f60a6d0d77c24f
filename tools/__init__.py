"""Tools that are not pipeline stages (run by hand or by make)."""
