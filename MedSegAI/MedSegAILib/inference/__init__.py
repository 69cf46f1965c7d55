"""Volume in, labels out: validation, preprocessing, sliding windows, streaming inference, postprocessing."""
