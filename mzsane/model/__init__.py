"""model stage of mzsane."""
