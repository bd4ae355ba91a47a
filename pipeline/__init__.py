"""The Kubeflow pipeline: its definition, compiled package, local runner and KFP client."""
