"""MLflow at the edge: tracking runs, the model registry, the registered model (a pyfunc from code)
and its verified loading and serving, the monitoring runs. The only package that imports mlflow."""
