"""Files in and out: images (NIfTI, NRRD, DICOM series), Slicer .seg.nrrd, DICOM SEG, parallel gzip."""
