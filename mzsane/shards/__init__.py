"""shards stage of mzsane."""
