"""What is said about a result: measurements, the preview image, the PDF case report."""
