"""tokens stage of mzsane."""
