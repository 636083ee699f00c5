"""Prefect tasks: a few lines each over ``oodgate.running.steps``; they pass paths, ids and small reports."""
