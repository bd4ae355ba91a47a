"""The package version and the container image built from it (one source for both)."""

__version__ = "0.1.0"

# The image every pipeline component runs in; its tag is the package version.
IMAGE_REPOSITORY = "ghcr.io/mask-rcnn-pipeline/trainer"
IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
