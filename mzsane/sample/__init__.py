"""sample stage of mzsane."""
