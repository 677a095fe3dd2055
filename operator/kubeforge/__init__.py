"""kubeforge: a Kubernetes operator for the whole life of a large language model."""

__version__ = "0.1.0"

GROUP = "kubeforge.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["GROUP", "VERSION", "API_VERSION", "__version__"]
