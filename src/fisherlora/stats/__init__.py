"""Fisher statistics: pure tensor math, the hooks that collect it, and its on-disk form."""
