"""The engine: `MaskRCNN` (matterport's surface), the training procedure, the distribution
strategy, and inference (molding images in, unmolding detections out)."""
