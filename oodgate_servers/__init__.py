"""The servers the project starts and supervises: a shared MLflow tracking server on PostgreSQL, the
Prefect temporary server of a flow run, and the one wait-until-healthy helper."""
