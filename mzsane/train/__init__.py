"""train stage of mzsane."""
