"""zoo stage of mzsane."""
