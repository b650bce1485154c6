"""Plug-ins: methods, protocols, attacks, evaluators and recipes from other installed packages.

A package adds to erasure by declaring entry points in its ``pyproject.toml``; nothing in this
repository changes:

    [project.entry-points."erasure.methods"]
    substitute = "my_package.substitute:Substitute"   # an EraserModule subclass (erasure.methods.base)
    [project.entry-points."erasure.protocols"]
    my_benchmark = "my_package.benchmark:MyBenchmark" # a Protocol subclass (evaluation.protocols.base)
    [project.entry-points."erasure.attacks"]
    my_attack = "my_package.attack:attack"            # attack(target, config) -> AttackResult
    [project.entry-points."erasure.evaluators"]
    my_judge = "my_package.judge:build"               # build(evaluation.options) -> Evaluator
    [project.entry-points."erasure.recipes"]
    my_package = "my_package"                         # a package whose recipes/ folder holds <recipe>.yaml
    [project.entry-points."erasure.example_sources"]
    my_images = "my_package.images:examples"          # examples(concept, count, seed) -> (images, masks)

Each registry (``METHODS``, ``PROTOCOLS``, ``ATTACKS``, ``EVALUATORS``, the recipe names) reads its
group when it is first imported, so a plug-in appears in ``--help``, in ``recipe=``/``protocol=``/
``attacks=[...]``/``evaluation.evaluator=`` and in ``erasure.compare`` like a built-in one. A
method declares what it reads from a protocol (``EraserModule.needs``), so a plug-in method runs
on every protocol, and a plug-in protocol serves every method.
"""

from __future__ import annotations

from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

GROUPS = ("erasure.methods", "erasure.protocols", "erasure.attacks", "erasure.evaluators", "erasure.recipes",
          "erasure.example_sources")


class PluginError(RuntimeError):
    """A plug-in that cannot load or clashes with a name taken; one line naming its package and the fix."""


def plugins(group: str, taken: dict[str, Any]) -> dict[str, Any]:
    """The objects the installed packages register under ``group``, by name; a name already in
    ``taken`` (a built-in or an earlier plug-in) or an entry point that fails to load is a PluginError."""
    found: dict[str, Any] = {}
    for point in entry_points(group=group):
        package = point.dist.name if point.dist else point.value.split(":")[0]
        if point.name in taken or point.name in found:
            raise PluginError(f"plug-in package {package} registers {group} '{point.name}', a name already taken; "
                              "rename its entry point")
        try:
            found[point.name] = point.load()
        except Exception as error:  # noqa: BLE001 - whatever a third party's import raises: one line naming it
            raise PluginError(f"plug-in {group} '{point.name}' of package {package} does not load "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                              f"fix or uninstall {package}") from None
    return found


def recipe_folders() -> list[Path]:
    """The ``recipes`` folders of the packages registered under ``erasure.recipes``."""
    folders = []
    for module in plugins("erasure.recipes", {}).values():
        folder = Path(str(resources.files(module.__name__))) / "recipes"
        if folder.is_dir():
            folders.append(folder)
    return folders
