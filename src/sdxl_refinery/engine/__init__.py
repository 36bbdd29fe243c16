"""The engine: device policy, model sources, the two-stage run, previews, the tiny pair.

Only the service imports this package. diffusers and torch types stay inside;
what leaves is our request, result and progress types, PIL images and numbers.
Importing the package itself is cheap: `Engine` and the torch-bound parts load
on first use, so torch-free helpers (`sources`, `single_file`) can check model
references before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import choose_placement
    from .loaded import Engine
    from .passes import EngineOutput

__all__ = ["Engine", "EngineOutput", "choose_placement"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .loaded import Engine

        return Engine
    if name == "EngineOutput":
        from .passes import EngineOutput

        return EngineOutput
    if name == "choose_placement":
        from .device import choose_placement

        return choose_placement
    raise AttributeError(name)
