"""DVC stages: thin glue between params.yaml, files on disk and the charlm library."""
