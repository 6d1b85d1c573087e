"""Tree ensembles as plain arrays: the EP paper's random forest, AdaBoost and gradient boosting without pickle.

:meth:`TreeEnsemble.from_sklearn` reads a fitted binary scikit-learn ensemble through its documented tree structure
(``estimator.tree_.feature / threshold / children_left / children_right / value``) into flat arrays; :meth:`score`
reproduces ``predict_proba(X)[:, 1]`` with numpy alone (the test suite checks agreement to 1e-9 on real features).

All trees are stored back to back: node ``i`` of the ensemble is internal when ``feature[i] >= 0`` and goes to
``left[i]`` when ``x[feature[i]] <= threshold[i]``, else to ``right[i]``; a leaf carries ``leaf[i]``. Tree ``t``
starts at node ``roots[t]``. Like scikit-learn, the features are rounded to float32 before they are compared with
the (float64) thresholds. What the leaves hold and how trees combine, per kind (binary, class 1 = adversarial):

- ``random_forest``: ``leaf`` = fraction of class 1 in the leaf; ``p = sum_t leaf_t / T``;
- ``adaboost`` (SAMME): ``leaf`` = the tree's vote, +1 for class 1, -1 for class 0; with estimator weights ``w_t``,
  ``d = 2 sum_t w_t vote_t / sum_t w_t`` and ``p = 1 / (1 + exp(-d))`` (``decision_function`` and the softmax of
  ``(-d, d) / 2`` of scikit-learn);
- ``gradient_boosting`` (log-loss): ``leaf`` = the regression tree's value; ``raw = init + sum_t lr * leaf_t``
  with ``init`` = logit of the class-1 prior (``init_``), ``p = 1 / (1 + exp(-raw))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pathguard.models.errors import NotFittedError

__all__ = ["TREE_KINDS", "TreeEnsemble"]

TREE_KINDS = ("random_forest", "adaboost", "gradient_boosting")
_ARRAYS = ("feature", "threshold", "left", "right", "leaf", "roots", "weights", "params")


def _tree_arrays(tree: Any) -> tuple[np.ndarray, ...]:
    """(feature, threshold, left, right) of one scikit-learn ``tree_``, leaves marked by feature -1 / children -1."""
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    is_leaf = left < 0
    feature = np.where(is_leaf, -1, np.asarray(tree.feature, dtype=np.int64))
    return (
        feature,
        np.asarray(tree.threshold, dtype=np.float64),
        np.where(is_leaf, -1, left),
        np.where(is_leaf, -1, right),
    )


def _leaf_values(kind: str, tree: Any) -> np.ndarray:
    """(n_nodes,) what each node of one tree contributes when it is the leaf an input lands in."""
    value = np.asarray(tree.value, dtype=np.float64)  # (n_nodes, n_outputs, n_classes or 1)
    if kind == "gradient_boosting":
        return value[:, 0, 0].copy()
    counts = value[:, 0, :]  # (n_nodes, 2)
    if kind == "adaboost":  # DecisionTreeClassifier.predict: the first class with the largest value
        return np.where(np.argmax(counts, axis=1) == 1, 1.0, -1.0)
    total = counts.sum(axis=1)
    return counts[:, 1] / np.where(total == 0.0, 1.0, total)


def _members(kind: str, est: Any) -> tuple[list[Any], np.ndarray, float]:
    """The fitted trees of ``est``, their weights and the constant ``init`` (see the module docstring)."""
    if kind == "random_forest":
        trees = list(est.estimators_)
        return trees, np.ones(len(trees)), 0.0
    if kind == "adaboost":
        if getattr(est, "algorithm", "SAMME") != "SAMME":
            raise ValueError(f"only AdaBoost's SAMME algorithm can be exported, not {est.algorithm!r}")
        trees = list(est.estimators_)
        return trees, np.asarray(est.estimator_weights_[: len(trees)], dtype=np.float64), 0.0
    trees = list(est.estimators_[:, 0])  # (n_stages, 1) regression trees for a binary problem
    return trees, np.full(len(trees), float(est.learning_rate)), _boosting_init(est)


def _boosting_init(est: Any) -> float:
    """Gradient boosting's initial raw prediction: logit of the prior of class 1 (0 for ``init='zero'``)."""
    init = est.init_
    if isinstance(init, str) and init == "zero":
        return 0.0
    if type(init).__name__ != "DummyClassifier" or getattr(init, "strategy", None) != "prior":
        raise ValueError("only gradient boosting with the default (prior) or 'zero' init can be exported")
    eps = np.finfo(np.float64).eps
    p = float(np.clip(np.asarray(init.class_prior_, dtype=np.float64)[1], eps, 1.0 - eps))
    return float(np.log(p / (1.0 - p)))


