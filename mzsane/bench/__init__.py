"""bench stage of mzsane."""
