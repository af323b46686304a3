"""Pipeline stages: thin orchestration over `pipeline/`, one module per stage; runtime (Ray and
the console) and tracking (TensorBoard, MLflow) at the edge."""
