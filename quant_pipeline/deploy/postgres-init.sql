-- Runs once, on an empty data volume (postgres image's /docker-entrypoint-initdb.d): POSTGRES_DB made Dagster's
-- database; MLflow's tracking and registry store gets a database of its own so neither schema's migrations touch
-- the other's tables.
CREATE DATABASE mlflow;
