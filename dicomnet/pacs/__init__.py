"""What `dicomnet serve` is: a storage folder, an SQLite index and the SCP over them."""

from dicomnet.pacs.scp import StorageSCP

__all__ = ["StorageSCP"]
