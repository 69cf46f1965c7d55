"""Types and helpers every stage uses: errors, the Volume, labels, threads, file locks, argument types."""
