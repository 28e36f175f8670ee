"""The artifact: writing shards atomically, the manifest, loading."""
