"""What `dicomnet serve` is: a storage folder, an SQLite index and the SCP over them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnet.pacs.scp import StorageSCP

__all__ = ["StorageSCP"]


def __getattr__(name: str) -> Any:
    # Imported when first used: the indexer process imports `dicomnet.pacs.index` alone.
    if name == "StorageSCP":
        from dicomnet.pacs.scp import StorageSCP

        return StorageSCP
    try:  # a submodule (`dicomnet.pacs.index`), as after an eager import of the package
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule is there, but something it imports is not
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
