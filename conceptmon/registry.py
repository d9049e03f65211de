"""One registry type for every extension point: detectors, probes, encoders, similarities,
map methods, statistics and report sections.

An entry comes from one of three places, and :meth:`Registry.entries` says which:

* **built in**: a ``name -> "package.module:attribute"`` table, imported on first use so
  that ``import conceptmon`` stays cheap (torch loads only where a command needs it);
* **entry points**: any installed distribution that declares, e.g.::

      [project.entry-points."conceptmon.detectors"]
      mydetector = "my_package.detector:MyDetector"

* **a spec string** in the config, ``package.module:Name``, imported on the spot (the
  module is looked up on ``sys.path``, plus the config file's folder and the working
  directory, see :func:`import_spec`).

``register`` (a decorator) adds entries from code, e.g. in tests. Unknown names fail
with one line listing close matches and every choice (:func:`did_you_mean`).
"""
from __future__ import annotations

import difflib
import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from .errors import ConceptmonError

T = TypeVar("T")


class RegistryError(ConceptmonError):
    """A name that no registry entry answers to, or a plugin that cannot be loaded."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """`` (did you mean a, b?)`` for the closest choices, or an empty string."""
    matches = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def is_spec(name: str) -> bool:
    """``package.module:Name`` (a colon after a dotted or plain module name, no path separators)."""
    module, sep, attr = str(name).partition(":")
    return bool(sep and module and attr and "/" not in module and "\\" not in module
                and all(part.isidentifier() for part in module.split("."))
                and all(part.isidentifier() for part in attr.split(".")))


@contextmanager
def _extra_path(folders: Iterable[Path]) -> Iterator[None]:
    added = [str(Path(f).resolve()) for f in folders if f is not None and Path(f).is_dir()]
    added = [f for f in dict.fromkeys(added) if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def import_spec(spec: str, *, field: str, search: Iterable[Path | None] = ()):
    """The object named by ``package.module:attr``.

    The module is found on ``sys.path`` first, then in ``search`` folders (the config
    file's folder, the working directory), so a ``models.py`` beside the config works
    without setting ``PYTHONPATH``. Errors are one line naming ``field``.
    """
    module_name, _, attr = str(spec).partition(":")
    folders = [*(f for f in search if f is not None), Path.cwd()]
    try:
        with _extra_path(folders):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            where = ", ".join(dict.fromkeys(str(Path(f).resolve()) for f in folders))
            raise RegistryError(
                f"{field}: cannot import {module_name!r}: no such module on sys.path or in {where}"
            ) from None
        raise RegistryError(f"{field}: importing {module_name!r} failed: {e}") from None
    except ImportError as e:
        raise RegistryError(f"{field}: importing {module_name!r} failed: {e}") from None
    except SyntaxError as e:
        raise RegistryError(f"{field}: {module_name!r} has a syntax error ({e.filename}:{e.lineno})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise RegistryError(f"{field}: {module_name} has no {attr!r}{did_you_mean(part, public)}")
        obj = getattr(obj, part)
    return obj


def origin_of(obj) -> str:
    """``builtin`` for conceptmon's own objects, else ``code (<module>)``."""
    module = getattr(obj, "__module__", None) or "?"
    return "builtin" if module == "conceptmon" or module.startswith("conceptmon.") else f"code ({module})"


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    source: str
    """``builtin`` | ``entry point <dist> (<module:attr>)`` | ``code (<module>)`` | ``spec``."""


class Registry(Generic[T]):
    """Named components of one kind.

    >>> DETECTORS = Registry("detector", group="conceptmon.detectors", field="detector.name",
    ...                      builtins={"netdissect": "conceptmon.detectors.netdissect:NetDissect"})
    >>> DETECTORS.get("netdissect")       # imports the module on first use
    >>> DETECTORS.names()                 # built-ins, entry points and registered names
    """

    def __init__(self, kind: str, *, group: str, field: str, builtins: dict[str, str] | None = None,
                 check: Callable[[str, object], None] | None = None, allow_specs: bool = True):
        self.kind = kind
        self.group = group
        self.field = field
        self._builtins = dict(builtins or {})
        self._entries: dict[str, Entry[T]] = {}
        self._check = check
        self._allow_specs = allow_specs
        self._scanned = False

    # ------------------------------------------------------------------------- adding

    def register(self, name: str | Callable | None = None, *, source: str | None = None):
        """Decorator (``@REG.register("name")``, ``@REG.register``) or call (``REG.register("n")(obj)``).

        Without a name, the object's ``name`` attribute (or its ``__name__``) is used.
        Registering a name again replaces the entry (a test or plugin may override one).
        """
        def deco(obj):
            key = name if isinstance(name, str) else getattr(obj, "name", None) or obj.__name__
            self._add(str(key), obj, source or origin_of(obj))
            return obj

        if callable(name) and not isinstance(name, str):
            obj, name = name, None
            return deco(obj)
        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _add(self, name: str, obj, source: str) -> None:
        if self._check is not None:
            self._check(name, obj)
        self._entries[name] = Entry(name, obj, source)

    # ------------------------------------------------------------------------- loading

    def _load_builtin(self, name: str) -> None:
        target = self._builtins.get(name)
        if target is None or name in self._entries:
            return
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)  # a built-in that fails to import is a bug
        if name not in self._entries:  # the module may have registered itself on import
            self._add(name, getattr(module, attr), "builtin")

    def _scan_entry_points(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.name in self._entries or ep.name in self._builtins:
                continue  # code and built-ins win over a plugin of the same name
            dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break the other commands
                raise RegistryError(
                    f"{self.group}: plugin {ep.name!r} from {dist} ({ep.value}) failed to load: "
                    f"{type(e).__name__}: {e}"
                ) from None
            self._add(ep.name, obj, f"entry point {dist} ({ep.value})")

    def rescan(self) -> None:
        """Look at the installed entry points again (after installing a plugin in-process)."""
        self._scanned = False
        for name in [n for n, e in self._entries.items() if e.source.startswith("entry point")]:
            del self._entries[name]

    # ------------------------------------------------------------------------- lookup

    def names(self) -> list[str]:
        """Every name: built-ins first (in their declared order), then the rest sorted."""
        self._scan_entry_points()
        rest = sorted(n for n in self._entries if n not in self._builtins)
        return [*self._builtins, *rest]

    def __contains__(self, name: str) -> bool:
        if name in self._builtins or name in self._entries:
            return True
        self._scan_entry_points()
        return name in self._entries

    def get(self, name: str, *, search: Iterable[Path | None] = ()) -> T:
        """The entry called ``name``, or the object a ``package.module:Name`` spec names."""
        name = str(name).strip()
        if name in self._builtins:
            self._load_builtin(name)
            return self._entries[name].obj
        if name in self._entries:
            return self._entries[name].obj
        self._scan_entry_points()
        if name in self._entries:
            return self._entries[name].obj
        if self._allow_specs and is_spec(name):
            obj = import_spec(name, field=self.field, search=search)
            if self._check is not None:
                self._check(name, obj)
            return obj
        choices = self.names()
        spec = " or package.module:Name" if self._allow_specs else ""
        raise RegistryError(
            f"{self.field}: unknown {self.kind} {name!r}{did_you_mean(name, choices)}; "
            f"choices: {', '.join(choices)}{spec}"
        )

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def entries(self) -> list[Entry[T]]:
        """Every entry with where it came from (loads the built-ins)."""
        for name in self._builtins:
            self._load_builtin(name)
        self._scan_entry_points()
        return [self._entries[n] for n in self.names()]

    def items(self) -> list[tuple[str, T]]:
        return [(e.name, e.obj) for e in self.entries()]


__all__ = ["Entry", "Registry", "RegistryError", "did_you_mean", "import_spec", "is_spec"]
