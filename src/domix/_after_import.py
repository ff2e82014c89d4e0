"""Run a callable right after a module is first imported (a post-import hook on `sys.meta_path`): domix
registers its PEFT method when PEFT is imported, so that `import domix` stays light and the method is
there whichever of the two a script imports first."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


class _After(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders find the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module):
            run(module)
            try:
                then()
            except Exception as e:  # noqa: BLE001 — the module itself imported fine
                warnings.warn(f"domix could not register with {fullname}: {type(e).__name__}: {e}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def after_import(name: str, then) -> None:
    """Call `then()` once `name` is imported: now if it already is, else right after its import."""
    if name in sys.modules:
        then()
    elif not any(isinstance(f, _After) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _After(name, then))
