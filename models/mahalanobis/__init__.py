"""Class-conditional Gaussians with a tied covariance per tapped layer (benign-only Mahalanobis detector)."""

from pathguard.models.mahalanobis.detector import POOLS, ClassGaussian, fisher, pooled

__all__ = ["POOLS", "ClassGaussian", "fisher", "pooled"]
