"""NIC's sample sizes and PCA width, scaled to the images a build actually has.

NIC's defaults (2,000 images for the value and provenance models, 1,000 for the final model, 2,000 held out to
measure the derived heads, PCA to 64 dimensions on 1,000 images) suit a training set of 5,000 or more. With fewer,
:func:`size_to_data` shrinks them in the same proportions and says what that costs; below :data:`MIN_IMAGES` the
one-class models have too few points to draw a boundary from, and it refuses in one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pathguard.models.errors import DatasetError, PathguardWarning

__all__ = ["MIN_FINAL", "MIN_FIT", "MIN_HOLDOUT", "MIN_IMAGES", "NICSizeWarning", "NICSizes", "size_to_data"]

MIN_FIT = 40
"""Images the per-layer value and provenance SVMs need at least: with ``nu = 0.1`` that leaves 4 support vectors
and a PCA width of 10 (a quarter of the images)."""
MIN_FINAL = 20
"""Images the final SVM needs at least (its inputs are the 2L-1 per-layer scores, standardized on these)."""
MIN_HOLDOUT = 10
"""Held-out images that measure the derived heads' accuracy (when ``fit`` gets no validation images)."""
MIN_IMAGES = MIN_FIT + MIN_FINAL + MIN_HOLDOUT
HOLDOUT_SHARE = 0.1
"""Share of a short training sample held out for the heads' accuracy (the defaults hold out 2,000 of 5,000)."""
PCA_SAMPLES_PER_DIM = 4
"""A PCA fitted on n images keeps at most n / 4 components: a wider one would mostly describe noise."""


class NICSizeWarning(PathguardWarning):
    """NIC was fitted on fewer images than its configured sizes ask for."""


@dataclass(frozen=True)
class NICSizes:
    """The sizes one NIC fit uses.

    Parameters
    ----------
    n_fit, n_final, n_pca, holdout, pca_dim : int
        As the :class:`~pathguard.models.nic.NICDetector` parameters of the same names.
    """

    n_fit: int
    n_final: int
    n_pca: int
    holdout: int
    pca_dim: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def size_to_data(configured: NICSizes, n_images: int, has_validation: bool = False) -> tuple[NICSizes, str | None]:
    """The sizes a fit on ``n_images`` uses, and a note on the cost when they are smaller than ``configured``.

    Parameters
    ----------
    configured : NICSizes
        The detector's parameters (its defaults or the user's).
    n_images : int
        Training images available to the fit.
    has_validation : bool
        Whether the heads' accuracy is measured on separate images (then nothing is held out).

    Returns
    -------
    sizes : NICSizes
        ``configured`` where the images suffice; otherwise ``holdout`` becomes 10% of them (at least 10),
        ``n_fit`` and ``n_final`` share the rest in their configured proportion, ``n_pca`` is at most ``n_fit``
        and ``pca_dim`` at most a quarter of ``n_pca``.
    note : str or None
        What was scaled and what it costs (``None`` when nothing was).

    Raises
    ------
    DatasetError
        Fewer than :data:`MIN_IMAGES` images (fewer than ``MIN_FIT + MIN_FINAL`` with validation images).
    """
    holdout_min = 0 if has_validation else MIN_HOLDOUT
    need = holdout_min + MIN_FIT + MIN_FINAL
    if n_images < need:
        held = f", {holdout_min} held out to measure its derived heads" if holdout_min else ""
        raise DatasetError(
            f"NIC needs at least {need} training images ({MIN_FIT} for its per-layer value and provenance models, "
            f"{MIN_FINAL} for its final model{held}) and got {n_images}; add training images"
        )
    holdout = 0 if has_validation else configured.holdout
    n_fit, n_final = configured.n_fit, configured.n_final
    if n_images < holdout + n_fit + n_final:
        holdout = 0 if has_validation else min(holdout, max(MIN_HOLDOUT, round(HOLDOUT_SHARE * n_images)))
        rest = n_images - holdout
        n_fit = min(n_fit, max(MIN_FIT, rest * n_fit // max(n_fit + n_final, 1)))
        n_final = min(n_final, rest - n_fit)
    n_pca = min(configured.n_pca, n_fit)
    pca_dim = min(configured.pca_dim, max(1, n_pca // PCA_SAMPLES_PER_DIM))
    sizes = NICSizes(n_fit=n_fit, n_final=n_final, n_pca=n_pca, holdout=holdout, pca_dim=pca_dim)
    if has_validation:
        configured = NICSizes(**{**configured.to_dict(), "holdout": 0})
    if sizes == configured:
        return sizes, None
    return sizes, _cost_note(configured, sizes, n_images)


def _cost_note(configured: NICSizes, sizes: NICSizes, n_images: int) -> str:
    full = configured.holdout + configured.n_fit + configured.n_final
    return (
        f"NIC scaled to {n_images} training images (its sizes ask for {full}): value/provenance models on "
        f"{sizes.n_fit} images instead of {configured.n_fit}, final model on {sizes.n_final} instead of "
        f"{configured.n_final}, PCA to {sizes.pca_dim} dimensions on {sizes.n_pca} images instead of "
        f"{configured.pca_dim} on {configured.n_pca}, {sizes.holdout} held out instead of {configured.holdout}. "
        f"Cost: coarser one-class boundaries, so weaker detection and a clean false-positive rate that strays "
        f"further from the target; {full} or more training images fit NIC at its full sizes"
    )