def _expit(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


class TreeEnsemble:
    """A binary tree ensemble scored with numpy (see the module docstring for the layout and the formulas).

    Parameters
    ----------
    kind : str
        One of :data:`TREE_KINDS`.

    Attributes
    ----------
    feature_, left_, right_ : np.ndarray
        (n_nodes,) int64; -1 at leaves.
    threshold_, leaf_ : np.ndarray
        (n_nodes,) float64.
    roots_ : np.ndarray
        (n_trees,) int64, first node of each tree.
    weights_ : np.ndarray
        (n_trees,) float64: 1 (random forest), the SAMME estimator weights, or the learning rate.
    init_ : float
        Gradient boosting's initial raw prediction (0 otherwise).
    n_features_ : int
        Width of the features the ensemble was fitted on.
    """

    feature_: np.ndarray
    threshold_: np.ndarray
    left_: np.ndarray
    right_: np.ndarray
    leaf_: np.ndarray
    roots_: np.ndarray
    weights_: np.ndarray
    init_: float
    n_features_: int

    def __init__(self, kind: str = "random_forest") -> None:
        self.kind = kind

    @classmethod
    def from_sklearn(cls, kind: str, estimator: Any) -> TreeEnsemble:
        """Export a fitted binary ``RandomForestClassifier``, ``AdaBoostClassifier`` (SAMME) or
        ``GradientBoostingClassifier`` (log-loss) to arrays."""
        if kind not in TREE_KINDS:
            raise ValueError(f"unknown tree ensemble {kind!r}; choose from {list(TREE_KINDS)}")
        if len(getattr(estimator, "classes_", ())) != 2:
            raise ValueError("only binary ensembles (benign vs adversarial) can be exported")
        if kind == "gradient_boosting" and getattr(estimator, "loss", "log_loss") != "log_loss":
            raise ValueError(f"only gradient boosting with log-loss can be exported, not {estimator.loss!r}")
        trees, weights, init = _members(kind, estimator)
        parts, roots, offset = [], [], 0
        for t in trees:
            feature, threshold, left, right = _tree_arrays(t.tree_)
            shift = np.where(left >= 0, offset, 0)
            parts.append((feature, threshold, left + shift, right + shift, _leaf_values(kind, t.tree_)))
            roots.append(offset)
            offset += len(feature)
        self = cls(kind)
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
        self.feature_, self.threshold_, self.left_, self.right_, self.leaf_ = cols
        self.roots_, self.weights_, self.init_ = np.asarray(roots, dtype=np.int64), weights, init
        self.n_features_ = int(estimator.n_features_in_)
        self._check()
        return self

    def _check(self) -> None:
        """Shapes agree, children come after their parent (so every walk ends), features are in range."""
        n = len(self.feature_)
        if not all(len(a) == n for a in (self.threshold_, self.left_, self.right_, self.leaf_)):
            raise ValueError("TreeEnsemble node arrays have different lengths")
        if len(self.roots_) == 0 or len(self.roots_) != len(self.weights_):
            raise ValueError("TreeEnsemble needs one weight per tree and at least one tree")
        if np.any(self.roots_ < 0) or np.any(self.roots_ >= n):
            raise ValueError("TreeEnsemble tree roots are out of range")
        inner = np.flatnonzero(self.feature_ >= 0)
        for child in (self.left_[inner], self.right_[inner]):
            if np.any(child <= inner) or np.any(child >= n):
                raise ValueError("TreeEnsemble children must follow their parent node")
        if np.any(self.feature_ >= self.n_features_):
            raise ValueError(f"TreeEnsemble splits on a feature beyond its {self.n_features_} features")

    def leaves(self, features: np.ndarray) -> np.ndarray:
        """(N, T) index of the leaf each input reaches in each tree, for ``features`` (N, F)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.n_features_:
            raise ValueError(f"features must be (N, {self.n_features_}), got shape {f.shape}")
        x = f.astype(np.float32).astype(np.float64)  # scikit-learn's trees compare float32 inputs
        node = np.broadcast_to(self.roots_, (len(x), len(self.roots_))).copy()  # (N, T)
        rows = np.arange(len(x))[:, None]
        while True:
            feat = self.feature_[node]  # (N, T)
            inner = feat >= 0
            if not inner.any():
                return node
            go_left = x[rows, np.maximum(feat, 0)] <= self.threshold_[node]
            node = np.where(inner, np.where(go_left, self.left_[node], self.right_[node]), node)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) probability of the adversarial class, as scikit-learn's ``predict_proba(features)[:, 1]``."""
        if not hasattr(self, "leaf_"):
            raise NotFittedError("TreeEnsemble is not fitted")
        values = self.leaf_[self.leaves(features)]  # (N, T)
        if self.kind == "random_forest":
            return np.asarray(values.sum(axis=1) / len(self.roots_))
        if self.kind == "adaboost":
            return _expit(2.0 * (values @ self.weights_) / self.weights_.sum())
        return _expit(self.init_ + values @ self.weights_)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "leaf_"):
            raise NotFittedError("TreeEnsemble is not fitted")
        return {
            "feature": self.feature_,
            "threshold": self.threshold_,
            "left": self.left_,
            "right": self.right_,
            "leaf": self.leaf_,
            "roots": self.roots_,
            "weights": self.weights_,
            "params": np.array([self.init_, float(self.n_features_)]),
        }

    @classmethod
    def from_arrays(cls, kind: str, arrays: Mapping[str, np.ndarray]) -> TreeEnsemble:
        if kind not in TREE_KINDS:
            raise ValueError(f"unknown tree ensemble {kind!r}; choose from {list(TREE_KINDS)}")
        missing = sorted(set(_ARRAYS) - set(arrays))
        if missing:
            raise ValueError(f"TreeEnsemble arrays are missing {missing}")
        self = cls(kind)
        self.feature_, self.left_, self.right_, self.roots_ = (
            np.asarray(arrays[k], dtype=np.int64).ravel() for k in ("feature", "left", "right", "roots")
        )
        self.threshold_, self.leaf_, self.weights_ = (
            np.asarray(arrays[k], dtype=np.float64).ravel() for k in ("threshold", "leaf", "weights")
        )
        init, n_features = (float(v) for v in np.asarray(arrays["params"], dtype=np.float64))
        self.init_, self.n_features_ = init, int(n_features)
        self._check()
        return self
