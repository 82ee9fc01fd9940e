"""Finding complete files: watchdog events, periodic rescans, completion policies."""
