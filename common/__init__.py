"""Small pieces every layer shares: user-facing errors, quiet logging, iopath file access."""
