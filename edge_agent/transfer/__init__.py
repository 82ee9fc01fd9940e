"""The storage side: moving bytes to a destination URL, behind one small interface."""
