"""Renderers: a Plan into Kubernetes objects (RayJob, PyTorchJob, TrainJob, ConfigMaps)."""
