"""Talking to a PACS: the DICOMweb client and the watch service that segments new studies."""
