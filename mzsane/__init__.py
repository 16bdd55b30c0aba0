"""mzsane: Kubernetes-native distributed training for weight-space learning (MZ-SANE) on model zoos."""

__version__ = "0.1.0"
