"""Reading and writing bytes: gs://, https:// and local transfers, the download cache, and the one
atomic file write everything that writes a result uses."""
