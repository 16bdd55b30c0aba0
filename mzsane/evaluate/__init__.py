"""evaluate stage of mzsane."""
