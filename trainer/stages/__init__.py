"""The pipeline's stages as plain functions (what each KFP component calls), MLflow tracking and
the MLflow model."""
