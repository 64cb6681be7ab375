"""Triton's interpreter (``TRITON_INTERPRET=1``: the kernels on the CPU, for tests and the GPU script's CPU smoke) made
cheaper to run.

The interpreter patches ``triton.language`` (its builtins to numpy-backed versions) when a launch starts and restores
it when the launch ends; it also patches it again at every call of a ``@triton.jit`` helper inside the kernel
(``tl.zeros``, our own tile loaders, epilogues...), a walk over every member of the language modules, ~1.5 ms a call,
once per program of the grid. In the engine's interpreter tests that was a third of the time. :func:`install` keeps the
first patch of a launch and skips the helpers' repeats of it (a helper whose module reaches a language module the launch
has not patched yet is patched as before). Written against triton 3.9's interpreter (what CI installs); where the
names it wraps are missing, :func:`install` leaves the interpreter alone and says so by returning False.
"""
from __future__ import annotations

import inspect

_installed = False


def install() -> bool:
    """Patch the interpreter (once per process); True when it is patched. Call it with ``TRITON_INTERPRET=1`` set."""
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter as it
    except Exception:            # no triton, or a broken one: nothing to speed up
        return False
    if not all(hasattr(it, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor", "tl")):
        return False
    patch_lang, run = it._patch_lang, it.GridExecutor.__call__
    langs_of: dict = {}          # a function's language modules (ids), by function
    state = {"depth": 0, "patched": set()}      # launches in progress, and the language modules they patched

    def launch(self, *args, **kwargs):
        state["depth"] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            if not state["depth"]:
                state["patched"].clear()

    def patch_once(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                             if inspect.ismodule(v) and v in (it.tl, it.tl.core))
        if state["depth"] and langs and langs <= state["patched"]:
            return it._LangPatchScope()          # a helper inside a launch that already patched its modules
        scope = patch_lang(fn)
        if state["depth"]:
            state["patched"] |= langs
        return scope

    it._patch_lang = patch_once
    it.GridExecutor.__call__ = launch
    _installed = True
    return True
