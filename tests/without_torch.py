"""Run Python as on a server installed without the builder's extra: ``python tests/without_torch.py -c CODE`` (or
``-m MODULE ARGS...``) with torch, scikit-learn, scipy, numba, onnx, safetensors and tqdm unimportable (any import of
them raises ModuleNotFoundError, as where they are not installed)."""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED = frozenset({"torch", "sklearn", "scipy", "numba", "llvmlite", "onnx", "safetensors", "tqdm"})


class _Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def main() -> None:
    sys.meta_path.insert(0, _Uninstalled())
    if len(sys.argv) >= 3 and sys.argv[1] == "-c":
        code = sys.argv[2]
        sys.argv = ["-c", *sys.argv[3:]]
        exec(compile(code, "<without-torch>", "exec"), {"__name__": "__main__"})
    elif len(sys.argv) >= 3 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        raise SystemExit("usage: without_torch.py -c CODE | -m MODULE [ARGS...]")


if __name__ == "__main__":
    main()
