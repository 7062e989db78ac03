"""Run files: the recording format, the export to HDF5, a recording to its result."""
