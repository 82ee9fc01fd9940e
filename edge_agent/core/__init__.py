"""The pure core: the file lifecycle and the policies. No I/O, no clocks, no threads."""
