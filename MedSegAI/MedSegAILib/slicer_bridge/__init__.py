"""The only code that talks to Slicer: MRML nodes, the panel's Logic, the engine process it runs, dependencies."""
