"""Pipeline stages: thin orchestration over `pipeline/`, one module per stage."""
