"""The stage machinery: knows run folders, no ML."""
